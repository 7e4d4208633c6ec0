"""What launchers share: `BatchDispatch` (built from a batch row in ONE place), the recording
launcher of tests and hand-driven engines, and the per-batch `Launcher` protocol that only the
operator's one-Job-per-batch path still uses (the engine applies its decisions through the
WorkerLauncher port, launch/port.py)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from importwaves.launch.port import LaunchProblem, LaunchTarget, Observation, WorkerGroup
from importwaves.spec import ImportSpec


@dataclass(frozen=True)
class BatchDispatch:
    """One batch handed to workers; `dispatch_seq` is its fencing token."""

    job_id: str
    batch_id: str
    wave_number: int
    record_type_id: int
    dispatch_seq: int
    attempt: int

    @classmethod
    def from_row(cls, job_id: str, row: Mapping[str, Any]) -> BatchDispatch:
        """The one place a batch row (batch_id, wave_number, record_type_id, dispatch_seq,
        attempts) becomes a BatchDispatch: `attempt` is the attempt its worker's claim counts."""
        return cls(
            job_id,
            row["batch_id"],
            int(row["wave_number"]),
            int(row["record_type_id"]),
            int(row["dispatch_seq"]),
            int(row["attempts"]) + 1,
        )


#: Longest launch-failure text kept (an API server's answer can be long; it is stored in the
#: batch row and shown in status and Events).
MAX_LAUNCH_ERROR = 1000


def clip_error(error: str) -> str:
    if len(error) > MAX_LAUNCH_ERROR:
        return f"{error[: MAX_LAUNCH_ERROR - 15].rstrip()} ...(truncated)"
    return error


@dataclass(frozen=True)
class LaunchFailure:
    batch: BatchDispatch
    error: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", clip_error(self.error))


class Launcher(Protocol):
    """Per-batch launching (the operator's one-Job-per-batch mode, until it moves onto
    Engine.sync_workers); the engine itself no longer launches per batch."""

    def launch(
        self, tenant: str, job_id: str, spec: ImportSpec, batches: Sequence[BatchDispatch]
    ) -> list[LaunchFailure]:
        """Start a worker for each batch; return the ones that could not be started."""
        ...


@runtime_checkable
class DispatchObserver(Protocol):
    """A launcher that wants to see every dispatched batch (the recording launcher: a test runs
    those batches by hand)."""

    def on_dispatched(self, job_id: str, batches: Sequence[BatchDispatch]) -> None: ...


class NoWorkers:
    """A WorkerLauncher that starts nothing and sees nothing (an engine whose host runs its
    workers some other way); its observation is incomplete, so no batch is declared lost."""

    per_wave = False

    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        return []

    def observe(self, target: LaunchTarget, tenant: str, job_id: str) -> Observation:
        return Observation((), complete=False)

    def discard(
        self,
        target: LaunchTarget,
        tenant: str,
        job_id: str,
        worker_ids: Sequence[str],
        keep: Sequence[str] = (),
    ) -> None:
        return None


class RecordingLauncher(NoWorkers):
    """Starts nothing and remembers what the engine dispatched (`launched`, thread-safe) and the
    worker groups it asked for (`ensured`): the engine driven by hand or in tests, whose
    workers (worker.run_batch, or pooled workers) the caller runs."""

    def __init__(self) -> None:
        self.launched: list[BatchDispatch] = []
        self.ensured: list[WorkerGroup] = []
        self._rec_lock = threading.Lock()

    def on_dispatched(self, job_id: str, batches: Sequence[BatchDispatch]) -> None:
        with self._rec_lock:
            self.launched.extend(batches)

    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        with self._rec_lock:
            self.ensured.extend(groups)
        return []
