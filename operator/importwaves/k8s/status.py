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
from typing import Any

from importwaves.engine.model import JobStatus, Outcome, Snapshot
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
    """The whole new status. With a problem and no view, counters keep their last values."""
    old = dict(old or {})
    conds: list[dict[str, Any]] = list(old.get("conditions") or [])
    new: dict[str, Any] = {k: v for k, v in old.items() if k in _OWN_FIELDS}
    new["observedGeneration"] = generation

    if problem is not None and problem.is_spec:
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
            view.reason,
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
    new["conditions"] = conds
    new["summary"] = _summary(conds, problem)
    return new


_OWN_FIELDS = {
    "jobId",
    "waves",
    "batches",
    "wavesText",
    "batchesText",
    "derivedPending",
    "failedBatches",
    "activeBatches",
    "lastDispatchLagSeconds",
    "rows",
    "handledReconcile",
    "handledRetryFailed",
}


def _from_view(
    conds: list[dict[str, Any]], view: JobView, gen: int, now: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    snap = view.snapshot
    derived = snap.derived_waves
    derived_pending = sum(w.unfinished for w in derived)
    awaiting = snap.awaiting_derivation
    waves_done = sum(1 for w in snap.waves if w.total and w.all_completed)
    if snap.status == JobStatus.COMPLETED:
        waves_done = len(snap.waves)
    batches_total = sum(w.total for w in snap.waves)
    batches_done = sum(w.completed for w in snap.waves)
    failed = sum(w.failed for w in snap.waves)
    status = snap.status

    completed = status == JobStatus.COMPLETED
    invalid = status == JobStatus.INVALID
    rows = rows_by_name(snap.waves, view.staging_report)
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
        else (view.code if view.code and status != JobStatus.RUNNING else "WavesRemaining"),
        done_msg
        if completed
        else (
            view.reason[:1].upper() + view.reason[1:] + "."
            if invalid
            else f"{batches_total - batches_done} of {batches_total} batch(es) not completed yet."
        ),
        gen,
        now,
    )
    dp = derived_pending > 0 or (awaiting > 0 and not completed)
    conds = set_condition(
        conds,
        Cond.DERIVED_PENDING,
        dp,
        "DerivedBatchesPending" if dp else "NoDerivedPending",
        f"{derived_pending} derived batch(es) pending or active"
        + (f", {awaiting} parent batch(es) awaiting derived creation" if awaiting else "")
        + "."
        if dp
        else "No derived batch is pending or active.",
        gen,
        now,
    )
    running = status == JobStatus.RUNNING
    conds = set_condition(
        conds,
        Cond.PROGRESSING,
        running,
        _progress_reason(view.outcome)
        if running
        else {
            JobStatus.COMPLETED: "Finished",
            JobStatus.FAILED: "Stopped",
            JobStatus.SUSPENDED: "Suspended",
            JobStatus.INVALID: "Invalid",
        }[status],
        view.reason[:1].upper() + view.reason[1:] + "." if view.reason else "",
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
            view.reason[:1].upper() + view.reason[1:] + "."
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
        "spec.suspend is true: nothing new is dispatched."
        if suspended
        else "Dispatching is allowed.",
        gen,
        now,
    )
    fields: dict[str, Any] = {
        "jobId": view.job_id,
        "waves": {"done": waves_done, "total": len(snap.waves)},
        "batches": {"done": batches_done, "total": batches_total},
        "wavesText": f"{waves_done}/{len(snap.waves)}",
        "batchesText": f"{batches_done}/{batches_total}",
        "derivedPending": derived_pending,
        "failedBatches": failed,
        "activeBatches": snap.active,
        "rows": {
            name: {"staged": r.staged, "imported": r.imported, "skipped": r.skipped}
            for name, r in rows.items()
        },
    }
    if view.last_dispatch_lag_seconds is not None:
        fields["lastDispatchLagSeconds"] = round(view.last_dispatch_lag_seconds, 4)
    return conds, fields


def _progress_reason(outcome: Outcome) -> str:
    return {
        Outcome.WAVE_TRIGGERED: "WaveDispatched",
        Outcome.DERIVED_WAVE_TRIGGERED: "DerivedWaveDispatched",
        Outcome.DERIVED_PENDING: "DerivedPending",
        Outcome.IN_PROGRESS: "BatchesRunning",
    }.get(outcome, "Reconciling")


def _summary(conds: list[dict[str, Any]], problem: Problem | None) -> str:
    state = {c["type"]: c["status"] == "True" for c in conds}
    if state.get(Cond.INVALID):
        return "Invalid"
    if problem is not None:
        return "Blocked"
    for ctype, word in (
        (Cond.COMPLETED, "Completed"),
        (Cond.FAILED, "Failed"),
        (Cond.SUSPENDED, "Suspended"),
        (Cond.DERIVED_PENDING, "DerivedPending"),
        (Cond.PROGRESSING, "Running"),
    ):
        if state.get(ctype):
            return word
    return "Pending"


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The fields of `new` that differ from `old`: the status merge patch to write. Empty means
    nothing changed and nothing is written (a later `now` alone changes nothing, because
    set_condition keeps a condition's transition time while its status holds)."""
    old = old or {}
    return {k: v for k, v in new.items() if old.get(k) != v}
