"""Redis is a fast path, never the truth: imports complete with every row whatever happens to it.

FLUSHALL mid-import, Redis stopped and restarted mid-import, Redis down for a whole import (or
not configured), and the flag TTL expiring between the parents' completion and the derived
dispatch.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from helpers import (
    DERIVED_READY,
    LINE,
    MONITORING,
    SALES_ORDER,
    assert_complete,
    batches,
    drive,
    flag_ttl,
    last_batch_id,
    launched,
    redis_client,
    setup_job,
    wait_until,
)
from importwaves.engine.model import Outcome
from importwaves.localdev import LocalRedis
from importwaves.worker import EXIT_OK, WorkItem, run_batch

pytestmark = pytest.mark.integration


def test_flushall_mid_import(engine, dsn, tenant, redis_url) -> None:
    ds, spec = setup_job(engine, "job", orders=400)
    client = redis_client(redis_url)
    flushes = []

    def flush(n: int, run) -> None:
        if n % 4 == 0:  # every fourth batch: parents, the last parent, derived alike
            assert client.flushall()
            flushes.append(run.batch.record_type_id)

    r = drive(engine, dsn, tenant, "job", after_step=flush)
    assert r.outcome == Outcome.COMPLETED
    assert {SALES_ORDER, LINE} <= set(flushes)
    assert_complete(engine, "job", ds, spec)
    assert flag_ttl(redis_url, tenant, "job", MONITORING) == -2


def test_redis_stopped_and_restarted_mid_import(
    engine, dsn, tenant, redis_server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="importwaves.flags")
    ds, spec = setup_job(engine, "job")
    engine.check("job", "plan")
    last = last_batch_id(dsn, tenant, "job", SALES_ORDER)
    events = []

    def outage(n: int, run) -> None:
        if n == 1:  # after the Customer batch: the parents run without Redis
            redis_server.stop()
            events.append("stopped")
        elif run.batch.batch_id == last:
            redis_server.start()
            events.append("started")

    r = drive(engine, dsn, tenant, "job", after_step=outage, timeout=30)
    assert events == ["stopped", "started"]
    assert r.outcome == Outcome.COMPLETED
    logged = [rec.getMessage() for rec in caplog.records]
    assert "cache_unavailable_fallback_to_db" in logged  # the outage was seen, and survived
    assert_complete(engine, "job", ds, spec)


def test_frozen_redis_mid_import_costs_timeouts_not_a_hang(
    engine, dsn, tenant, redis_server, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP the real redis-server: connections still open (the kernel accepts them) but no
    command is ever answered. Every flag call must give up after its socket timeout."""
    caplog.set_level(logging.INFO, logger="importwaves.flags")
    ds, spec = setup_job(engine, "job")
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    frozen = []

    def freeze(n: int, run) -> None:
        if n == 1:
            os.kill(pid, signal.SIGSTOP)
            frozen.append(time.monotonic())

    try:
        t0 = time.monotonic()
        r = drive(engine, dsn, tenant, "job", after_step=freeze, timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert frozen and r.outcome == Outcome.COMPLETED
    assert elapsed < 15, f"import with a frozen Redis took {elapsed:.1f}s"
    assert "cache_unavailable_fallback_to_db" in [rec.getMessage() for rec in caplog.records]
    assert_complete(engine, "job", ds, spec)


@pytest.mark.parametrize("configured", [True, False])
def test_whole_import_with_redis_down_does_not_hang(
    engines, dsn, tenant, tmp_path, configured: bool
) -> None:
    if configured:  # the URL of a Redis that was running and is now stopped
        dead = LocalRedis(tmp_path / "redis").start()
        url: str | None = dead.url
        dead.stop()
    else:
        url = None
    engine = engines(url=url)
    t0 = time.monotonic()
    ds, spec = setup_job(engine, "job")
    r = drive(engine, dsn, tenant, "job", timeout=30)
    elapsed = time.monotonic() - t0
    assert r.outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)
    assert elapsed < 15, f"import with Redis down took {elapsed:.1f}s"
    assert engine.flags.monitoring("job") is None  # unknown, never an error
    assert engine.flags.enabled is configured


def test_flag_ttl_expires_between_parent_completion_and_derived_dispatch(
    engines, dsn, tenant, redis_url, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="importwaves")
    engine = engines(flag_ttl=2)
    ds, spec = setup_job(engine, "job")
    engine.check("job", "plan")
    last = last_batch_id(dsn, tenant, "job", SALES_ORDER)
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.batch_id != last)
    # The last parent batch completes (its worker commits); its completion event is not
    # processed before every cached key of the job has expired.
    assert run_batch(WorkItem(dsn, tenant, "job", last, r.held[0].dispatch_seq)).exit_code == (
        EXIT_OK
    )
    client = redis_client(redis_url)
    assert client.keys(f"importwaves:{tenant}:job:*")  # the monitoring flags
    wait_until(
        lambda: client.keys(f"importwaves:{tenant}:job:*") == [],
        timeout=6,
        every=0.1,
        what="flags to expire",
    )
    assert launched(engine, LINE) == []

    res = engine.check("job", "tick")
    assert res.outcome == Outcome.DERIVED_WAVE_TRIGGERED
    assert len(res.dispatched) == spec.parallelism
    assert all(b.record_type_id == LINE for b in res.dispatched)
    # The last parent's derived batches were created (ids from its row); the flags were
    # restored from the DB state.
    upserts = [
        rec.__dict__
        for rec in caplog.records
        if rec.getMessage() == "derived_batches_upserted"
        and rec.__dict__["parent_batch_id"] == last
    ]
    assert len(upserts) == 1 and upserts[0]["created_batches"] > 0
    assert any(b["parent_batch_id"] == last for b in batches(dsn, tenant, "job"))
    assert any(rec.getMessage() == "derived_ready_flag_restored_from_db" for rec in caplog.records)
    assert 0 < client.pttl(f"importwaves:{tenant}:job:{DERIVED_READY}") <= 2000
    assert 0 < client.pttl(f"importwaves:{tenant}:job:{MONITORING}") <= 2000

    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)
