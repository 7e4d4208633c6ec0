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
    "controller_owner",
    "needs_polling",
    "owner_label",
]

ANN_RECONCILE = f"{GROUP}/reconcile"
ANN_RETRY_FAILED = f"{GROUP}/retry-failed"


def needs_polling(status: dict[str, Any], annotations: dict[str, str]) -> bool:
    """Whether the timer reconciles an ImportJob: not when it is Completed or Failed, unless
    one of the operator's annotations awaits handling (kopf ignores this operator's own
    annotation prefix in its diffs, so the timer is what notices them). A spec change or a Job
    event still reconciles a finished ImportJob."""
    if str(status.get("summary") or "") not in ("Completed", "Failed"):
        return True
    return any(
        annotations.get(key) and annotations.get(key) != status.get(handled)
        for key, handled in (
            (ANN_RECONCILE, "handledReconcile"),
            (ANN_RETRY_FAILED, "handledRetryFailed"),
        )
    )
