"""The operator's API economy: one WaveDispatched Event per wave (not one per refill), and a worker
Job's later watch events (its deletion) are not recorded, deleted and refreshed a second time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client

from importwaves.engine.coordinator import RunResult
from importwaves.engine.model import (
    DERIVED,
    MAIN,
    Decision,
    GuardReport,
    JobStatus,
    Outcome,
    Snapshot,
    WaveState,
)
from importwaves.k8s import operator as k8s_operator
from importwaves.k8s.crd import ImportJobSpec
from importwaves.k8s.jobs import (
    ANN_BATCH,
    ANN_JOB_ID,
    ANN_SECRET,
    ANN_SEQ,
    ANN_TENANT,
)
from importwaves.k8s.operator import ImportJobOperator, _run_events
from importwaves.launch.base import BatchDispatch
from importwaves.settings import Settings
from spec_cases import base_crd_spec

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def snap(first_dispatched: dict[int, datetime | None]) -> Snapshot:
    waves = tuple(
        WaveState(n, -n, f"W{n}", DERIVED if n == 3 else MAIN, total=10, first_dispatched_at=t)
        for n, t in first_dispatched.items()
    )
    return Snapshot("j", JobStatus.RUNNING, False, 4, waves)


def run(s: Snapshot, *waves: int) -> RunResult:
    dispatched = [BatchDispatch("j", f"b{i}", w, -w, 1, 1) for i, w in enumerate(waves)]
    return RunResult("j", Outcome.WAVE_TRIGGERED, "", dispatched, snapshot=s)


def messages(result: RunResult) -> list[str]:
    return [e.message for e in _run_events(result, None) if e.reason == "WaveDispatched"]


def test_wave_dispatched_once_when_the_wave_starts() -> None:
    assert messages(run(snap({1: None, 2: None}), 1, 1, 1)) == [
        "dispatched 3 batch(es) of wave 1 (W1)"
    ]


def test_no_event_for_refills_of_a_running_wave() -> None:
    # Each completion dispatches the next batch of the wave: no Event per batch.
    assert messages(run(snap({1: T0, 2: None}), 1)) == []


def test_only_the_waves_starting_in_this_run() -> None:
    s = snap({1: T0, 2: T0, 3: None})
    assert messages(run(s, 2, 3, 3)) == ["dispatched 2 batch(es) of wave 3 (W3, derived)"]


def test_finish_events_once_per_transition() -> None:
    from importwaves.k8s.operator import finish_events

    running = {"summary": "DerivedPending"}
    done = {"summary": "Completed", "rowsImported": 100004, "duration": "3m12s"}
    [e] = finish_events(running, done)
    assert (e.type, e.reason) == ("Normal", "ImportCompleted")
    assert e.message == (
        "import completed: every batch of every wave completed, 100,004 row(s) imported in 3m12s"
    )
    assert finish_events(done, done) == []  # a later write of the same summary: nothing
    [f] = finish_events(running, {"summary": "Failed", "message": "2 batch(es) failed"})
    assert (f.type, f.reason, f.message) == (
        "Warning",
        "ImportFailed",
        "import failed: 2 batch(es) failed",
    )
    assert finish_events({}, {"summary": "Running"}) == []


def test_worker_job_sync_events_read_as_routine() -> None:
    from importwaves.k8s.events import KubeEvent
    from importwaves.k8s.operator import _plain

    e = _plain(KubeEvent("Normal", "JobsAdopted", "created 2 missing worker Job(s)"))
    assert (e.type, e.reason) == ("Normal", "WorkerJobsCreated")
    other = KubeEvent("Warning", "RecoveryAction", "x")
    assert _plain(other) is other


def test_without_a_snapshot_every_dispatch_is_reported() -> None:
    r = RunResult("j", Outcome.WAVE_TRIGGERED, "", [BatchDispatch("j", "b", 2, -2, 1, 1)])
    assert messages(r) == ["dispatched 1 batch(es) of wave 2"]


def finished_job(uid: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "ij-abc-1",
            "namespace": "ns",
            "uid": uid,
            "annotations": {
                ANN_JOB_ID: "j",
                ANN_BATCH: "b1",
                ANN_SEQ: "1",
                ANN_TENANT: "t",
                ANN_SECRET: "db",
            },
            "ownerReferences": [
                {
                    "apiVersion": "importwaves.io/v1alpha1",
                    "kind": "ImportJob",
                    "name": "ij",
                    "uid": "ij-uid",
                    "controller": True,
                }
            ],
        },
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }


def owner_spec() -> ImportJobSpec:
    return ImportJobSpec.model_validate({**base_crd_spec("t"), "importId": "j"})


def test_a_finished_job_is_recorded_and_deleted_once(monkeypatch: Any) -> None:
    op = ImportJobOperator(Settings(), client.ApiClient())
    calls: list[str] = []
    result = RunResult("j", Outcome.IN_PROGRESS)
    monkeypatch.setattr(
        op, "_owning_importjob", lambda ns, name, uid: calls.append("owner") or owner_spec()
    )
    monkeypatch.setattr(op, "engine_for", lambda *a, **k: object())
    monkeypatch.setattr(op, "_record", lambda *a: calls.append("record") or result)
    monkeypatch.setattr(op, "_delete_job", lambda ns, name: calls.append("delete"))

    done = op.on_job_finished(finished_job("u1"))
    assert done is not None and (done.namespace, done.name, done.result) == ("ns", "ij", result)
    assert calls == ["owner", "record", "delete"]
    # The same Job's later events (deletion: MODIFIED, DELETED) change nothing.
    assert op.on_job_finished(finished_job("u1")) is None
    assert op.on_job_finished(finished_job("u1")) is None
    assert calls == ["owner", "record", "delete"]
    # Another Job object (a new uid, even with the same name) is recorded.
    assert op.on_job_finished(finished_job("u2")) is not None
    assert calls.count("record") == 2


def test_a_failed_record_or_delete_is_retried_on_the_next_event(monkeypatch: Any) -> None:
    op = ImportJobOperator(Settings(), client.ApiClient())
    calls: list[str] = []
    monkeypatch.setattr(op, "_owning_importjob", lambda ns, name, uid: owner_spec())
    monkeypatch.setattr(op, "engine_for", lambda *a, **k: object())
    monkeypatch.setattr(
        op, "_record", lambda *a: calls.append("record") or RunResult("j", Outcome.IN_PROGRESS)
    )

    def delete(ns: str, name: str) -> None:
        calls.append("delete")
        if calls.count("delete") == 1:
            raise client.ApiException(status=500)

    monkeypatch.setattr(op, "_delete_job", delete)
    with pytest.raises(client.ApiException):
        op.on_job_finished(finished_job("u1"))
    assert op.on_job_finished(finished_job("u1")) is not None
    assert calls == ["record", "delete", "record", "delete"]


def test_the_memory_of_recorded_jobs_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(k8s_operator, "RECORDED_JOBS_KEPT", 3)
    op = ImportJobOperator(Settings(), client.ApiClient())
    monkeypatch.setattr(op, "_owning_importjob", lambda ns, name, uid: owner_spec())
    monkeypatch.setattr(op, "engine_for", lambda *a, **k: object())
    monkeypatch.setattr(op, "_record", lambda *a: RunResult("j", Outcome.IN_PROGRESS))
    monkeypatch.setattr(op, "_delete_job", lambda ns, name: None)
    for i in range(10):
        op.on_job_finished(finished_job(f"u{i}"))
    assert len(op._recorded) == 3


def guard_run(job_id: str) -> RunResult:
    """A run that found the main waves done with derived batches left (the completion guard)."""
    guard = GuardReport(
        main_done=True,
        derived_unfinished=4,
        derived_active=0,
        awaiting_derivation=0,
        gates_open=True,
    )
    decision = Decision(Outcome.DERIVED_PENDING, "main waves done", guard=guard)
    return RunResult(job_id, Outcome.DERIVED_PENDING, "", decision=decision)


def test_completion_guard_event_once_per_import_whichever_path_ran_it() -> None:
    # The NOTIFY prompt (no status at hand), a Job event and a reconcile may each be the run
    # that first finds the main waves done: the Event is posted once, by the first of them.
    op = ImportJobOperator(Settings(), client.ApiClient())
    reasons = [
        [e.reason for e in op._events_for(guard_run("j1"), summary)]
        for summary in (None, "Running", None)
    ]
    assert reasons == [["CompletionGuard"], [], []]
    assert [e.message for e in op._events_for(guard_run("j2"), "Running")] == [
        "main waves done; not completing: 4 derived batch(es) pending or active"
    ]
    # a status that already says DerivedPending (an operator restarted mid-import): none
    assert op._events_for(guard_run("j3"), "DerivedPending") == []
    op.close()
