"""When a coordinator run creates derived batches (`decide.derivation`), on real PostgreSQL.

Data: 1,000 orders in 10 SalesOrder batches of 100, their lines in derived batches of about 250
records (two or three per parent batch); parallelism 2.
"""

from __future__ import annotations

from typing import Any

import pytest

from helpers import (
    LINE,
    SALES_ORDER,
    assert_complete,
    batches,
    drive,
    run_and_notify,
    setup_job,
    waves,
)
from importwaves.engine.model import Outcome
from importwaves.worker import EXIT_OK

pytestmark = pytest.mark.integration

LAST_PARENT = "SalesOrder-000009"


def _parents(dsn: str, tenant: str) -> dict[str, dict[str, Any]]:
    return {
        b["batch_id"]: b for b in batches(dsn, tenant, "job") if b["record_type_id"] == SALES_ORDER
    }


def test_the_threshold_crossing_dispatches_before_it_creates(
    engine: Any, dsn: str, tenant: str
) -> None:
    ds, spec = setup_job(engine, "job", orders=1000, parallelism=2)
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.batch_id != LAST_PARENT)
    assert r.stalled and [b.batch_id for b in r.held] == [LAST_PARENT]
    parents = _parents(dsn, tenant)
    # The gate is closed (9 of 10) and its last parent batches may all be running (at most 2
    # are left to complete: the parallelism): the runs of the 8th and 9th completions left
    # their derived batches to the run that sees the threshold crossed. Enough derived batches
    # of earlier parents are pending to fill the slots.
    waiting = sorted(
        b for b, p in parents.items() if p["needs_derivation"] and p["status"] == "completed"
    )
    assert waiting == ["SalesOrder-000007", "SalesOrder-000008"]
    assert parents[LAST_PARENT]["status"] == "dispatched"
    w = waves(dsn, tenant, "job")[LINE]
    assert w["pending_batches"] == w["total_batches"] >= spec.parallelism
    assert w["first_dispatched_at"] is None

    # The last parent completes: its call dispatches the pending derived batches of earlier
    # parents and commits, then (a second run) creates the three parents' derived batches.
    wr, result = run_and_notify(engine, dsn, tenant, "job", r.held[0])
    assert wr.exit_code == EXIT_OK and result is not None
    assert result.outcome == Outcome.DERIVED_WAVE_TRIGGERED and result.derivation_deferred
    derived_dispatched = [b for b in result.dispatched if b.record_type_id == LINE]
    assert len(derived_dispatched) == spec.parallelism
    late = {"SalesOrder-000007", "SalesOrder-000008", LAST_PARENT}
    # a derived batch id is TransactionLine-<its parent batch id>-<group>
    assert all(
        b.batch_id.split("-", 1)[1].rsplit("-", 1)[0] not in late for b in derived_dispatched
    )
    assert result.derived_created > 0
    parents = _parents(dsn, tenant)
    assert not any(p["needs_derivation"] for p in parents.values())
    first = waves(dsn, tenant, "job")[LINE]["first_dispatched_at"]
    assert first is not None
    assert all(first < parents[b]["derived_created_at"] for b in late)

    # Nothing was lost on the way: the import completes with every row.
    done = drive(engine, dsn, tenant, "job")
    assert done.outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)
