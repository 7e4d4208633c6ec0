"""ImportJob status from what the engine observed: pure functions, no I/O.

Conditions follow the Kubernetes API conventions: PascalCase types, True/False/Unknown, one-word
CamelCase reasons, human messages, `observedGeneration`, and a `lastTransitionTime` that changes
only when the status changes (apimachinery's SetStatusCondition rule).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from importwaves.engine.model import JobStatus, Outcome, Snapshot, WaveState
from importwaves.engine.rows import rows_by_name


class Cond(StrEnum):
    COMPLETED = "Completed"
    DERIVED_PENDING = "DerivedPending"
    PROGRESSING = "Progressing"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    INVALID = "Invalid"
    DATABASE_READY = "DatabaseReady"


class ProblemKind(StrEnum):
    INVALID_SPEC = "InvalidSpec"
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"
    SECRET_MISSING = "SecretMissing"  # noqa: S105 - a condition reason, not a secret
    DATABASE_UNREACHABLE = "DatabaseUnreachable"
    MIGRATION_FAILED = "MigrationFailed"
    # the kinds of redact.DsnProblem (a DSN's problem, named without its text)
    INVALID_DSN = "InvalidDSN"
    DATABASE_TIMEOUT = "DatabaseTimeout"
    DATABASE_AUTH_FAILED = "DatabaseAuthFailed"


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    message: str

    @property
    def is_spec(self) -> bool:
        return self.kind in (ProblemKind.INVALID_SPEC, ProblemKind.SPEC_CHANGE_REFUSED)


@dataclass(frozen=True)
class JobView:
    """What a reconcile saw in the tenant database."""

    job_id: str
    snapshot: Snapshot
    outcome: Outcome
    reason: str
    last_dispatch_lag_seconds: float | None = None
    #: "<batch id>: <last error>" of the first few batches out of attempts
    failed_errors: tuple[str, ...] = ()
    #: the job's machine-readable status code (engine/rows.py Code: NoStagingRecords, ...)
    code: str = ""
    #: the planning's staging report (rows per record type; kept even when nothing was planned)
    staging_report: dict[str, Any] | None = None
    #: the last spec change the engine refused for this job ('' when none): recorded in the job
    #: row, so every path computing the status reports the same refusal
    refusal: str = ""
    #: when the job finished (completed, or failed: the job row's completed_at / updated_at)
    finished_at: datetime | None = None
    #: batches ready to dispatch but held back by the operator-wide budget (issue 16)
    held: int = 0
    #: "<batch id>: <error>" of the batches waiting for a retry after a failed attempt (the
    #: newest first, a few): the Progressing message says why they are not done yet
    retrying: tuple[str, ...] = ()
    #: the newest launch problem recorded on a batch still to run ("launch failed: worker pod
    #: ... cannot start: <reason>: <message>"), '' when none
    launch_error: str = ""


#: The MESSAGE of an ImportJob no operator has written a status for yet (the CRD's default).
PENDING_MESSAGE = "Waiting for the operator's first reconcile of this ImportJob."


def _f(description: str, **extra: Any) -> Any:
    return Field(default=None, description=description, json_schema_extra=extra or None)


_INT64: dict[str, Any] = {"format": "int64"}
_DATE: dict[str, Any] = {"format": "date-time"}


class Condition(BaseModel):
    """A Kubernetes-style condition (apimachinery metav1.Condition)."""

    # a key an earlier version wrote is dropped, never a reason to fail a reconcile
    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="Condition type (PascalCase).")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word.")
    message: str = Field(description="A sentence for humans.")
    lastTransitionTime: str = Field(
        description="When status last changed.", json_schema_extra=_DATE
    )
    observedGeneration: int | None = _f("The spec generation this was computed for.", **_INT64)


class Counter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    done: int = Field(description="Completed.")
    total: int = Field(description="All.")


class RowCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    staged: int = Field(description="Staged.", json_schema_extra=_INT64)
    imported: int = Field(description="Imported.", json_schema_extra=_INT64)
    skipped: int = Field(description="Skipped.", json_schema_extra=_INT64)


class ImportJobStatus(BaseModel):
    """Observed state, computed from the tenant database and the spec (compute_status); the
    CRD's status schema is generated from this model (k8s/crd.py)."""

    model_config = ConfigDict(extra="forbid")

    summary: str | None = _f(
        "One word (the STATUS column): Pending, Running (main waves run), DerivedPending (only "
        "derived work left), Completed, Failed, Suspended, Invalid, Blocked (database or Secret "
        "problem) or Cancelled.",
        # the API server's default until the operator's first status write (crd.py)
        default="Pending",
    )
    message: str | None = _f(
        "The message of the condition the summary comes from (the MESSAGE column).",
        default=PENDING_MESSAGE,
    )
    progress: str | None = _f(
        "Rows imported of the rows to import, in percent rounded down (the PROGRESS column); "
        "its total is fixed at planning."
    )
    rowsImported: int | None = _f(
        "Rows imported (recorded by the workers that completed their batches).", **_INT64
    )
    rowsToImport: int | None = _f(
        "Rows to import: staged at planning, minus the skipped ones; fixed once planned.",
        **_INT64,
    )
    jobId: str | None = _f("The engine's job id in the tenant database (for `importwaves status`).")
    observedGeneration: int | None = _f("Last spec generation reconciled.", **_INT64)
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Kubernetes-style conditions: Completed, Progressing, DerivedPending, "
        "Failed, Suspended, Invalid, DatabaseReady; never contradicting each other.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    waves: Counter | None = _f("Waves completed / total.")
    batches: Counter | None = _f(
        "Batches completed / created so far (derived batches are created as parents complete)."
    )
    wavesText: str | None = _f("waves done/total")
    batchesText: str | None = _f("batches done/created so far")
    derivedPending: int | None = _f("Derived (-13) batches pending or active.")
    failedBatches: int | None = _f("Batches out of attempts (the FAILED column).")
    activeBatches: int | None = _f("Batches handed to workers (the ACTIVE column).")
    heldBatches: int | None = _f(
        "Batches ready to dispatch but held back by the operator-wide budget (the WAITING "
        "column; Progressing says WaitingForCapacity)."
    )
    lastDispatchLagSeconds: float | None = _f("Most recent wave dispatch lag.")
    rows: dict[str, RowCounts] | None = _f(
        "Rows per record type (by name): staged at planning, imported (recorded by the workers "
        "that completed the batches) and skipped (uncoveredRows: Skip)."
    )
    startTime: str | None = _f("When the import's first batch was dispatched.", **_DATE)
    completionTime: str | None = _f("When the import completed or failed.", **_DATE)
    duration: str | None = _f(
        "From startTime to completionTime, e.g. 3m12s (set once the import finished)."
    )
    handledReconcile: str | None = _f(
        "Last handled value of the importwaves.io/reconcile annotation."
    )
    handledRetryFailed: str | None = _f(
        "Last handled value of the importwaves.io/retry-failed annotation."
    )


