"""What the operator reads off its objects besides the ImportJob spec: its annotations, and
which ImportJob controls a worker Job.

Worker Jobs themselves are built and read below the engine, by the Kubernetes adapter of the
launcher port (launch/kubejobs.py: one work-queue Job per wave running pooled workers; it says
why the earlier one-Job-per-batch mode was removed). This module may import launch/, never the
reverse.
"""

from __future__ import annotations

from typing import Any

from importwaves.launch.kubejobs import (
    GROUP,
    LABEL_IMPORTJOB,
    LABEL_OWNER_UID,
    controller_owner,
    owner_label,
)

__all__ = [
    "ANN_RECONCILE",
    "ANN_RETRY_FAILED",
    "LABEL_IMPORTJOB",
    "LABEL_OWNER_UID",
    "REQUESTS",
    "controller_owner",
    "finished",
    "needs_polling",
    "owner_label",
    "requests_pending",
    "timer_due",
]

ANN_RECONCILE = f"{GROUP}/reconcile"
ANN_RETRY_FAILED = f"{GROUP}/retry-failed"


#: the operator's request annotations, each with the status field that records the value last
#: handled: a new value asks for the action once (`reconcile`: a manual sweep; `retry-failed`:
#: requeue the failed batches)
REQUESTS: tuple[tuple[str, str], ...] = (
    (ANN_RECONCILE, "handledReconcile"),
    (ANN_RETRY_FAILED, "handledRetryFailed"),
)


def finished(status: dict[str, Any]) -> bool:
    """Whether the status says the import is over (Completed or Failed)."""
    return str(status.get("summary") or "") in ("Completed", "Failed")


def requests_pending(status: dict[str, Any], annotations: dict[str, str]) -> bool:
    """Whether a request annotation carries a value the status does not record as handled."""
    return any(
        annotations.get(key) and annotations.get(key) != status.get(handled)
        for key, handled in REQUESTS
    )


def needs_polling(status: dict[str, Any], annotations: dict[str, str]) -> bool:
    """Whether the timer reconciles an ImportJob: not when it is Completed or Failed, unless
    one of the operator's annotations awaits handling (kopf ignores this operator's own
    annotation prefix in its diffs; on a finished ImportJob an event handler acts on them too,
    because kopf does not start a timer again while the one stopped is still finishing a tick).
    A spec change or a Job event still reconciles a finished ImportJob."""
    return not finished(status) or requests_pending(status, annotations)


#: how often the timer looks at an ImportJob held back by the operator-wide budget: the capacity
#: keeper prompts it when a slot frees, so the timer is only the backstop for a lost prompt (a
#: thousand waiting ImportJobs at the 10 s interval were 100 reconciles a second, starving the
#: handler threads that take in new ImportJobs and Job events)
WAITING_BACKSTOP_S = 60.0


def timer_due(status: dict[str, Any], last: float | None, now: float, interval: float) -> bool:
    """Whether a timer tick reconciles an ImportJob now, given when a tick last did (`last`,
    monotonic seconds, None if never). Every tick, except for one waiting for capacity with
    nothing of its own running (status `heldBatches` > 0, `activeBatches` 0): then once per
    WAITING_BACKSTOP_S (never less often than the interval)."""
    if last is None:
        return True
    held, active = status.get("heldBatches") or 0, status.get("activeBatches") or 0
    if not held or active:
        return True
    return now - last >= max(interval, WAITING_BACKSTOP_S)
