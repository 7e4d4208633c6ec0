"""ImportJob status: conditions (apimachinery rules) and summaries for representative snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from importwaves.engine.model import DERIVED, MAIN, JobStatus, Outcome, Snapshot, WaveState
from importwaves.k8s.status import (
    Cond,
    JobView,
    Problem,
    ProblemKind,
    compute_status,
    set_condition,
    status_patch,
)

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    found = [c for c in status["conditions"] if c["type"] == ctype]
    assert len(found) == 1, f"{ctype}: {status['conditions']}"
    return found[0]


def truth(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


# -- set_condition -------------------------------------------------------------------------------
def test_set_condition_adds_with_every_field() -> None:
    out = set_condition([], "Completed", False, "WavesRemaining", "3 left.", 2, T0)
    assert out == [
        {
            "type": "Completed",
            "status": "False",
            "reason": "WavesRemaining",
            "message": "3 left.",
            "lastTransitionTime": T0,
            "observedGeneration": 2,
        }
    ]


def test_set_condition_keeps_transition_time_unless_status_changes() -> None:
    first = set_condition([], "Completed", False, "WavesRemaining", "3 left.", 1, T0)
    same = set_condition(first, "Completed", False, "WavesRemaining", "1 left.", 2, T1)
    assert same[0]["lastTransitionTime"] == T0
    assert same[0]["message"] == "1 left."
    assert same[0]["observedGeneration"] == 2
    flipped = set_condition(same, "Completed", True, "AllWavesCompleted", "Done.", 2, T2)
    assert flipped[0]["lastTransitionTime"] == T2
    assert flipped[0]["status"] == "True"
    unknown = set_condition(flipped, "Completed", None, "Unknown", "?", 2, T0)
    assert unknown[0]["status"] == "Unknown"
    assert unknown[0]["lastTransitionTime"] == T0


def test_set_condition_touches_only_its_type_and_never_its_input() -> None:
    conds = set_condition([], "A", True, "R", "m", 1, T0)
    conds = set_condition(conds, "B", False, "R", "m", 1, T0)
    before = [dict(c) for c in conds]
    out = set_condition(conds, "B", True, "R2", "m2", 1, T1)
    assert conds == before  # input untouched
    assert [c["type"] for c in out] == ["A", "B"]
    assert out[0] == before[0]
    assert out[1]["status"] == "True"
    assert out[1]["lastTransitionTime"] == T1


# -- compute_status ------------------------------------------------------------------------------
def wave(n: int, rid: int, name: str, level: int = MAIN, **counts: int) -> WaveState:
    total = sum(counts.values())
    return WaveState(n, rid, name, level, total=total, **counts)


def snap(*waves: WaveState, status: JobStatus = JobStatus.RUNNING, awaiting: int = 0) -> Snapshot:
    return Snapshot(
        "j1",
        status,
        status == JobStatus.SUSPENDED,
        4,
        tuple(waves),
        awaiting_derivation=awaiting,
    )


def view(s: Snapshot, outcome: Outcome = Outcome.IN_PROGRESS, reason: str = "") -> JobView:
    return JobView("j1", s, outcome, reason, 0.012345)


def status_for(s: Snapshot, outcome: Outcome = Outcome.IN_PROGRESS, **kw: Any) -> dict[str, Any]:
    return compute_status(
        kw.get("old"), generation=3, now=T1, view=view(s, outcome, "a reason"), problem=None
    )


CUSTOMERS_DONE = wave(1, -2, "Customer", completed=1)
ORDERS_RUNNING = wave(2, -30, "SalesOrder", completed=1, processing=2, pending=1)
ORDERS_DONE = wave(2, -30, "SalesOrder", completed=4)
LINES_EMPTY = WaveState(3, -13, "TransactionLine", DERIVED)
LINES_PENDING = wave(3, -13, "TransactionLine", DERIVED, completed=1, pending=2, dispatched=1)
LINES_DONE = wave(3, -13, "TransactionLine", DERIVED, completed=4)


def test_running_main_waves() -> None:
    st = status_for(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY), Outcome.WAVE_TRIGGERED)
    assert st["summary"] == "Running"
    assert truth(st) == {
        "Invalid": "False",
        "DatabaseReady": "True",
        "Completed": "False",
        "DerivedPending": "False",
        "Progressing": "True",
        "Failed": "False",
        "Suspended": "False",
    }
    assert cond(st, "Progressing")["reason"] == "WaveDispatched"
    assert cond(st, "Progressing")["message"] == "A reason."
    assert cond(st, "Completed")["message"] == "3 of 5 batch(es) not completed yet."
    assert st["waves"] == {"done": 1, "total": 3}
    assert st["wavesText"] == "1/3"
    assert st["batches"] == {"done": 2, "total": 5}
    assert st["batchesText"] == "2/5"
    assert st["derivedPending"] == 0
    assert st["activeBatches"] == 2
    assert st["failedBatches"] == 0
    assert st["jobId"] == "j1"
    assert st["observedGeneration"] == 3
    assert st["lastDispatchLagSeconds"] == 0.0123
    assert all(c["observedGeneration"] == 3 for c in st["conditions"])


def test_derived_pending_after_main_waves() -> None:
    st = status_for(snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_PENDING), Outcome.DERIVED_PENDING)
    assert st["summary"] == "DerivedPending"
    c = cond(st, "DerivedPending")
    assert (c["status"], c["reason"]) == ("True", "DerivedBatchesPending")
    assert c["message"] == "3 derived batch(es) pending or active."
    assert st["derivedPending"] == 3
    assert cond(st, "Completed")["status"] == "False"
    assert cond(st, "Progressing")["reason"] == "DerivedPending"
    assert st["waves"] == {"done": 2, "total": 3}


def test_parents_awaiting_derivation_count_as_derived_pending() -> None:
    """Derived batches not created yet (a parent completed, the listener has not run) are
    still pending work: the import must not look finished."""
    st = status_for(snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_EMPTY, awaiting=2))
    c = cond(st, "DerivedPending")
    assert c["status"] == "True"
    assert "2 parent batch(es) awaiting derived creation" in c["message"]
    assert st["summary"] == "DerivedPending"


def test_completed() -> None:
    old = status_for(snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_PENDING))
    st = compute_status(
        old,
        generation=3,
        now=T2,
        view=view(snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_DONE, status=JobStatus.COMPLETED)),
        problem=None,
    )
    assert st["summary"] == "Completed"
    assert cond(st, "Completed")["status"] == "True"
    assert cond(st, "Completed")["reason"] == "AllWavesCompleted"
    assert cond(st, "Completed")["lastTransitionTime"] == T2
    assert cond(st, "DerivedPending")["status"] == "False"
    assert cond(st, "DerivedPending")["lastTransitionTime"] == T2
    assert cond(st, "Progressing")["reason"] == "Finished"
    # Conditions that did not flip keep their time.
    assert cond(st, "Invalid")["lastTransitionTime"] == T1
    assert st["waves"] == {"done": 3, "total": 3}
    assert st["batchesText"] == "9/9"


def test_completed_with_an_empty_derived_wave_counts_every_wave() -> None:
    st = status_for(snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_EMPTY, status=JobStatus.COMPLETED))
    assert st["wavesText"] == "3/3"
    assert st["summary"] == "Completed"


def test_failed() -> None:
    orders = wave(2, -30, "SalesOrder", completed=3, failed=1)
    st = status_for(snap(CUSTOMERS_DONE, orders, LINES_EMPTY, status=JobStatus.FAILED))
    assert st["summary"] == "Failed"
    c = cond(st, "Failed")
    assert (c["status"], c["reason"]) == ("True", "BatchesFailed")
    assert "1 batch(es) failed" in c["message"]
    assert "importwaves.io/retry-failed" in c["message"]
    assert st["failedBatches"] == 1
    assert cond(st, "Progressing")["reason"] == "Stopped"


def test_failed_message_names_the_failed_batches_and_their_errors() -> None:
    orders = wave(2, -30, "SalesOrder", completed=3, failed=1)
    s = snap(CUSTOMERS_DONE, orders, LINES_EMPTY, status=JobStatus.FAILED)
    err = "SalesOrder-000001: BatchDataError: 1 invalid staging row(s): record 17: bad amount"
    v = JobView("j1", s, Outcome.FAILED, "1 batch(es) failed", None, (err,))
    st = compute_status(None, generation=1, now=T0, view=v, problem=None)
    msg = cond(st, "Failed")["message"]
    assert f"1 batch(es) failed after their last attempt ({err})" in msg
    assert msg.endswith("annotate importwaves.io/retry-failed=<new value> to retry them.")
    huge = JobView("j1", s, Outcome.FAILED, "", None, ("x" * 5000,) * 3)
    long_msg = cond(compute_status(None, generation=1, now=T0, view=huge, problem=None), "Failed")
    assert len(long_msg["message"]) < 2000


def test_failed_batch_while_still_running_is_reported_not_summarized() -> None:
    orders = wave(2, -30, "SalesOrder", completed=2, failed=1, processing=1)
    st = status_for(snap(CUSTOMERS_DONE, orders, LINES_EMPTY))
    c = cond(st, "Failed")
    assert (c["status"], c["reason"]) == ("False", "BatchRetriesExhausted")
    assert st["summary"] == "Running"


def test_suspended() -> None:
    st = status_for(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY, status=JobStatus.SUSPENDED))
    assert st["summary"] == "Suspended"
    assert cond(st, "Suspended")["status"] == "True"
    assert cond(st, "Progressing")["status"] == "False"


def test_invalid_spec_problem() -> None:
    p = Problem(ProblemKind.INVALID_SPEC, "recordTypes.parentTypes: dependency cycle A -> B -> A")
    st = compute_status(None, generation=1, now=T0, view=None, problem=p)
    assert st["summary"] == "Invalid"
    c = cond(st, "Invalid")
    assert (c["status"], c["reason"]) == ("True", "InvalidSpec")
    assert c["message"].startswith("recordTypes.parentTypes")
    assert "DatabaseReady" not in truth(st)


def test_refused_spec_change_keeps_the_counters() -> None:
    old = status_for(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY))
    p = Problem(ProblemKind.SPEC_CHANGE_REFUSED, "recordTypes: cannot change a running import")
    st = compute_status(old, generation=4, now=T2, view=None, problem=p)
    assert st["summary"] == "Invalid"
    assert cond(st, "Invalid")["reason"] == "SpecChangeRefused"
    assert st["batchesText"] == old["batchesText"]
    assert st["observedGeneration"] == 4


def test_secret_missing_blocks_then_recovers() -> None:
    p = Problem(ProblemKind.SECRET_MISSING, "Secret ns/db not found")
    blocked = compute_status(None, generation=1, now=T0, view=None, problem=p)
    assert blocked["summary"] == "Blocked"
    c = cond(blocked, "DatabaseReady")
    assert (c["status"], c["reason"]) == ("False", "SecretMissing")
    assert cond(blocked, "Invalid")["status"] == "False"
    ok = compute_status(
        blocked,
        generation=1,
        now=T1,
        view=view(snap(wave(1, -2, "Customer", pending=1))),
        problem=None,
    )
    c = cond(ok, "DatabaseReady")
    assert (c["status"], c["reason"], c["lastTransitionTime"]) == ("True", "Connected", T1)
    assert ok["summary"] == "Running"


def test_database_problem_keeps_last_counters() -> None:
    old = status_for(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY))
    p = Problem(ProblemKind.DATABASE_UNREACHABLE, "the tenant database is unreachable: boom")
    st = compute_status(old, generation=3, now=T2, view=None, problem=p)
    assert st["summary"] == "Blocked"
    assert cond(st, "DatabaseReady")["reason"] == "DatabaseUnreachable"
    for key in ("waves", "batches", "wavesText", "batchesText", "derivedPending", "jobId"):
        assert st[key] == old[key], key
    assert cond(st, "Progressing") == cond(old, "Progressing")


def test_only_own_fields_survive() -> None:
    old = {"summary": "Running", "bogus": 1, "handledReconcile": "7"}
    st = compute_status(old, generation=1, now=T0, view=None, problem=None)
    assert "bogus" not in st
    assert st["handledReconcile"] == "7"
    assert st["summary"] == "Pending"


@pytest.mark.parametrize("ctype", list(Cond))
def test_condition_types_are_pascal_case(ctype: Cond) -> None:
    assert ctype.value[:1].isupper() and " " not in ctype.value


def test_status_patch() -> None:
    """The operator's write_status writes exactly status_patch(old, new), and nothing when empty."""
    s = snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY)
    first = status_for(s)
    again = compute_status(
        first, generation=3, now=T2, view=view(s, reason="a reason"), problem=None
    )
    assert status_patch(first, again) == {}  # a later time alone is not a change
    moved = status_for(snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_PENDING), old=first)
    patch = status_patch(first, moved)
    assert patch, "a wave finishing must be written"
    assert "batches" in patch and patch["batches"] == moved["batches"]
    assert "jobId" not in patch  # unchanged fields are not sent
    assert status_patch(None, first) == first


