"""The operator's API economy: one WaveDispatched Event per wave (not one per refill); a worker
Job's event only prompts the worker sync of the ImportJob controlling it; one BatchFailed Event
per failed batch, naming it and its record type."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from importwaves.engine.coordinator import RunResult
from importwaves.engine.failures import FailedBatch
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
from importwaves.k8s.crd import ImportJobSpec
from importwaves.k8s.operator import (
    ImportJobOperator,
    _run_events,
    batch_failed_message,
    batch_retry_message,
)
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


def test_the_write_that_makes_a_status_invalid_posts_its_warning() -> None:
    from importwaves.k8s.operator import finish_events

    refused = {
        "summary": "Invalid",
        "conditions": [
            {"type": "Completed", "status": "False", "reason": "InProgress"},
            {
                "type": "Invalid",
                "status": "True",
                "reason": "SpecChangeRefused",
                "message": "Spec change refused: uncoveredRows cannot change",
            },
        ],
    }
    [w] = finish_events({"summary": "Running"}, refused)
    assert (w.type, w.reason, w.message) == (
        "Warning",
        "SpecChangeRefused",
        "Spec change refused: uncoveredRows cannot change",
    )
    # whoever writes the same refusal again (a timer tick, a Job-event refresh): nothing new
    assert finish_events(refused, refused) == []
    # a summary of Invalid without an Invalid=True condition posts nothing it cannot explain
    assert finish_events({"summary": "Running"}, {"summary": "Invalid", "conditions": []}) == []


def test_without_a_snapshot_every_dispatch_is_reported() -> None:
    r = RunResult("j", Outcome.WAVE_TRIGGERED, "", [BatchDispatch("j", "b", 2, -2, 1, 1)])
    assert messages(r) == ["dispatched 1 batch(es) of wave 2"]


def worker_job(owner_uid: str = "ij-uid") -> dict[str, Any]:
    return {
        "metadata": {
            "name": "ij-customer-w1-1",
            "namespace": "ns",
            "uid": "job-uid",
            "ownerReferences": [
                {
                    "apiVersion": "importwaves.io/v1alpha1",
                    "kind": "ImportJob",
                    "name": "ij",
                    "uid": owner_uid,
                    "controller": True,
                }
            ],
        },
        "status": {"active": 1},
    }


def owner_spec() -> ImportJobSpec:
    return ImportJobSpec.model_validate({**base_crd_spec("t"), "importId": "j"})


def _nudgeable(monkeypatch: Any, live_uid: str = "ij-uid") -> tuple[ImportJobOperator, list[str]]:
    op = ImportJobOperator(Settings(), client.ApiClient())
    calls: list[str] = []
    importjob = {"metadata": {"name": "ij", "uid": live_uid}, "spec": base_crd_spec("t")}
    monkeypatch.setattr(
        op.custom,
        "get_namespaced_custom_object",
        lambda g, v, ns, plural, name: calls.append(f"get {ns}/{name}") or importjob,
    )
    monkeypatch.setattr(op, "engine_for", lambda *a, **k: object())
    monkeypatch.setattr(
        op, "_nudged", lambda engine, ij, job_id: calls.append(f"sync {job_id}") or []
    )
    monkeypatch.setattr(op, "write_status", lambda ns, name, **k: calls.append("status") or None)
    return op, calls


def test_a_worker_job_event_syncs_the_importjob_controlling_it(monkeypatch: Any) -> None:
    op, calls = _nudgeable(monkeypatch)
    nudged = op.on_worker_job(worker_job())
    assert nudged is not None and nudged[0]["metadata"]["name"] == "ij"
    assert calls == ["get ns/ij", "sync ns.ij", "status"]
    op.close()


def test_a_worker_job_of_another_importjob_uid_changes_nothing(monkeypatch: Any) -> None:
    # an ImportJob deleted and re-created under the same name: the old Job's owner uid differs
    op, calls = _nudgeable(monkeypatch, live_uid="new-uid")
    assert op.on_worker_job(worker_job("ij-uid")) is None
    assert calls == ["get ns/ij"]
    # a Job without a controlling ImportJob is not looked up at all
    plain = worker_job()
    plain["metadata"]["ownerReferences"][0]["controller"] = False
    assert op.on_worker_job(plain) is None
    assert calls == ["get ns/ij"]
    op.close()


def test_batch_failed_event_names_batch_record_type_wave_and_error() -> None:
    ij = owner_spec()
    rt = ij.recordTypes[0]
    f = FailedBatch("w1-x-0001", rt.recordTypeId, 1, 4, "boom: cannot reach upstream API")
    assert batch_failed_message(f, ij) == (
        f"batch w1-x-0001 ({rt.name}, wave 1) failed after 4 attempt(s): "
        "boom: cannot reach upstream API"
    )
    unknown = FailedBatch("b", 424242, 9, 1, "")
    assert batch_failed_message(unknown, ij) == (
        "batch b (record type 424242, wave 9) failed after 1 attempt(s): no error recorded"
    )
    assert len(batch_failed_message(FailedBatch("b", 1, 1, 1, "x" * 5000), ij)) == 1000


def test_batch_failed_event_once_per_failed_attempt(monkeypatch: Any) -> None:
    op = ImportJobOperator(Settings(), client.ApiClient())
    ij = owner_spec()
    failed = [FailedBatch("b1", ij.recordTypes[0].recordTypeId, 1, 2, "boom")]

    retrying: list[FailedBatch] = []

    class Engine:
        def failed_batches(self, job_id: str, limit: int) -> list[FailedBatch]:
            return list(failed)

        def retrying_batches(self, job_id: str, limit: int) -> list[FailedBatch]:
            return list(retrying)

    first = op._failure_events(Engine(), ij, "j")  # type: ignore[arg-type]
    assert [(e.type, e.reason) for e in first] == [("Warning", "BatchFailed")]
    assert op._failure_events(Engine(), ij, "j") == []  # type: ignore[arg-type]
    failed[0] = FailedBatch("b1", ij.recordTypes[0].recordTypeId, 1, 4, "boom again")  # retried
    again = op._failure_events(Engine(), ij, "j")  # type: ignore[arg-type]
    assert [e.message.endswith("boom again") for e in again] == [True]
    # an attempt that failed with attempts left (waiting for its retry): reported once too
    retrying.append(FailedBatch("b2", ij.recordTypes[0].recordTypeId, 1, 1, "boom: upstream"))
    retry = op._failure_events(Engine(), ij, "j")  # type: ignore[arg-type]
    assert [(e.type, e.reason) for e in retry] == [("Warning", "BatchFailed")]
    assert "attempt 1 of" in retry[0].message and retry[0].message.endswith("boom: upstream")
    assert op._failure_events(Engine(), ij, "j") == []  # type: ignore[arg-type]
    op.close()


def test_batch_retry_event_names_the_attempt_and_the_error() -> None:
    ij = owner_spec()
    rt = ij.recordTypes[0]
    f = FailedBatch("x-000001", rt.recordTypeId, 1, 1, "worker command exited 1: boom")
    assert batch_retry_message(f, ij) == (
        f"batch x-000001 ({rt.name}, wave 1) attempt 1 of {ij.retries + 1} failed, retried "
        "after its back-off: worker command exited 1: boom"
    )
    assert len(batch_retry_message(FailedBatch("b", 1, 1, 1, "x" * 5000), ij)) == 1000


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
