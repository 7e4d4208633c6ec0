"""Seed D: derived batches created OUTSIDE a coordinator run are dispatched at once.

The DerivedWavesCreated handler (engine/listener.py DerivedWavesCreatedListener) runs the
coordinator when the event says no run has decided on the new batches yet (decided=False). Here
the last parent batch is completed by its worker alone (its notice lost: no coordinator run), so
its derived batches do not exist and the gate's opening went unseen; then they are created
outside any coordinator run and the event is emitted through the engine's bus, by any producer
(first test) and by the engine's own producer, recovery's reconcile (second test).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from helpers import LINE, batches, drive, launched, setup_job, tenant_conn, waves
from importwaves.engine import derived
from importwaves.engine.events import DerivedWavesCreated
from importwaves.engine.model import Outcome
from importwaves.worker import EXIT_OK, WorkItem, run_batch

pytestmark = pytest.mark.integration

LAST_PARENT = "SalesOrder-000002"


def _parents_done_without_a_run(engine: Any, dsn: str, tenant: str) -> Any:
    """Every batch but the last parent's run with their notices; the last parent's worker
    commits its completion and nobody is told. Returns the spec."""
    _, spec = setup_job(engine, "job")
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.batch_id != LAST_PARENT)
    [last] = r.held
    assert run_batch(WorkItem(dsn, tenant, "job", last.batch_id, last.dispatch_seq)).exit_code == (
        EXIT_OK
    )
    rows = {b["batch_id"]: b for b in batches(dsn, tenant, "job")}
    assert rows[LAST_PARENT]["status"] == "completed"
    assert rows[LAST_PARENT]["needs_derivation"]  # nobody derived it
    assert launched(engine, LINE) == []  # threshold 100: the gate opened unseen
    return spec


def _handled(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        rec.__dict__
        for rec in caplog.records
        if rec.getMessage() == "derived_waves_created_handled"
    ]


def test_derived_created_outside_a_run_are_dispatched_by_the_handlers_run(
    engine, dsn, tenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="importwaves.listener")
    spec = _parents_done_without_a_run(engine, dsn, tenant)
    with tenant_conn(dsn, tenant) as conn, conn.transaction():
        created = derived.create_for_completed_parents(conn, "job", spec)
    assert created.batch_ids and created.parent_batches == 1
    assert launched(engine, LINE) == []  # created, committed, not dispatched
    caplog.clear()  # the earlier parents' derived batches were decided in their runs

    engine.bus.emit(
        DerivedWavesCreated(
            tenant,
            "job",
            tuple(sorted(created.wave_numbers)),
            len(created.batch_ids),
            source="outside",
            decided=False,
        )
    )

    # the handler's coordinator run dispatched them at once, up to the parallelism
    assert len(launched(engine, LINE)) == spec.parallelism
    assert waves(dsn, tenant, "job")[LINE]["dispatched_batches"] == spec.parallelism
    [h] = _handled(caplog)
    assert h["nudged"] is True
    assert h["source"] == "outside"
    assert h["batch_count"] == len(created.batch_ids)
    assert h["outcome"] == Outcome.DERIVED_WAVE_TRIGGERED.value
    assert h["dispatched_batch_count"] == spec.parallelism


def test_reconcile_creates_the_missing_derived_batches_and_the_handler_dispatches_them(
    engine, dsn, tenant, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine's own producer of decided=False: recovery creates them in its transaction."""
    caplog.set_level(logging.INFO, logger="importwaves.listener")
    spec = _parents_done_without_a_run(engine, dsn, tenant)
    caplog.clear()

    report = engine.recovery.reconcile("job")

    assert report.derived_created > 0, report.actions
    assert any(a.startswith(f"created {report.derived_created} derived") for a in report.actions)
    rows = {b["batch_id"]: b for b in batches(dsn, tenant, "job")}
    assert not rows[LAST_PARENT]["needs_derivation"]
    assert any(b["parent_batch_id"] == LAST_PARENT for b in rows.values())
    [h] = _handled(caplog)
    assert (h["nudged"], h["source"], h["batch_count"]) == (
        True,
        "reconcile",
        report.derived_created,
    )
    # the handler's run dispatched them, before the reconcile's own progression check ran
    assert h["dispatched_batch_count"] == spec.parallelism
    assert len(launched(engine, LINE)) == spec.parallelism
    assert report.result is not None and report.result.dispatched == []
