"""Specs against a real tenant: invalid specs touch nothing, resubmission is idempotent, runtime
fields change a running import, plan-shaping fields are refused, suspend and resume."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import (
    CUSTOMER,
    SALES_ORDER,
    assert_complete,
    batches,
    drive,
    job_status,
    launched,
    rows_by_type,
    setup_job,
    small_spec,
    stage,
    tenant_conn,
    wait_until,
)
from importwaves.db.queries import Q
from importwaves.engine.jobs import SpecChangeRefused
from importwaves.engine.model import Outcome
from importwaves.spec import SpecError, parse_spec
from importwaves.worker import EXIT_FENCED, EXIT_OK, WorkItem, run_batch

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"derivedTypes": [{"name": "TransactionLine", "parentTypes": ["Invoice"]}]},
            "derivedTypes.0.parentTypes",
        ),
        ({"completionThreshold": 0}, "completionThreshold"),
        ({"completionThreshold": 101}, "completionThreshold"),
        (
            {"recordTypes": [{"name": "Customer", "recordTypeId": -2, "batchSize": 0}]},
            "recordTypes.0.batchSize",
        ),
        (
            {
                "recordTypes": [
                    {"name": "A", "recordTypeId": -2, "parentTypes": ["B"]},
                    {"name": "B", "recordTypeId": -30, "parentTypes": ["A"]},
                ],
                "derivedTypes": [],
            },
            "recordTypes.parentTypes",
        ),
    ],
)
def test_invalid_spec_is_refused_before_touching_the_tenant(
    engine, dsn, tenant, change: dict, field: str
) -> None:
    data = small_spec(tenant).model_dump(mode="json")
    data.update(change)
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert any(p.startswith(f"{field}:") for p in info.value.problems), info.value.problems
    with tenant_conn(dsn, tenant) as conn:
        assert conn.execute(Q("job_list")).fetchall() == []


def test_submit_is_idempotent_and_checks_the_tenant(engine, dsn, tenant) -> None:
    spec = small_spec(tenant)
    assert engine.submit("job", spec) is True
    assert engine.submit("job", spec) is False
    with pytest.raises(ValueError, match="does not match engine tenant"):
        engine.submit("job2", small_spec("someone_else"))
    with tenant_conn(dsn, tenant) as conn:
        assert [r["job_id"] for r in conn.execute(Q("job_list")).fetchall()] == ["job"]
    assert engine.check("nope").outcome == Outcome.NOT_FOUND


def test_spec_changes_before_and_after_planning(engine, dsn, tenant, redis_url) -> None:
    stage(dsn, tenant, "job", 300)
    engine.submit("job", small_spec(tenant))
    # Not planned yet: the batch size may still change, and the plan uses the new one.
    smaller = small_spec(
        tenant,
        recordTypes=[
            {"name": "Customer", "recordTypeId": CUSTOMER, "batchSize": 10},
            {
                "name": "SalesOrder",
                "recordTypeId": SALES_ORDER,
                "batchSize": 50,
                "parentTypes": ["Customer"],
            },
        ],
        parallelism=1,
    )
    assert engine.submit("job", smaller) is False
    first = engine.check("job", "start")
    assert len(first.dispatched) == 1  # parallelism 1
    counts = rows_by_type(dsn, tenant, "job")
    assert (counts[CUSTOMER], counts[SALES_ORDER]) == (3, 6)

    # Planned: plan-shaping fields are refused, and the stored spec is left as it was.
    with pytest.raises(SpecChangeRefused) as info:
        engine.submit("job", small_spec(tenant, parallelism=1))
    assert info.value.problems[0].startswith("recordTypes cannot change")
    assert engine.job("job")["spec"]["recordTypes"][0]["batchSize"] == 10

    # Runtime fields apply to the running import: more parallelism, more dispatched at once.
    wider = smaller.model_copy(update={"parallelism": 3})
    assert engine.submit("job", wider) is False
    assert engine.job("job")["spec"]["parallelism"] == 3
    res = engine.check("job", "tick")
    assert len(res.dispatched) == 2
    ds = stage(dsn, tenant, "job", 300)  # same rows again: ON CONFLICT, nothing new
    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, wider)


def test_suspend_stops_dispatch_and_resume_completes(engine, dsn, tenant, redis_url) -> None:
    ds, spec = setup_job(engine, "job")
    suspended = spec.model_copy(update={"suspend": True})
    resumed = spec.model_copy(update={"suspend": False})
    (b,) = engine.check("job", "start").dispatched
    assert engine.submit("job", suspended) is False
    res = engine.check("job", "tick")
    assert res.outcome == Outcome.SUSPENDED and res.dispatched == []
    assert job_status(dsn, tenant, "job") == "suspended"
    # A dispatch no worker took is released (no attempt): nothing counts as running, and the
    # late worker of that dispatch is fenced out.
    row = next(r for r in batches(dsn, tenant, "job") if r["batch_id"] == b.batch_id)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert run_batch(WorkItem(dsn, tenant, "job", b.batch_id, b.dispatch_seq)).exit_code == (
        EXIT_FENCED
    )

    assert engine.submit("job", resumed) is False
    (b2,) = engine.check("job", "tick").dispatched
    assert b2.batch_id == b.batch_id and job_status(dsn, tenant, "job") == "running"
    # A batch in a worker's hands when the job is suspended finishes; nothing new is dispatched.
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            run_batch,
            WorkItem(dsn, tenant, "job", b2.batch_id, b2.dispatch_seq),
            hold_seconds=1.0,
        )
        wait_until(
            lambda: any(
                r["batch_id"] == b2.batch_id and r["status"] == "processing"
                for r in batches(dsn, tenant, "job")
            ),
            what="the worker claimed the batch",
        )
        assert engine.submit("job", suspended) is False
        res = engine.check("job", "tick")
        assert res.outcome == Outcome.SUSPENDED and res.dispatched == []
        row = next(r for r in batches(dsn, tenant, "job") if r["batch_id"] == b2.batch_id)
        assert (row["status"], row["dispatch_seq"]) == ("processing", b2.dispatch_seq)
        assert held.result(30).exit_code == EXIT_OK
    after = engine.listener.on_worker_exited_ok("job", b2.batch_id, b2.dispatch_seq)
    assert after is not None and after.outcome == Outcome.SUSPENDED
    assert len(launched(engine)) == 2
    assert job_status(dsn, tenant, "job") == "suspended"

    assert engine.submit("job", resumed) is False
    res = engine.check("job", "tick")
    assert res.outcome == Outcome.WAVE_TRIGGERED and res.dispatched
    assert job_status(dsn, tenant, "job") == "running"
    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, resumed)
