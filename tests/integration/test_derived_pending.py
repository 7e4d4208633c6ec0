"""Main waves finish while derived batches are pending: the job is not completed, monitoring
stays on, derived batches are dispatched; completion (and clearing monitoring) only at the end."""

from __future__ import annotations

import pytest

from helpers import (
    CUSTOMER,
    DERIVED_READY,
    LINE,
    MONITORING,
    SALES_ORDER,
    assert_complete,
    batch_counts,
    drive,
    expected_batches,
    flag_ttl,
    job_status,
    launched,
    setup_job,
    tenant_conn,
    waves,
)
from importwaves.db.queries import Q
from importwaves.engine.model import Outcome

pytestmark = pytest.mark.integration


def test_main_done_with_derived_pending_keeps_job_running_until_derived_finish(
    engine, dsn, tenant, redis_url
) -> None:
    ds, spec = setup_job(engine, "job", orders=500, parallelism=3)
    want = expected_batches(ds, spec)
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.record_type_id != LINE)
    assert r.stalled

    # Every main batch completed ...
    counts = batch_counts(dsn, tenant, "job")
    assert counts[(CUSTOMER, "completed")] == want[CUSTOMER]
    assert counts[(SALES_ORDER, "completed")] == want[SALES_ORDER]
    # ... the derived wave is dispatched (up to the cap) with the rest pending ...
    w = waves(dsn, tenant, "job")[LINE]
    assert w["total_batches"] == want[LINE]
    assert w["dispatched_batches"] == 3
    assert w["pending_batches"] == want[LINE] - 3
    assert w["first_dispatched_at"] is not None
    assert len(launched(engine, LINE)) == 3
    # ... and the job is not completed; monitoring and derived-ready flags are on, with a TTL.
    assert job_status(dsn, tenant, "job") == "running"
    with tenant_conn(dsn, tenant) as conn:
        job = conn.execute(Q("job_get"), {"job_id": "job"}).fetchone()
        unfinished = conn.execute(Q("unfinished_by_type"), {"job_id": "job"}).fetchall()
    assert job is not None and job["completed_at"] is None
    assert {(u["record_type_id"], u["status"]) for u in unfinished} == {
        (LINE, "dispatched"),
        (LINE, "pending"),
    }
    assert 0 < flag_ttl(redis_url, tenant, "job", MONITORING) <= engine.flags.ttl
    assert flag_ttl(redis_url, tenant, "job", DERIVED_READY) > 0

    res = engine.check("job", "tick")
    assert res.outcome == Outcome.DERIVED_PENDING
    assert "derived batch(es) pending or active" in res.reason

    # Derived batches finish: only now is the job completed and monitoring cleared.
    done = drive(engine, dsn, tenant, "job", include=r.held)
    assert done.outcome == Outcome.COMPLETED
    assert job_status(dsn, tenant, "job") == "completed"
    assert flag_ttl(redis_url, tenant, "job", MONITORING) == -2
    assert_complete(engine, "job", ds, spec)


def test_guard_refuses_completion_when_counters_say_done_but_rows_disagree(
    engine, dsn, tenant, redis_url
) -> None:
    """Second line of the completion guard: before completing, the coordinator looks at the
    batch rows themselves. Counters forged to say "all derived done" must not complete a job
    with pending derived batches."""
    setup_job(engine, "job")
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.record_type_id != LINE)
    assert r.held
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "UPDATE wave_coordination SET completed_batches = total_batches, "
            "pending_batches = 0, dispatched_batches = 0, processing_batches = 0 "
            "WHERE job_id = 'job' AND record_type_id = %s",
            (LINE,),
        )
        assert conn.execute(Q("counters_mismatch"), {"job_id": "job"}).fetchall()
    res = engine.check("job", "tick")
    assert res.outcome == Outcome.DERIVED_PENDING
    assert res.reason.startswith("not completing:")
    assert f"of type {LINE}" in res.reason
    assert job_status(dsn, tenant, "job") == "running"
    assert flag_ttl(redis_url, tenant, "job", MONITORING) > 0