def now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    ctype: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Return `conditions` with one condition set; transition time kept unless status flips."""
    value = "Unknown" if status is None else ("True" if status else "False")
    out = [copy.deepcopy(c) for c in conditions]
    for c in out:
        if c.get("type") == ctype:
            if c.get("status") != value:
                c["lastTransitionTime"] = now
            c.update(status=value, reason=reason, message=message, observedGeneration=generation)
            return out
    out.append(
        {
            "type": ctype,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
            "observedGeneration": generation,
        }
    )
    return out


def compute_status(
    old: dict[str, Any] | None,
    *,
    generation: int,
    now: str,
    view: JobView | None,
    problem: Problem | None,
) -> dict[str, Any]:
    """The whole new status. With a problem and no view, counters keep their last values.

    The same inputs give the same status whichever path computes it (the kopf reconcile, a Job
    event's refresh, a NOTIFY prompt): a refused spec change comes from the job row
    (`view.refusal`), so no path can write a status without it."""
    old = dict(old or {})
    if (
        view is not None
        and problem is None
        and old.get("summary") == "DerivedPending"
        and completion_pending(view)
    ):
        # Transient: written now it would say Running (no derived batch pending) between
        # DerivedPending and Completed, the STATUS column going back; DerivedPending=True with
        # nothing pending would contradict its own condition. The completing run writes next.
        return old
    conds: list[dict[str, Any]] = list(old.get("conditions") or [])
    new: dict[str, Any] = {k: v for k, v in old.items() if k in _OWN_FIELDS}
    new["observedGeneration"] = generation
    refusal = view.refusal if view is not None else ""
    if not refusal and problem is not None and problem.kind == ProblemKind.SPEC_CHANGE_REFUSED:
        refusal = problem.message
    finished = view is not None and view.snapshot.status in (
        JobStatus.COMPLETED,
        JobStatus.FAILED,
    )

    if problem is not None and problem.kind == ProblemKind.INVALID_SPEC:
        conds = set_condition(
            conds, Cond.INVALID, True, problem.kind.value, problem.message, generation, now
        )
    elif view is not None and view.snapshot.status == JobStatus.INVALID:
        # Planning refused (no staging rows, or rows no batch can cover): the import's data,
        # not the spec's shape, is invalid; the engine counts again on every reconcile.
        conds = set_condition(
            conds,
            Cond.INVALID,
            True,
            view.code or "InvalidImport",
            view.reason or "Planning refused the import's staging rows.",
            generation,
            now,
        )
    elif refusal and not finished:
        conds = set_condition(
            conds,
            Cond.INVALID,
            True,
            ProblemKind.SPEC_CHANGE_REFUSED.value,
            _sentence(refusal) + " The import goes on with the spec it was planned with; "
            "revert the change or create a new ImportJob.",
            generation,
            now,
        )
    elif refusal:
        conds = set_condition(
            conds,
            Cond.INVALID,
            False,
            "SpecChangeNotApplied",
            "The import finished with the spec it was planned with; a later change was not "
            "applied: " + _sentence(refusal),
            generation,
            now,
        )
    else:
        conds = set_condition(
            conds,
            Cond.INVALID,
            False,
            "SpecAccepted",
            "The spec is valid and applies to this import.",
            generation,
            now,
        )
    if problem is not None and not problem.is_spec:
        conds = set_condition(
            conds, Cond.DATABASE_READY, False, problem.kind.value, problem.message, generation, now
        )
    elif view is not None:
        conds = set_condition(
            conds,
            Cond.DATABASE_READY,
            True,
            "Connected",
            "The tenant database is reachable and migrated.",
            generation,
            now,
        )

    if view is not None:
        conds, fields = _from_view(conds, view, generation, now)
        new.update(fields)
    conds = resolve(conds, generation, now)
    blocked = problem is not None and not problem.is_spec
    new["conditions"] = conds
    new["summary"] = summary_of(truth_of(conds), blocked=blocked)
    if view is not None and view.snapshot.status == JobStatus.CANCELLED:
        new["summary"] = "Cancelled"
    new["message"] = _message(new["summary"], conds)
    return ImportJobStatus.model_validate(new).model_dump(exclude_none=True)


_OWN_FIELDS = {
    "jobId",
    "waves",
    "batches",
    "wavesText",
    "batchesText",
    "derivedPending",
    "failedBatches",
    "activeBatches",
    "heldBatches",
    "lastDispatchLagSeconds",
    "rows",
    "rowsImported",
    "rowsToImport",
    "progress",
    "startTime",
    "completionTime",
    "duration",
    "handledReconcile",
    "handledRetryFailed",
}

#: The state conditions, strongest first: a stronger one that is True makes the weaker ones it
#: excludes False (resolve). Completed is a proof about data and beats everything; a finished
#: import (Completed or Failed) is neither invalid, progressing, suspended nor derived-pending;
#: a suspended import is not progressing.
EXCLUDES: dict[Cond, tuple[Cond, ...]] = {
    Cond.COMPLETED: (
        Cond.FAILED,
        Cond.INVALID,
        Cond.PROGRESSING,
        Cond.SUSPENDED,
        Cond.DERIVED_PENDING,
    ),
    Cond.FAILED: (Cond.INVALID, Cond.PROGRESSING, Cond.SUSPENDED, Cond.DERIVED_PENDING),
    Cond.SUSPENDED: (Cond.PROGRESSING,),
}

#: The summary word, by the first True condition in this order (Blocked: a database or Secret
#: problem, after Invalid and before Suspended).
SUMMARY_ORDER: tuple[tuple[Cond, str], ...] = (
    (Cond.COMPLETED, "Completed"),
    (Cond.FAILED, "Failed"),
    (Cond.INVALID, "Invalid"),
    (Cond.SUSPENDED, "Suspended"),
    (Cond.DERIVED_PENDING, "DerivedPending"),
    (Cond.PROGRESSING, "Running"),
)


def truth_of(conds: list[dict[str, Any]]) -> dict[str, bool]:
    return {c["type"]: c["status"] == "True" for c in conds}


def contradictions(conds: list[dict[str, Any]]) -> list[str]:
    """Pairs of True conditions that exclude each other (EXCLUDES); empty when consistent."""
    state = truth_of(conds)
    return [
        f"{strong}=True with {weak}=True"
        for strong, weaker in EXCLUDES.items()
        if state.get(strong)
        for weak in weaker
        if state.get(weak)
    ]


def resolve(conds: list[dict[str, Any]], generation: int, now: str) -> list[dict[str, Any]]:
    """Make the conditions consistent by precedence (EXCLUDES, strongest first): a condition
    excluded by a True stronger one becomes False, its reason naming the stronger one."""
    out = conds
    for strong, weaker in EXCLUDES.items():
        if not truth_of(out).get(strong):
            continue
        for weak in weaker:
            if truth_of(out).get(weak):
                msg = next(c["message"] for c in out if c["type"] == weak)
                out = set_condition(
                    out,
                    weak,
                    False,
                    f"Overridden{strong.value}",
                    f"{strong.value} is True, which this condition cannot be with ({msg})",
                    generation,
                    now,
                )
    return out


def summary_of(state: dict[str, bool], *, blocked: bool = False) -> str:
    """One word for the STATUS column: the first True condition of SUMMARY_ORDER, Blocked (a
    database or Secret problem) before Suspended, Pending when none holds."""
    for ctype, word in SUMMARY_ORDER:
        if ctype == Cond.SUSPENDED and blocked:
            return "Blocked"
        if state.get(ctype):
            return word
    return "Blocked" if blocked else "Pending"


_MESSAGE_OF = {
    "Completed": Cond.COMPLETED,
    "Failed": Cond.FAILED,
    "Invalid": Cond.INVALID,
    "Blocked": Cond.DATABASE_READY,
    "Suspended": Cond.SUSPENDED,
    "DerivedPending": Cond.PROGRESSING,
    "Running": Cond.PROGRESSING,
    "Cancelled": Cond.PROGRESSING,
}


def _message(summary: str, conds: list[dict[str, Any]]) -> str:
    """The MESSAGE column: the message of the condition the summary word comes from."""
    ctype = _MESSAGE_OF.get(summary)
    for c in conds:
        if c["type"] == ctype:
            return str(c["message"])
    return "Waiting for the first reconcile of the tenant database."


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def progress_of(imported: int, to_import: int) -> str:
    """Rows imported of the rows to import (staged at planning, minus skipped), as a percent
    rounded down: 100% only when every row is in."""
    if to_import <= 0:
        return "0%" if imported <= 0 else "100%"
    return f"{min(100, imported * 100 // to_import)}%"


def duration_of(seconds: float) -> str:
    """Kubernetes-style short duration: 45s, 3m12s, 2h5m, 3d4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def completion_pending(view: JobView) -> bool:
    """Every batch, derived included, completed while the job row still says running: the
    moment between the last derived batch's commit and the run that records the completion
    (it follows at once, prompted by that commit's NOTIFY)."""
    snap = view.snapshot
    return (
        snap.status == JobStatus.RUNNING
        and bool(snap.derived_waves)
        and any(w.total > 0 for w in snap.derived_waves)
        and all(w.all_completed for w in snap.waves)
        and not snap.awaiting_derivation
    )


def _from_view(
    conds: list[dict[str, Any]], view: JobView, gen: int, now: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    snap = view.snapshot
    derived = snap.derived_waves
    main = sorted(snap.main_waves, key=lambda w: w.wave_number)
    derived_pending = sum(w.unfinished for w in derived)
    awaiting = snap.awaiting_derivation
    waves_done = sum(1 for w in snap.waves if w.total and w.all_completed)
    if snap.status == JobStatus.COMPLETED:
        waves_done = len(snap.waves)
    batches_total = sum(w.total for w in snap.waves)
    batches_done = sum(w.completed for w in snap.waves)
    failed = sum(w.failed for w in snap.waves)
    status = snap.status
    rows = rows_by_name(snap.waves, view.staging_report)
    imported = sum(r.imported for r in rows.values())
    to_import = sum(max(0, r.staged - r.skipped) for r in rows.values())
    progress = progress_of(imported, to_import)

    completed = status == JobStatus.COMPLETED
    invalid = status == JobStatus.INVALID
    running = status == JobStatus.RUNNING
    main_done = bool(main) and all(w.all_completed for w in main)
    if completed:
        done_msg = "Every batch of every wave, derived included, completed; every staged row " + (
            "imported: "
            + ", ".join(
                f"{name} {r.imported}/{r.staged}" + (f" ({r.skipped} skipped)" if r.skipped else "")
                for name, r in rows.items()
            )
            + "."
        )
    conds = set_condition(
        conds,
        Cond.COMPLETED,
        completed,
        "AllWavesCompleted"
        if completed
        else (view.code if view.code and not running else "WavesRemaining"),
        done_msg
        if completed
        else (
            _sentence(view.reason)
            if invalid
            else f"{imported:,} of {to_import:,} row(s) imported ({progress}); "
            f"{batches_total - batches_done} of {batches_total} batch(es) created so far "
            "not completed yet."
        ),
        gen,
        now,
    )
    # Only derived work left: the main waves are done and derived batches (or parents awaiting
    # their derived batches) remain. Before that the import is Running, derived or not.
    dp = not completed and main_done and (derived_pending > 0 or awaiting > 0)
    conds = set_condition(
        conds,
        Cond.DERIVED_PENDING,
        dp,
        "DerivedBatchesPending" if dp else "NoDerivedPending",
        f"Main waves done; {derived_pending} derived batch(es) pending or active"
        + (f", {awaiting} parent batch(es) awaiting derived creation" if awaiting else "")
        + "."
        if dp
        else (
            "Main waves still running; derived batches follow their parents."
            if not main_done and derived and not completed
            else "No derived batch is pending or active."
        ),
        gen,
        now,
    )
    conds = set_condition(
        conds,
        Cond.PROGRESSING,
        running,
        (
            (
                "LaunchFailing"
                if view.launch_error
                else "WaitingForCapacity"
                if view.held
                else "DerivedRunning"
                if dp
                else "WavesRunning"
            )
            if running
            else _STOPPED[status]
        ),
        _progressing_message(view, main, dp, derived_pending, awaiting, progress),
        gen,
        now,
    )
    is_failed = status == JobStatus.FAILED
    conds = set_condition(
        conds,
        Cond.FAILED,
        is_failed,
        (view.code or "BatchesFailed")
        if is_failed
        else ("BatchRetriesExhausted" if failed else "NoFailures"),
        (
            f"{failed} batch(es) failed after their last attempt"
            + (f" ({'; '.join(view.failed_errors)})"[:1500] if view.failed_errors else "")
            + "; annotate importwaves.io/retry-failed=<new value> to retry them."
        )
        if failed
        else (
            _sentence(view.reason)
            if is_failed and view.reason
            else "No batch has run out of attempts."
        ),
        gen,
        now,
    )
    suspended = status == JobStatus.SUSPENDED
    conds = set_condition(
        conds,
        Cond.SUSPENDED,
        suspended,
        "SpecSuspended" if suspended else "NotSuspended",
        "spec.suspend is true: nothing new is dispatched; "
        + (
            f"{snap.active} batch(es) dispatched earlier still running."
            if snap.active
            else "no batch is running."
        )
        if suspended
        else "Dispatching is allowed.",
        gen,
        now,
    )
    starts = [w.first_dispatched_at for w in snap.waves if w.first_dispatched_at is not None]
    start = min(starts) if starts else None
    fields: dict[str, Any] = {
        "jobId": view.job_id,
        "waves": {"done": waves_done, "total": len(snap.waves)},
        "batches": {"done": batches_done, "total": batches_total},
        "wavesText": f"{waves_done}/{len(snap.waves)}",
        "batchesText": f"{batches_done}/{batches_total}",
        "derivedPending": derived_pending,
        "failedBatches": failed,
        "activeBatches": snap.active,
        "heldBatches": view.held,
        "rows": {
            name: {"staged": r.staged, "imported": r.imported, "skipped": r.skipped}
            for name, r in rows.items()
        },
        "rowsImported": imported,
        "rowsToImport": to_import,
        "progress": progress,
    }
    if start is not None:
        fields["startTime"] = now_iso(start)
    if view.finished_at is not None and status in (JobStatus.COMPLETED, JobStatus.FAILED):
        fields["completionTime"] = now_iso(view.finished_at)
        if start is not None:
            fields["duration"] = duration_of((view.finished_at - start).total_seconds())
    if view.last_dispatch_lag_seconds is not None:
        fields["lastDispatchLagSeconds"] = round(view.last_dispatch_lag_seconds, 4)
    return conds, fields


_STOPPED = {
    JobStatus.COMPLETED: "Finished",
    JobStatus.FAILED: "Stopped",
    JobStatus.SUSPENDED: "Suspended",
    JobStatus.INVALID: "Invalid",
    JobStatus.CANCELLED: "Cancelled",
    JobStatus.RUNNING: "WavesRunning",
}


def _progressing_message(
    view: JobView,
    main: list[WaveState],
    derived_phase: bool,
    derived_pending: int,
    awaiting: int,
    progress: str,
) -> str:
    """Never empty: what runs now (the wave, by record type), or why nothing does; while it
    runs, the newest launch problem a batch still waits out, and the batches waiting for a
    retry with the error of their failed attempt."""
    text = _progress_text(view, main, derived_phase, derived_pending, awaiting, progress)
    if view.snapshot.status == JobStatus.RUNNING and view.launch_error:
        problem = view.launch_error[:1000].removeprefix("launch failed: ").rstrip(".")
        text += f" Workers cannot be started, batches wait to run again: {problem}."
    if view.snapshot.status == JobStatus.RUNNING and view.retrying:
        text += (" Retrying after a failed attempt: " + "; ".join(view.retrying))[:600]
        text = _sentence(text)
    return text


def _progress_text(
    view: JobView,
    main: list[WaveState],
    derived_phase: bool,
    derived_pending: int,
    awaiting: int,
    progress: str,
) -> str:
    snap = view.snapshot
    status = snap.status
    if status == JobStatus.COMPLETED:
        return "Finished: every wave completed."
    if status == JobStatus.SUSPENDED:
        return "Suspended (spec.suspend): " + (
            f"{snap.active} batch(es) dispatched earlier still running."
            if snap.active
            else "no batch is running."
        )
    if status == JobStatus.CANCELLED:
        return "Cancelled: its ImportJob was deleted; apply it again to resume."
    if status != JobStatus.RUNNING:
        return _sentence(view.reason) or f"Stopped ({status.value})."
    if view.held:
        return (
            f"Waiting for capacity: {view.held} batch(es) ready but held back by the "
            f"operator-wide budget (shared fairly among tenants); {snap.active} running; "
            f"{progress} of rows imported."
        )
    if derived_phase:
        return (
            f"Main waves done; {derived_pending} derived batch(es) pending or active"
            + (f", {awaiting} parent batch(es) awaiting derived creation" if awaiting else "")
            + f"; {progress} of rows imported."
        )
    current = next((w for w in main if not w.all_completed), None)
    if current is None:
        return f"Planning or finishing; {progress} of rows imported."
    waiting = f", {current.pending} waiting" if current.pending else ""
    return (
        f"Wave {current.wave_number} ({current.name}): {current.completed}/{current.total} "
        f"batch(es) completed, {current.active} running{waiting}; {progress} of rows imported."
    )


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The fields of `new` that differ from `old`: the status merge patch to write. Empty means
    nothing changed and nothing is written (a later `now` alone changes nothing, because
    set_condition keeps a condition's transition time while its status holds)."""
    old = old or {}
    return {k: v for k, v in new.items() if old.get(k) != v}
