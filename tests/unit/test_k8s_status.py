"""ImportJob status: conditions (apimachinery rules) and summaries for representative snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from importwaves.engine.model import DERIVED, MAIN, JobStatus, Outcome, Snapshot, WaveState
from importwaves.k8s.status import (
    SUMMARY_ORDER,
    Cond,
    JobView,
    Problem,
    ProblemKind,
    compute_status,
    contradictions,
    duration_of,
    progress_of,
    resolve,
    set_condition,
    status_patch,
    summary_of,
    truth_of,
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
    assert cond(st, "Progressing")["reason"] == "WavesRunning"
    assert cond(st, "Progressing")["message"] == (
        "Wave 2 (SalesOrder): 1/4 batch(es) completed, 2 running, 1 waiting; 0% of rows imported."
    )
    assert cond(st, "Completed")["message"] == (
        "0 of 0 row(s) imported (0%); 3 of 5 batch(es) created so far not completed yet."
    )
    assert cond(st, "DerivedPending")["message"] == (
        "Main waves still running; derived batches follow their parents."
    )
    assert st["message"] == cond(st, "Progressing")["message"]
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
    assert c["message"] == "Main waves done; 3 derived batch(es) pending or active."
    assert st["derivedPending"] == 3
    assert cond(st, "Completed")["status"] == "False"
    assert cond(st, "Progressing")["reason"] == "DerivedRunning"
    assert cond(st, "Progressing")["status"] == "True"
    assert st["waves"] == {"done": 2, "total": 3}


def test_every_derived_batch_done_before_the_completion_is_recorded_keeps_derived_pending() -> None:
    """The last derived batch committed; the run that records the job's completion has not
    (the job row still says running). A status written in that moment (a worker Job's event,
    the timer) said Running, so `kubectl get importjobs -w` showed DerivedPending -> Running ->
    Completed: the STATUS column went back. The status written before it stays until the
    completion is recorded (DerivedPending=True with nothing pending would contradict itself)."""
    before = status_for(snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_PENDING))
    assert before["summary"] == "DerivedPending"
    st = status_for(snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_DONE), old=before)
    assert st == before
    c = cond(st, "DerivedPending")
    assert (c["status"], c["reason"]) == ("True", "DerivedBatchesPending")
    assert st["derivedPending"] > 0
    assert cond(st, "Completed")["status"] == "False"
    assert cond(st, "Progressing")["status"] == "True"


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


def test_a_batch_waiting_for_its_retry_shows_its_error_in_progressing_and_the_message() -> None:
    """A failed attempt with attempts left: Failed stays False (nothing is out of attempts),
    and Progressing (the MESSAGE column while Running) says which batch retries and why."""
    err = "SalesOrder-000001: worker command exited 1: boom: cannot reach upstream API"
    s = snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY)
    v = JobView("j1", s, Outcome.IN_PROGRESS, "", retrying=(err,))
    st = compute_status(None, generation=1, now=T0, view=v, problem=None)
    prog = cond(st, "Progressing")
    assert prog["status"] == "True"
    assert prog["message"].startswith("Wave 2 (SalesOrder): 1/4 batch(es) completed")
    assert prog["message"].endswith(f"Retrying after a failed attempt: {err}.")
    assert st["summary"] == "Running" and st["message"] == prog["message"]
    assert cond(st, "Failed")["status"] == "False"
    # a retrying batch's error is not shown once the import stopped running
    done = snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_EMPTY, status=JobStatus.SUSPENDED)
    sv = JobView("j1", done, Outcome.SUSPENDED, "", retrying=(err,))
    suspended = compute_status(None, generation=1, now=T0, view=sv, problem=None)
    assert "Retrying" not in cond(suspended, "Progressing")["message"]
    huge = JobView("j1", s, Outcome.IN_PROGRESS, "", retrying=("x" * 5000,) * 2)
    long_msg = cond(
        compute_status(None, generation=1, now=T0, view=huge, problem=None), "Progressing"
    )
    assert len(long_msg["message"]) < 800  # the retrying part is cut at 600 characters


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


# -- issue 13: one status truth ------------------------------------------------------------------
STATE_CONDS = (
    Cond.COMPLETED,
    Cond.FAILED,
    Cond.INVALID,
    Cond.SUSPENDED,
    Cond.DERIVED_PENDING,
    Cond.PROGRESSING,
)


@pytest.mark.parametrize("bits", range(2 ** len(STATE_CONDS)))
def test_resolve_leaves_no_contradiction_and_keeps_the_strongest(bits: int) -> None:
    """Every combination of the six state conditions: after resolve() no two True conditions
    exclude each other, the strongest True one is still True, and the summary is its word."""
    conds: list[dict[str, Any]] = []
    for i, ctype in enumerate(STATE_CONDS):
        conds = set_condition(conds, ctype, bool(bits >> i & 1), "R", f"m{i}", 1, T0)
    out = resolve(conds, 1, T1)
    assert contradictions(out) == []
    state = truth_of(out)
    before = truth_of(conds)
    strongest = next((c for c, _ in SUMMARY_ORDER if before.get(c)), None)
    if strongest is not None:
        assert state[strongest]
        word = dict(SUMMARY_ORDER)[strongest]
        if strongest == Cond.INVALID and before.get(Cond.SUSPENDED):
            word = "Invalid"
        assert summary_of(state) == word
    else:
        assert summary_of(state) == "Pending"
    # only excluded conditions changed, and only to False, naming what overrode them
    for c_in, c_out in zip(conds, out, strict=True):
        if c_in != c_out:
            assert c_in["status"] == "True" and c_out["status"] == "False"
            assert c_out["reason"].startswith("Overridden")


def test_summary_precedence() -> None:
    assert summary_of({"Completed": True, "Invalid": True}) == "Completed"
    assert summary_of({"Failed": True, "Progressing": True}) == "Failed"
    assert summary_of({"Invalid": True, "Progressing": True}) == "Invalid"
    assert summary_of({"Suspended": True}, blocked=True) == "Blocked"
    assert summary_of({"Invalid": True}, blocked=True) == "Invalid"
    assert summary_of({"DerivedPending": True, "Progressing": True}) == "DerivedPending"
    assert summary_of({"Progressing": True}) == "Running"
    assert summary_of({}) == "Pending"
    assert summary_of({}, blocked=True) == "Blocked"


@pytest.mark.parametrize(
    ("imported", "total", "text"),
    [
        (0, 0, "0%"),
        (0, 10, "0%"),
        (45_000, 100_004, "44%"),
        (99_999, 100_000, "99%"),
        (100_000, 100_000, "100%"),
        (5, 0, "100%"),
        (11, 10, "100%"),
    ],
)
def test_progress_rounds_down(imported: int, total: int, text: str) -> None:
    assert progress_of(imported, total) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m0s"), (192, "3m12s"), (7500, "2h5m"), (273600, "3d4h")],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration_of(seconds) == text


def rows_wave(
    n: int, rid: int, name: str, level: int = MAIN, *, staged: int, written: int, **counts: int
) -> WaveState:
    total = sum(counts.values())
    return WaveState(
        n,
        rid,
        name,
        level,
        total=total,
        rows_staged=staged,
        rows_written=written,
        rows_planned=staged,
        **counts,
    )


def test_progress_total_is_fixed_at_planning_while_derived_batches_appear() -> None:
    """The PROGRESS total is the rows staged at planning (derived included), so it does not
    grow as derived batches are created; the batch total does."""
    early = snap(
        rows_wave(1, -2, "Customer", staged=10, written=10, completed=1),
        rows_wave(2, -30, "SalesOrder", staged=40, written=20, completed=2, processing=2),
        rows_wave(3, -13, "TransactionLine", DERIVED, staged=50, written=0, pending=2),
    )
    late = snap(
        rows_wave(1, -2, "Customer", staged=10, written=10, completed=1),
        rows_wave(2, -30, "SalesOrder", staged=40, written=40, completed=4),
        rows_wave(
            3, -13, "TransactionLine", DERIVED, staged=50, written=25, completed=4, pending=4
        ),
    )
    a, b = status_for(early), status_for(late)
    assert (a["rowsToImport"], a["rowsImported"], a["progress"]) == (100, 30, "30%")
    assert (b["rowsToImport"], b["rowsImported"], b["progress"]) == (100, 75, "75%")
    assert a["batches"]["total"] != b["batches"]["total"]
    assert a["summary"] == "Running"
    assert b["summary"] == "DerivedPending"


def test_derived_batches_while_main_waves_run_are_running_not_derived_pending() -> None:
    """Threshold < 100: derived batches exist and run while a main wave runs: Running."""
    st = status_for(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_PENDING, awaiting=1))
    assert st["summary"] == "Running"
    assert cond(st, "DerivedPending")["status"] == "False"
    assert cond(st, "Progressing")["reason"] == "WavesRunning"


def test_suspended_message_follows_the_active_batches() -> None:
    busy = wave(2, -30, "SalesOrder", completed=1, processing=2, pending=1)
    idle = wave(2, -30, "SalesOrder", completed=1, pending=3)
    for w, text in (
        (busy, "2 batch(es) dispatched earlier still running."),
        (idle, "no batch is running."),
    ):
        v = JobView(
            "j1",
            snap(CUSTOMERS_DONE, w, status=JobStatus.SUSPENDED),
            Outcome.SUSPENDED,
            "suspended; 4 batch(es) still running",
        )
        st = compute_status(None, generation=1, now=T0, view=v, problem=None)
        assert st["summary"] == "Suspended"
        assert cond(st, "Progressing")["message"].endswith(text)
        assert cond(st, "Suspended")["message"].endswith(text)
        assert "4 batch(es)" not in st["message"]


def test_progressing_message_is_never_empty() -> None:
    for status in JobStatus:
        v = JobView(
            "j1", snap(CUSTOMERS_DONE, ORDERS_RUNNING, status=status), Outcome.IN_PROGRESS, ""
        )
        st = compute_status(None, generation=1, now=T0, view=v, problem=None)
        assert cond(st, "Progressing")["message"].strip(), status
        assert st["message"].strip(), status
        assert contradictions(st["conditions"]) == []


REFUSAL = "spec change refused: uncoveredRows cannot change once the import is planned"


def refused_view(s: Snapshot) -> JobView:
    return JobView("j1", s, Outcome.IN_PROGRESS, "", refusal=REFUSAL)


def test_a_refusal_from_the_job_row_is_in_every_computed_status() -> None:
    """The refusal comes from the database (view.refusal): a path that knows nothing about it
    (a Job event's refresh, problem=None) computes the same Invalid condition as the reconcile
    that caught the exception: no flapping between Invalid and DerivedPending."""
    s = snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_PENDING)
    by_reconcile = compute_status(
        None,
        generation=2,
        now=T0,
        view=refused_view(s),
        problem=Problem(ProblemKind.SPEC_CHANGE_REFUSED, REFUSAL),
    )
    by_refresh = compute_status(
        by_reconcile, generation=2, now=T1, view=refused_view(s), problem=None
    )
    assert by_reconcile == by_refresh
    assert status_patch(by_reconcile, by_refresh) == {}
    inv = cond(by_refresh, "Invalid")
    assert (inv["status"], inv["reason"]) == ("True", "SpecChangeRefused")
    assert "goes on with the spec it was planned with" in inv["message"]
    assert by_refresh["summary"] == "Invalid"
    assert cond(by_refresh, "DerivedPending")["status"] == "True"  # the import still moves


def test_a_refused_change_never_shows_with_completed() -> None:
    done = snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_DONE, status=JobStatus.COMPLETED)
    st = compute_status(None, generation=2, now=T0, view=refused_view(done), problem=None)
    assert st["summary"] == "Completed"
    assert cond(st, "Completed")["status"] == "True"
    inv = cond(st, "Invalid")
    assert (inv["status"], inv["reason"]) == ("False", "SpecChangeNotApplied")
    assert REFUSAL[1:] in inv["message"]
    assert contradictions(st["conditions"]) == []


def test_an_invalid_spec_after_completion_keeps_completed_and_no_contradiction() -> None:
    done = snap(CUSTOMERS_DONE, ORDERS_DONE, LINES_DONE, status=JobStatus.COMPLETED)
    old = compute_status(None, generation=1, now=T0, view=view(done), problem=None)
    st = compute_status(
        old,
        generation=2,
        now=T1,
        view=None,
        problem=Problem(ProblemKind.INVALID_SPEC, "recordTypes: bad"),
    )
    assert st["summary"] == "Completed"
    assert contradictions(st["conditions"]) == []


def test_start_completion_time_and_duration() -> None:
    from datetime import UTC, datetime

    t0 = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    t1 = datetime(2026, 1, 1, 0, 3, 12, tzinfo=UTC)
    first = WaveState(1, -2, "Customer", MAIN, total=1, completed=1, first_dispatched_at=t0)
    running = compute_status(
        None,
        generation=1,
        now=T0,
        view=JobView("j1", snap(first), Outcome.IN_PROGRESS, ""),
        problem=None,
    )
    assert running["startTime"] == "2026-01-01T00:00:00Z"
    assert "completionTime" not in running and "duration" not in running
    done = JobView(
        "j1", snap(first, status=JobStatus.COMPLETED), Outcome.COMPLETED, "", finished_at=t1
    )
    st = compute_status(running, generation=1, now=T1, view=done, problem=None)
    assert st["completionTime"] == "2026-01-01T00:03:12Z"
    assert st["duration"] == "3m12s"


def test_status_is_valid_against_its_model() -> None:
    from importwaves.k8s.status import ImportJobStatus

    st = status_for(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY))
    assert ImportJobStatus.model_validate(st).model_dump(exclude_none=True) == st


def test_held_by_the_budget_says_waiting_for_capacity() -> None:
    """An import the operator-wide budget holds back (issue 16): Progressing=True with reason
    WaitingForCapacity and a message naming the held batches; heldBatches feeds WAITING."""
    from dataclasses import replace

    held = replace(view(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY)), held=3)
    st = compute_status(None, generation=3, now=T1, view=held, problem=None)
    assert st["summary"] == "Running"
    p = cond(st, "Progressing")
    assert (p["status"], p["reason"]) == ("True", "WaitingForCapacity")
    assert p["message"].startswith(
        "Waiting for capacity: 3 batch(es) ready but held back by the operator-wide budget"
    )
    assert st["heldBatches"] == 3
    free = compute_status(None, generation=3, now=T1, view=replace(held, held=0), problem=None)
    assert free["heldBatches"] == 0
    assert cond(free, "Progressing")["reason"] == "WavesRunning"


def test_a_launch_problem_a_batch_waits_out_says_launch_failing() -> None:
    """Workers that cannot start (issues 12/13): while the failed attempt's batches wait to run
    again, Progressing says LaunchFailing with the recorded problem (pod, reason, message)."""
    from dataclasses import replace

    error = (
        "launch failed: worker pod ij-customer-w1-1-abcde cannot start: "
        "CreateContainerConfigError: container has runAsNonRoot and image will run as root"
    )
    running = view(snap(CUSTOMERS_DONE, ORDERS_RUNNING, LINES_EMPTY))
    st = compute_status(
        None, generation=3, now=T1, view=replace(running, launch_error=error), problem=None
    )
    assert st["summary"] == "Running"
    p = cond(st, "Progressing")
    assert (p["status"], p["reason"]) == ("True", "LaunchFailing")
    assert p["message"].endswith(
        " Workers cannot be started, batches wait to run again: worker pod "
        "ij-customer-w1-1-abcde cannot start: CreateContainerConfigError: container has "
        "runAsNonRoot and image will run as root."
    ), p["message"]
    assert st["message"] == p["message"]
    fine = compute_status(None, generation=3, now=T1, view=running, problem=None)
    assert cond(fine, "Progressing")["reason"] == "WavesRunning"
    assert "cannot be started" not in cond(fine, "Progressing")["message"]
