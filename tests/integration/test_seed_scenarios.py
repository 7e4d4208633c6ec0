"""The five scenarios of the seed design's "Testing Strategy", on real PostgreSQL and Redis.

Data: 300 orders (30 customers, 1 Customer batch; 3 SalesOrder batches of 100; their lines in
derived batches of about 250 records).
"""

from __future__ import annotations

import threading

import pytest

from helpers import (
    DERIVED_READY,
    LINE,
    MONITORING,
    SALES_ORDER,
    assert_complete,
    batches,
    drive,
    expected_batches,
    flag_ttl,
    job_status,
    launched,
    redis_client,
    rows_by_type,
    run_and_notify,
    setup_job,
    tenant_conn,
    waves,
)
from importwaves.engine import derived
from importwaves.engine.model import Outcome
from importwaves.engine.snapshot import gates, read_waves
from importwaves.worker import EXIT_OK, WorkItem, run_batch

pytestmark = pytest.mark.integration

LAST_PARENT = "SalesOrder-000002"


def test_last_parent_batch_completion_initializes_and_dispatches_derived(
    engine, dsn, tenant, redis_url
) -> None:
    ds, spec = setup_job(engine, "job")
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.batch_id != LAST_PARENT)
    assert r.stalled and [b.batch_id for b in r.held] == [LAST_PARENT]
    # Two of three parents done: their derived batches exist (progressive, pending only), none
    # dispatched, the gate is closed at 66.7 %.
    w = waves(dsn, tenant, "job")
    assert (w[SALES_ORDER]["completed_batches"], w[SALES_ORDER]["total_batches"]) == (2, 3)
    assert w[LINE]["total_batches"] > 0
    assert w[LINE]["pending_batches"] == w[LINE]["total_batches"]
    assert launched(engine, LINE) == []
    assert flag_ttl(redis_url, tenant, "job", DERIVED_READY) == -2

    # The last parent batch completes: the same listener call creates the rest of the derived
    # batches and dispatches them.
    wr, result = run_and_notify(engine, dsn, tenant, "job", r.held[0])
    assert wr.exit_code == EXIT_OK and result is not None
    want = expected_batches(ds, spec)[LINE]
    w = waves(dsn, tenant, "job")
    assert w[LINE]["total_batches"] == want
    assert w[LINE]["dispatched_batches"] == min(spec.parallelism, want)
    assert len(launched(engine, LINE)) == min(spec.parallelism, want)
    assert flag_ttl(redis_url, tenant, "job", DERIVED_READY) > 0
    assert flag_ttl(redis_url, tenant, "job", MONITORING) > 0
    assert job_status(dsn, tenant, "job") == "running"

    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)


def test_coordinator_does_not_complete_while_derived_pending_and_dispatches_them(
    engine, dsn, tenant, redis_url
) -> None:
    ds, spec = setup_job(engine, "job", parallelism=2)
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.record_type_id != LINE)
    # Main waves are done; two derived batches were dispatched and are held by "workers".
    assert r.stalled and len(r.held) == 2
    assert all(b.record_type_id == LINE for b in r.held)
    assert r.outcome == Outcome.DERIVED_PENDING
    assert job_status(dsn, tenant, "job") == "running"
    for _ in range(3):  # repeated nudges: still not completed, nothing dispatched over the cap
        res = engine.check("job", "tick")
        assert res.outcome == Outcome.DERIVED_PENDING and res.dispatched == []
        assert res.decision is not None and res.decision.guard is not None
        assert res.decision.guard.main_done and res.decision.guard.derived_unfinished > 0
    assert job_status(dsn, tenant, "job") == "running"

    # A derived batch finishes: the coordinator dispatches the next derived batch instead of
    # completing.
    _, res = run_and_notify(engine, dsn, tenant, "job", r.held[0])
    assert res is not None and res.outcome == Outcome.DERIVED_WAVE_TRIGGERED
    assert [b.record_type_id for b in res.dispatched] == [LINE]
    assert res.decision is not None and res.decision.job_status is None
    assert job_status(dsn, tenant, "job") == "running"

    assert drive(engine, dsn, tenant, "job", include=r.held[1:]).outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)


def test_monitoring_stays_on_until_derived_finish_and_listener_never_skips(
    engine, dsn, tenant, redis_url
) -> None:
    ds, spec = setup_job(engine, "job", parallelism=2)
    seen_running_without_flag = []

    def check_flag(_n: int, run) -> None:
        if job_status(dsn, tenant, "job") == "running":
            ttl = flag_ttl(redis_url, tenant, "job", MONITORING)
            if ttl <= 0:
                seen_running_without_flag.append((run.batch.batch_id, ttl))

    r = drive(
        engine,
        dsn,
        tenant,
        "job",
        run_if=lambda b: b.record_type_id != LINE,
        after_step=check_flag,
    )
    assert len(r.held) == 2 and seen_running_without_flag == []
    assert flag_ttl(redis_url, tenant, "job", MONITORING) > 0

    # The monitoring flag disappears (cleared by an old coordinator, or expired). The listener
    # must still drive progression: the next derived batch is dispatched.
    redis_client(redis_url).delete(f"importwaves:{tenant}:job:{MONITORING}")
    before = len(launched(engine, LINE))
    _, res = run_and_notify(engine, dsn, tenant, "job", r.held[0])
    assert res is not None
    assert len(launched(engine, LINE)) == before + 1
    assert flag_ttl(redis_url, tenant, "job", MONITORING) > 0  # refreshed on progression

    result = drive(engine, dsn, tenant, "job", include=r.held[1:], after_step=check_flag)
    assert result.outcome == Outcome.COMPLETED
    assert seen_running_without_flag == []
    assert flag_ttl(redis_url, tenant, "job", MONITORING) == -2  # cleared only at the end
    assert_complete(engine, "job", ds, spec)


