"""Issue 13 on a real tenant: a failed attempt's batch waits its back-off before it is dispatched
again; a deleted ImportJob's job is cancelled with its batches released and reopens when
submitted again; a refused spec change is recorded in the job row and cleared on acceptance."""

from __future__ import annotations

import time
from typing import Any

import pytest

from helpers import (
    assert_verified,
    counters_mismatch,
    drive,
    expected_batches,
    job_status,
    launched,
    rows_by_type,
    setup_job,
    tenant_conn,
    wait_until,
)
from importwaves.db.queries import Q
from importwaves.engine.jobs import SpecChangeRefused
from importwaves.engine.model import Outcome
from importwaves.worker import EXIT_FENCED, WorkItem, run_batch

pytestmark = pytest.mark.integration


def batch(dsn: str, tenant: str, job_id: str, batch_id: str) -> dict[str, Any]:
    with tenant_conn(dsn, tenant) as conn:
        row = conn.execute(
            "SELECT status, attempts, dispatch_seq, last_error, retry_after, "
            "extract(epoch FROM retry_after - updated_at)::float AS wait "
            "FROM wave_batches WHERE job_id = %s AND batch_id = %s",
            (job_id, batch_id),
        ).fetchone()
    assert row is not None
    return row


def test_a_failed_batch_waits_its_backoff_then_is_dispatched_again(engine, dsn, tenant) -> None:
    setup_job(engine, "job", retries=5, retryBackoff={"baseSeconds": 1.5, "capSeconds": 2.5})
    engine.check("job")
    b = launched(engine)[0]

    t0 = time.monotonic()
    result = engine.listener.on_failed("job", b.batch_id, b.dispatch_seq, "boom: upstream")
    row = batch(dsn, tenant, "job", b.batch_id)
    assert (row["status"], row["attempts"], row["dispatch_seq"]) == ("pending", 1, 1)
    assert row["wait"] == pytest.approx(1.5, abs=0.05)  # base * 2^0
    # the run that recorded the failure did not dispatch it again; nor does a nudge now
    assert all(d.batch_id != b.batch_id for d in result.dispatched)
    engine.check("job")
    assert batch(dsn, tenant, "job", b.batch_id)["dispatch_seq"] == 1

    def redispatched() -> bool:
        engine.check("job")
        return batch(dsn, tenant, "job", b.batch_id)["dispatch_seq"] == 2

    wait_until(redispatched, timeout=10, every=0.1, what="the re-dispatch after the back-off")
    assert time.monotonic() - t0 >= 1.4

    # second failure: base * 2^1 = 3 s, capped at 2.5 s
    engine.listener.on_failed("job", b.batch_id, 2, "boom again")
    row = batch(dsn, tenant, "job", b.batch_id)
    assert (row["status"], row["attempts"]) == ("pending", 2)
    assert row["wait"] == pytest.approx(2.5, abs=0.05)


def test_the_last_attempt_fails_without_waiting_and_retry_failed_clears_the_backoff(
    engine, dsn, tenant
) -> None:
    setup_job(engine, "job", retries=0, retryBackoff={"baseSeconds": 30, "capSeconds": 60})
    engine.check("job")
    b = launched(engine)[0]
    engine.listener.on_failed("job", b.batch_id, b.dispatch_seq, "boom")
    assert batch(dsn, tenant, "job", b.batch_id)["status"] == "failed"
    engine.recovery.retry_failed("job")
    row = batch(dsn, tenant, "job", b.batch_id)
    assert row["retry_after"] is None
    assert row["dispatch_seq"] == 2  # dispatched again at once, no 30 s wait


