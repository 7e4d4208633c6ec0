"""The launcher protocol shared by the local and the Kubernetes launcher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from importwaves.spec import ImportSpec


@dataclass(frozen=True)
class BatchDispatch:
    """One batch handed to a worker; `dispatch_seq` is its fencing token."""

    job_id: str
    batch_id: str
    wave_number: int
    record_type_id: int
    dispatch_seq: int
    attempt: int


#: Longest launch-failure text kept (an API server's answer can be long; it is stored in the
#: batch row and shown in status and Events).
MAX_LAUNCH_ERROR = 1000


@dataclass(frozen=True)
class LaunchFailure:
    batch: BatchDispatch
    error: str

    def __post_init__(self) -> None:
        if len(self.error) > MAX_LAUNCH_ERROR:
            cut = self.error[: MAX_LAUNCH_ERROR - 15].rstrip()
            object.__setattr__(self, "error", f"{cut} ...(truncated)")


class Launcher(Protocol):
    def launch(
        self, tenant: str, job_id: str, spec: ImportSpec, batches: Sequence[BatchDispatch]
    ) -> list[LaunchFailure]:
        """Start a worker for each batch; return the ones that could not be started."""
        ...


class RecordingLauncher:
    """Starts nothing and remembers what it was given (the engine driven by hand or in tests;
    workers are then run by the caller)."""

    def __init__(self) -> None:
        self.launched: list[BatchDispatch] = []

    def launch(
        self, tenant: str, job_id: str, spec: ImportSpec, batches: Sequence[BatchDispatch]
    ) -> list[LaunchFailure]:
        self.launched.extend(batches)
        return []
