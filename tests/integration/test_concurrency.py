"""Duplicate, reordered and concurrent deliveries; concurrent coordinator runs; idempotent
nudges of a completed job. Facts checked: exact batch rows, exact counters (counters_mismatch),
every (batch, dispatch_seq) launched exactly once, the parallelism cap, every row imported."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from helpers import (
    LINE,
    MONITORING,
    SALES_ORDER,
    assert_complete,
    batches,
    counters_mismatch,
    drive,
    expected_batches,
    flag_ttl,
    job_status,
    launched,
    setup_job,
    tenant_conn,
    wait_until,
    waves,
)
from importwaves.db.queries import Q
from importwaves.engine.model import Outcome
from importwaves.worker import EXIT_OK, WorkItem, run_batch

pytestmark = pytest.mark.integration


def lock_waiters_on_rows(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%FOR UPDATE%%'"
        ).fetchone()
        return int(row[0]) if row else 0


@pytest.mark.parametrize("order", ["fifo", "reverse", "shuffle"])
def test_every_completion_delivered_twice_in_any_order(
    engine, dsn, tenant, redis_url, order: str
) -> None:
    ds, spec = setup_job(engine, "job", orders=600)
    r = drive(engine, dsn, tenant, "job", deliver_twice=True, order=order, seed=7)
    assert r.outcome == Outcome.COMPLETED
    assert all(len(run.results) == 2 for run in r.runs)
    assert len(r.runs) == sum(expected_batches(ds, spec).values())
    assert all(b["dispatch_seq"] == 1 and b["attempts"] == 1 for b in batches(dsn, tenant, "job"))
    assert_complete(engine, "job", ds, spec)


def test_stale_or_foreign_completion_changes_nothing(engine, dsn, tenant, redis_url) -> None:
    _, _spec = setup_job(engine, "job")
    first = engine.check("job", "start").dispatched
    assert len(first) == 1  # the single Customer batch
    b = first[0]
    for _ in range(2):  # a notice for a batch no worker completed, delivered twice
        res = engine.listener.on_completions("job", [b.batch_id])
        assert res.dispatched == []
    row = next(x for x in batches(dsn, tenant, "job") if x["batch_id"] == b.batch_id)
    assert (row["status"], row["dispatch_seq"]) == ("dispatched", 1)
    assert engine.listener.on_completions("job", ["no-such-batch"]).outcome == Outcome.NOT_FOUND
    assert counters_mismatch(dsn, tenant, "job") == []
    assert len(launched(engine)) == 1


def test_eight_parallel_workers_with_duplicate_deliveries(engine, dsn, tenant, redis_url) -> None:
    ds, spec = setup_job(engine, "job", orders=1200, parallelism=8)
    r = drive(engine, dsn, tenant, "job", threads=8, deliver_twice=True, timeout=60)
    assert r.outcome == Outcome.COMPLETED
    assert engine.launcher.max_active <= 8
    assert all(b["dispatch_seq"] == 1 for b in batches(dsn, tenant, "job"))
    assert_complete(engine, "job", ds, spec)


def test_many_parent_completions_at_once_do_not_exhaust_the_pool(
    engine, dsn, tenant, redis_url
) -> None:
    """Eight parent batches complete at the same moment (pool of 8 connections), each while the
    gate is still closed (10 parent batches), so each completion creates its own derived
    batches and nudges the coordinator. None may wait for a pool connection another holds
    (that stalled every thread until the pool timeout)."""
    ds, spec = setup_job(engine, "job", orders=1000, parallelism=8)
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.record_type_id != SALES_ORDER)
    assert len(r.held) == 8
    for b in r.held:
        assert run_batch(WorkItem(dsn, tenant, "job", b.batch_id, b.dispatch_seq)).exit_code == 0
    errors: list[BaseException] = []

    def deliver(b: Any) -> None:
        try:
            engine.listener.on_completions("job", [b.batch_id])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # Line the eight listeners up: each holds its pool connection and waits for the job lock,
    # which this control connection holds until all eight are waiting.
    threads = [threading.Thread(target=deliver, args=(b,)) for b in r.held]
    with tenant_conn(dsn, tenant) as control:
        with control.transaction():
            control.execute(Q("job_lock"), {"job_id": "job"})
            for t in threads:
                t.start()
            wait_until(lambda: lock_waiters_on_rows(dsn) == 8, what="8 listeners queued")
        t0 = time.monotonic()
    for t in threads:
        t.join(45)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert elapsed < 10, f"8 concurrent completions took {elapsed:.1f}s"
    # every one of the eight created its derived batches; the two last parents were dispatched
    parents = {b.batch_id for b in r.held}
    derived_parents = {
        b["parent_batch_id"] for b in batches(dsn, tenant, "job") if b["record_type_id"] == LINE
    }
    assert derived_parents == parents
    assert len(launched(engine, SALES_ORDER)) == 10
    assert launched(engine, LINE) == []  # the gate is still closed at 80 %
    assert drive(engine, dsn, tenant, "job", threads=4).outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)


def test_timer_reconcile_and_completions_at_the_same_time(engine, dsn, tenant, redis_url) -> None:
    ds, spec = setup_job(engine, "job", orders=800, parallelism=6)
    stop = threading.Event()
    errors: list[BaseException] = []
    nudges = {"tick": 0, "reconcile": 0}

    def nudger(kind: str) -> None:
        try:
            while not stop.is_set():
                if kind == "tick":
                    engine.check("job", "tick")
                else:
                    engine.recovery.reconcile("job")
                nudges[kind] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    background = [threading.Thread(target=nudger, args=(k,)) for k in nudges]
    for t in background:
        t.start()
    try:
        r = drive(engine, dsn, tenant, "job", threads=4, timeout=60)
    finally:
        stop.set()
        for t in background:
            t.join(10)
    assert errors == []
    assert nudges["tick"] > 0 and nudges["reconcile"] > 0
    assert r.outcome == Outcome.COMPLETED
    assert all(b["dispatch_seq"] == 1 for b in batches(dsn, tenant, "job"))
    assert_complete(engine, "job", ds, spec)


def test_completed_job_stays_completed_on_further_nudges(engine, dsn, tenant, redis_url) -> None:
    ds, spec = setup_job(engine, "job")
    r = drive(engine, dsn, tenant, "job")
    assert r.outcome == Outcome.COMPLETED
    with tenant_conn(dsn, tenant) as conn:
        before = conn.execute(Q("job_get"), {"job_id": "job"}).fetchone()
    snapshot = waves(dsn, tenant, "job")
    n_launched = len(launched(engine))
    last = r.runs[-1].batch

    results = [engine.check("job", "tick") for _ in range(3)]
    results.append(engine.listener.on_completions("job", [last.batch_id]))
    results.append(engine.listener.on_failed("job", last.batch_id, last.dispatch_seq, "late"))
    report = engine.recovery.reconcile("job")
    assert report.result is not None
    results.append(report.result)
    assert report.demoted == report.requeued == report.failed == 0
    retry = engine.recovery.retry_failed("job")
    assert retry.requeued == 0 and retry.result is not None
    results.append(retry.result)

    for res in results:
        assert res.outcome == Outcome.COMPLETED
        assert res.dispatched == [] and res.derived_created == 0
    assert len(launched(engine)) == n_launched
    with tenant_conn(dsn, tenant) as conn:
        after = conn.execute(Q("job_get"), {"job_id": "job"}).fetchone()
    assert after is not None and before is not None
    assert after["status"] == "completed"
    assert after["completed_at"] == before["completed_at"]
    assert waves(dsn, tenant, "job") == snapshot
    assert job_status(dsn, tenant, "job") == "completed"
    assert flag_ttl(redis_url, tenant, "job", MONITORING) == -2
    assert_complete(engine, "job", ds, spec)
    assert EXIT_OK == 0