# -- data-level completion (issue 11) --------------------------------------------------------------
def test_no_staging_records_is_invalid_never_completed_and_stable() -> None:
    """An import planning refused: Invalid=True with the engine's code and message, Completed
    False with the same reason; recomputing changes no transition time."""
    message = "import id 'imp' of tenant 'acme' has no staging rows the plan can cover"
    report = {"types": [{"recordTypeId": -2, "name": "Customer", "staged": 0, "skipped": 0}]}
    v = JobView(
        "imp",
        snap(status=JobStatus.INVALID),
        Outcome.INVALID,
        message,
        code="NoStagingRecords",
        staging_report=report,
    )
    st = compute_status(None, generation=1, now=T0, view=v, problem=None)
    assert st["summary"] == "Invalid"
    inv = cond(st, "Invalid")
    assert (inv["status"], inv["reason"], inv["message"]) == ("True", "NoStagingRecords", message)
    done = cond(st, "Completed")
    assert (done["status"], done["reason"]) == ("False", "NoStagingRecords")
    assert "no staging rows" in done["message"]
    assert cond(st, "Progressing")["reason"] == "Invalid"
    assert cond(st, "Failed")["status"] == "False"
    assert st["rows"] == {"Customer": {"staged": 0, "imported": 0, "skipped": 0}}
    again = compute_status(st, generation=1, now=T2, view=v, problem=None)
    assert again == st


