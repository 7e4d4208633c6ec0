"""Regressions for what the guard-rule state machine found, as plain deterministic tests.

1. A restarted runner adopted an orphaned dispatch by launching the SAME (batch, dispatch_seq)
   again: a late worker of the lost launch and the adopted one then held the same fencing token
   (two live workers for one dispatch). Adoption now dispatches again under a new token.
2. A pooled connection killed while idle (pg_terminate_backend, a database restart) failed the
   next coordinator run with AdminShutdown. The pool now checks connections when handing them
   out.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from helpers import CUSTOMER, setup_job, tenant_conn
from importwaves.db.connect import connect
from importwaves.db.queries import Q
from importwaves.engine.model import Outcome
from importwaves.worker import EXIT_OK, WorkItem, run_batch
from importwaves.worker_pool import PooledWorker, PoolSettings

pytestmark = pytest.mark.integration


def test_dispatch_of_a_dead_runner_gets_pooled_workers_under_its_own_token(
    engine, dsn, tenant, redis_url
) -> None:
    """Batches dispatched by a runner that died before any worker started: the next worker
    sync asks for a worker group, and a pooled worker claims them under the token they were
    dispatched with (no re-dispatch, no attempt lost); a late per-batch worker of the old
    dispatch then finds them completed and imports nothing."""
    setup_job(engine, "job", orders=1000, parallelism=2)  # 100 customers: 2 batches
    lost = engine.check("job", "start").dispatched  # the runner dies before these start
    assert [b.dispatch_seq for b in lost] == [1, 1]
    assert {b.record_type_id for b in lost} == {CUSTOMER}

    sync = engine.sync_workers("job")
    assert [(g.job_id, g.wave_number, g.size) for g in sync.groups] == [("job", None, 2)]
    worker = PooledWorker(PoolSettings(dsn, tenant, "job", "pool:1", idle_seconds=0.3, poll=0.1))
    stats = worker.run()
    assert (stats.completed, stats.failed, stats.reason) == (2, 0, "idle")
    assert sorted(stats.batches) == sorted(b.batch_id for b in lost)

    late = run_batch(WorkItem(dsn, tenant, "job", lost[0].batch_id, lost[0].dispatch_seq))
    assert late.exit_code == EXIT_OK and "already completed" in late.message
    with tenant_conn(dsn, tenant) as conn:
        rows = conn.execute(
            "SELECT batch_id, status, attempts, dispatch_seq, worker_id FROM wave_batches "
            "WHERE batch_id = ANY(%s)",
            ([b.batch_id for b in lost],),
        ).fetchall()
    assert {(r["status"], r["attempts"], r["dispatch_seq"], r["worker_id"]) for r in rows} == {
        ("completed", 1, 1, "pool:1")
    }


def test_idle_pooled_connections_killed_do_not_fail_the_next_run(
    engine, dsn, tenant, redis_url
) -> None:
    setup_job(engine, "job", orders=30)
    assert engine.check("job", "start").outcome == Outcome.WAVE_TRIGGERED
    with engine.pool.connection() as c1, engine.pool.connection() as c2:
        pids = [c1.info.backend_pid, c2.info.backend_pid]
    with tenant_conn(dsn, tenant) as admin:
        for pid in pids:
            # with a timeout it returns once the backend is gone (as after a real restart)
            row = admin.execute("SELECT pg_terminate_backend(%s, 5000) AS ok", (pid,)).fetchone()
            assert row["ok"]
    for _ in range(4):  # every pooled connection would be tried in turn
        assert engine.check("job", "timer").outcome == Outcome.IN_PROGRESS
    # the recovery path takes pooled connections too: it found the job, nothing stuck or lost,
    # and its progression check ran to the same answer
    report = engine.recovery.reconcile("job")
    assert not any(a.startswith("no job") for a in report.actions), report.actions
    assert (report.demoted, report.requeued, report.failed) == (0, 0, 0), report.actions
    assert report.result is not None
    assert report.result.outcome == Outcome.IN_PROGRESS, report.actions


def test_recovery_never_deadlocks_with_a_worker_holding_its_batch(
    engine, dsn, tenant, redis_url
) -> None:
    """3. Recovery demoted a stale batch (its trigger then holds the wave's counter row) and
    went on to requeue a stuck dispatched batch whose row a worker held; that worker, updating
    its batch, waited for the counter row: DeadlockDetected, and the reconcile failed (the soak
    found it). A batch row locked by a worker is in use, not stuck: recovery skips it now."""
    setup_job(engine, "job", orders=1000, parallelism=2)  # 100 customers: 2 batches
    stale, stuck = engine.check("job", "start").dispatched
    with tenant_conn(dsn, tenant) as admin:
        # `stale` was claimed long ago and never heartbeated; `stuck` was never claimed
        admin.execute(
            "UPDATE wave_batches SET status = 'processing', attempts = 1, "
            "started_at = now() - interval '1 hour', heartbeat_at = now() - interval '1 hour' "
            "WHERE job_id = 'job' AND batch_id = %s",
            (stale.batch_id,),
        )
        admin.execute(
            "UPDATE wave_batches SET dispatched_at = now() - interval '1 hour' "
            "WHERE job_id = 'job' AND batch_id = %s",
            (stuck.batch_id,),
        )
    worker = connect(dsn, tenant)  # a worker in the middle of claiming `stuck`
    try:
        worker.execute(Q("batch_lock"), {"job_id": "job", "batch_id": stuck.batch_id})
        outcome: list[object] = []
        t = threading.Thread(target=lambda: outcome.append(_reconcile(engine)))
        t.start()
        t.join(3)  # the old code blocked here on the worker's row (holding the counter row)
        # the worker's claim: its statement trigger needs the wave's counter row
        worker.execute(
            Q("batch_claim"),
            {
                "job_id": "job",
                "batch_id": stuck.batch_id,
                "dispatch_seq": stuck.dispatch_seq,
                "worker_id": "w",
            },
        )
        worker.commit()
        t.join(10)
    finally:
        worker.close()
    assert not t.is_alive()
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    with tenant_conn(dsn, tenant) as conn:
        rows = {
            r["batch_id"]: r["status"]
            for r in conn.execute(
                "SELECT batch_id, status FROM wave_batches WHERE batch_id = ANY(%s)",
                ([stale.batch_id, stuck.batch_id],),
            ).fetchall()
        }
    # the stale batch was demoted (and dispatched again by the run after it); the claimed one
    # was left to its worker
    assert rows[stuck.batch_id] == "processing"
    assert rows[stale.batch_id] in ("pending", "dispatched")


def _reconcile(engine: Any) -> object:
    try:
        return engine.recovery.reconcile("job")
    except BaseException as exc:  # reported by the test
        return exc