@pytest.mark.parametrize("listener_died", [False, True])
def test_db_fallback_when_the_cache_is_empty(
    engine, dsn, tenant, redis_url, listener_died: bool
) -> None:
    """The cache is wiped after the last parent committed. With `listener_died` the listener
    never ran for that batch either (it crashed after the worker's commit): the coordinator's
    DB-driven catch-up must create the derived batches from the DB copy of the parent ids."""
    ds, spec = setup_job(engine, "job")
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.batch_id != LAST_PARENT)
    last = r.held[0]
    if listener_died:
        wr = run_batch(WorkItem(dsn, tenant, "job", last.batch_id, last.dispatch_seq))
        assert wr.exit_code == EXIT_OK
        rows = {b["batch_id"]: b for b in batches(dsn, tenant, "job")}
        assert rows[LAST_PARENT]["needs_derivation"]  # nobody derived it yet
    else:
        run_and_notify(engine, dsn, tenant, "job", last)
    client = redis_client(redis_url)
    assert client.flushall()
    assert client.keys("importwaves:*") == []

    res = engine.check("job", "tick")
    want = expected_batches(ds, spec)[LINE]
    if listener_died:
        assert res.outcome == Outcome.DERIVED_WAVE_TRIGGERED
        assert res.derived_created > 0
        assert len(res.dispatched) == spec.parallelism
        rows = {b["batch_id"]: b for b in batches(dsn, tenant, "job")}
        assert not rows[LAST_PARENT]["needs_derivation"]
        assert any(b["parent_batch_id"] == LAST_PARENT for b in rows.values())
    assert waves(dsn, tenant, "job")[LINE]["total_batches"] == want
    assert len(launched(engine, LINE)) == spec.parallelism
    # The DB said the gate is open: the flags are back, with a TTL.
    assert flag_ttl(redis_url, tenant, "job", DERIVED_READY) > 0
    assert flag_ttl(redis_url, tenant, "job", MONITORING) > 0

    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)


def test_derived_upsert_is_idempotent_under_retries_and_races(
    engine, dsn, tenant, redis_url
) -> None:
    ds, spec = setup_job(engine, "job", parallelism=8)
    want = expected_batches(ds, spec)
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.batch_id != LAST_PARENT)
    last = r.held[0]
    assert run_batch(WorkItem(dsn, tenant, "job", last.batch_id, last.dispatch_seq)).exit_code == 0

    # Eight deliveries of the last parent's completion at the same moment.
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            barrier.wait(10)
            engine.listener.on_completions("job", [last.batch_id])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert rows_by_type(dsn, tenant, "job")[LINE] == want[LINE]
    derived_launches = [b.batch_id for b in launched(engine, LINE)]
    assert len(derived_launches) == len(set(derived_launches)) == min(8, want[LINE])

    # Re-running the creation directly changes nothing, even for parents marked again.
    with tenant_conn(dsn, tenant) as conn, conn.transaction():
        again = derived.create_for_completed_parents(conn, "job", spec)
        redo_parents = ["SalesOrder-000000", LAST_PARENT]
        conn.execute(
            "UPDATE wave_batches SET needs_derivation = true "
            "WHERE job_id = 'job' AND batch_id = ANY(%s)",
            (redo_parents,),
        )
        redo = derived.create_for_completed_parents(conn, "job", spec)
        assert redo.batch_ids == [] and redo.parent_batches == 2
    assert again.batch_ids == []

    assert drive(engine, dsn, tenant, "job", threads=4).outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)

    # A crash between the upsert and its mark: every parent "needs derivation" again. The
    # catch-up re-runs every upsert and creates nothing; the job stays completed.
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "UPDATE wave_batches SET needs_derivation = true WHERE job_id = 'job' "
            "AND record_type_id = %s",
            (SALES_ORDER,),
        )
        gate = gates(spec, read_waves(conn, "job"))[0]
        assert gate.open and gate.parents_done
    res = engine.check("job", "tick")
    assert res.derived_created == 0 and res.dispatched == []
    assert res.outcome == Outcome.COMPLETED
    assert rows_by_type(dsn, tenant, "job") == want
    assert job_status(dsn, tenant, "job") == "completed"
    assert_complete(engine, "job", ds, spec)