def test_cancel_releases_batches_and_a_resubmit_resumes(engine, dsn, tenant) -> None:
    ds, spec = setup_job(engine, "job")
    engine.check("job")
    first = launched(engine)
    assert first
    # one batch claimed by a worker (processing), the rest dispatched
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            Q("batch_claim"),
            {
                "job_id": "job",
                "batch_id": first[0].batch_id,
                "dispatch_seq": first[0].dispatch_seq,
                "worker_id": "w1",
            },
        )
    released = engine.cancel("job", "its ImportJob was deleted")
    assert released is not None
    assert sorted(released) == sorted(b.batch_id for b in first)
    assert job_status(dsn, tenant, "job") == "cancelled"
    for b in first:
        row = batch(dsn, tenant, "job", b.batch_id)
        assert (row["status"], row["dispatch_seq"]) == ("pending", b.dispatch_seq + 1)
        assert "its ImportJob was deleted" in row["last_error"]
    # nothing moves while cancelled: no dispatch, and a late worker of the old dispatch is
    # fenced out
    n = len(engine.launcher.launched)
    assert engine.check("job").outcome == Outcome.CANCELLED
    assert len(engine.launcher.launched) == n
    late = run_batch(WorkItem(dsn, tenant, "job", first[0].batch_id, first[0].dispatch_seq))
    assert late.exit_code == EXIT_FENCED
    assert engine.cancel("job", "again") is None  # already cancelled: nothing to do

    # re-applied: reopened and resumed, to completion
    assert engine.submit("job", spec) is False
    assert job_status(dsn, tenant, "job") == "running"
    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    # every row imported, exact counters (assert_complete's dispatch-sequence check does not
    # apply: the release bumped the fencing token of batches it did not launch)
    assert_verified(dsn, tenant, "job", spec)
    assert dict(rows_by_type(dsn, tenant, "job")) == expected_batches(ds, spec)
    assert counters_mismatch(dsn, tenant, "job") == []
    assert engine.cancel("job", "deleted after completion") is None
    assert job_status(dsn, tenant, "job") == "completed"


def test_a_refused_spec_change_is_recorded_and_cleared(engine, dsn, tenant) -> None:
    _, spec = setup_job(engine, "job")
    engine.check("job")  # planned

    def refusal() -> tuple[str, Any]:
        with tenant_conn(dsn, tenant) as conn:
            row = conn.execute(Q("job_get"), {"job_id": "job"}).fetchone()
        assert row is not None
        return row["refusal"], row["refused_spec"]

    changed = spec.model_copy(update={"uncoveredRows": "Skip"})
    with pytest.raises(SpecChangeRefused, match="uncoveredRows cannot change"):
        engine.submit("job", changed)
    text, refused = refusal()
    assert text.startswith("spec change refused: uncoveredRows cannot change")
    assert refused["uncoveredRows"] == "Skip"
    # the stored spec is untouched; submitting it again (the change reverted) clears the refusal
    engine.submit("job", spec)
    assert refusal() == ("", None)


def test_a_stale_submit_neither_clears_a_refusal_nor_applies_an_older_spec(
    engine, dsn, tenant
) -> None:
    """A reconcile that started before an edit submits generation 1 after generation 2 was
    refused: it changes nothing (the refusal stays, every status still shows it). A new
    ImportJob of the same name (another uid, generation 1 again) is not stale."""
    _, spec = setup_job(engine, "job")
    engine.submit("job", spec, source=("uid-1", 1))
    engine.check("job")
    changed = spec.model_copy(update={"uncoveredRows": "Skip"})
    with pytest.raises(SpecChangeRefused):
        engine.submit("job", changed, source=("uid-1", 2))

    def row() -> dict[str, Any]:
        with tenant_conn(dsn, tenant) as conn:
            r = conn.execute(Q("job_lock"), {"job_id": "job"}).fetchone()
        assert r is not None
        return r

    assert engine.submit("job", spec, source=("uid-1", 1)) is False  # stale: no change
    assert row()["refusal"].startswith("spec change refused")
    assert (row()["spec_uid"], row()["spec_generation"]) == ("uid-1", 2)
    # the edit reverted (generation 3): accepted, refusal cleared
    engine.submit("job", spec, source=("uid-1", 3))
    assert row()["refusal"] == ""
    # another ImportJob object (re-created: new uid, generation 1) is heard
    with pytest.raises(SpecChangeRefused):
        engine.submit("job", changed, source=("uid-2", 1))
    assert (row()["spec_uid"], row()["spec_generation"]) == ("uid-2", 1)