def test_invalid_clears_once_planned() -> None:
    v = JobView(
        "imp", snap(status=JobStatus.INVALID), Outcome.INVALID, "x", code="NoStagingRecords"
    )
    st = compute_status(None, generation=1, now=T0, view=v, problem=None)
    st = status_for(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY), old=st)
    assert cond(st, "Invalid")["status"] == "False"
    assert cond(st, "Invalid")["reason"] == "SpecAccepted"
    assert st["summary"] == "Running"


def test_completed_names_rows_per_type() -> None:
    customers = WaveState(
        1, -2, "Customer", MAIN, total=1, completed=1, rows_staged=100, rows_written=100
    )
    lines = WaveState(
        3, -13, "TransactionLine", DERIVED, total=2, completed=2, rows_staged=503,
        rows_written=500, rows_skipped=3,
    )  # fmt: skip
    st = status_for(snap(customers, lines, status=JobStatus.COMPLETED))
    assert st["rows"] == {
        "Customer": {"staged": 100, "imported": 100, "skipped": 0},
        "TransactionLine": {"staged": 503, "imported": 500, "skipped": 3},
    }
    assert cond(st, "Completed")["message"].endswith(
        "every staged row imported: Customer 100/100, TransactionLine 500/503 (3 skipped)."
    )


def test_row_count_mismatch_fails_with_its_code() -> None:
    v = JobView(
        "j1",
        snap(CUSTOMERS_DONE, status=JobStatus.FAILED),
        Outcome.FAILED,
        "rows do not add up, not completing: Customer (-2): 99 row(s) written, 100 planned",
        code="RowCountMismatch",
    )
    st = compute_status(None, generation=1, now=T0, view=v, problem=None)
    f = cond(st, "Failed")
    assert (f["status"], f["reason"]) == ("True", "RowCountMismatch")
    assert "99 row(s) written, 100 planned" in f["message"]
    assert cond(st, "Completed")["reason"] == "RowCountMismatch"
    assert st["summary"] == "Failed"
