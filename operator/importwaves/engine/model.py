"""Plain data the engine passes around: one job's snapshot in, one decision out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

MAIN = -1  #: dependency_level of main (parent) waves
DERIVED = -2  #: dependency_level of derived (TransactionLine) waves


class JobStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SUSPENDED = "suspended"
    #: planning refused (no staging rows, or rows no batch can cover); re-tried every run
    INVALID = "invalid"
    #: its ImportJob was deleted: batches released, nothing dispatched until submitted again
    CANCELLED = "cancelled"


class Outcome(StrEnum):
    """What one `check_and_trigger_next_wave` run found or did (the seed's return values)."""

    NOT_FOUND = "not_found"
    WAVE_TRIGGERED = "wave_triggered"
    DERIVED_WAVE_TRIGGERED = "derived_wave_triggered"
    DERIVED_PENDING = "derived_pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    SUSPENDED = "suspended"
    INVALID = "invalid"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class WaveState:
    """One wave row with its trigger-maintained batch counters."""

    wave_number: int
    record_type_id: int
    name: str
    level: int
    status: str = "pending"  #: kept by the database from the counters (wave_status())
    total: int = 0
    pending: int = 0
    dispatched: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    first_dispatched_at: datetime | None = None
    last_completed_at: datetime | None = None
    #: rows: staged at planning, skipped (uncoverable, uncoveredRows: Skip), planned (sum of the
    #: batches' record counts) and written (sum of the row counts their workers recorded)
    rows_staged: int = 0
    rows_skipped: int = 0
    rows_planned: int = 0
    rows_written: int = 0

    @property
    def active(self) -> int:
        return self.dispatched + self.processing

    @property
    def unfinished(self) -> int:
        """Batches still pending or handed to a worker."""
        return self.pending + self.active

    @property
    def all_completed(self) -> bool:
        return self.completed == self.total

    @property
    def is_derived(self) -> bool:
        return self.level == DERIVED


def parents_needed(threshold: int, parent_total: int) -> int:
    """The one threshold formula: how many of `parent_total` parent batches must be completed
    before a derived wave may be dispatched at `threshold` percent, ceil(threshold * total / 100)
    in integer arithmetic (no float rounding). No parent batches need none (the gate is open).
    The gate is open exactly when completed >= parents_needed(threshold, total)."""
    if parent_total < 0 or not 0 <= threshold <= 100:
        raise ValueError(f"threshold {threshold} of {parent_total} parent batches")
    return (threshold * parent_total + 99) // 100


@dataclass(frozen=True)
class DerivedGate:
    """Parent completion for one derived wave, from the parents' wave counters."""

    wave_number: int
    parent_total: int
    parent_completed: int
    threshold: int

    @property
    def percent(self) -> float:
        if self.parent_total == 0:
            return 100.0
        return 100.0 * self.parent_completed / self.parent_total

    @property
    def open(self) -> bool:
        """Parents reached the completion threshold: derived batches may be dispatched."""
        return self.parent_completed >= self.parents_needed

    @property
    def parents_needed(self) -> int:
        """Completed parent batches the gate needs (`parents_needed` of the threshold)."""
        return parents_needed(self.threshold, self.parent_total)

    @property
    def parents_done(self) -> bool:
        """Every parent batch completed: no more derived batches can appear."""
        return self.parent_completed == self.parent_total


@dataclass(frozen=True)
class Snapshot:
    """Everything a decision needs about one job, read under the job's lock."""

    job_id: str
    status: JobStatus
    suspended: bool
    parallelism: int
    waves: tuple[WaveState, ...]
    gates: tuple[DerivedGate, ...] = ()
    #: completed parent batches whose derived batches do not exist yet
    awaiting_derivation: int = 0

    def wave(self, number: int) -> WaveState:
        for w in self.waves:
            if w.wave_number == number:
                return w
        raise KeyError(number)

    @property
    def main_waves(self) -> list[WaveState]:
        return [w for w in self.waves if not w.is_derived]

    @property
    def derived_waves(self) -> list[WaveState]:
        return [w for w in self.waves if w.is_derived]

    @property
    def active(self) -> int:
        return sum(w.active for w in self.waves)


@dataclass(frozen=True)
class Dispatch:
    """Hand up to `limit` pending batches of one wave to workers."""

    wave_number: int
    limit: int
    derived: bool


@dataclass(frozen=True)
class GuardReport:
    """The completion guard's view when the main waves are done (logged with every decision)."""

    main_done: bool
    derived_unfinished: int
    derived_active: int
    awaiting_derivation: int
    gates_open: bool


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str
    dispatches: tuple[Dispatch, ...] = ()
    #: new job status to record, or None to leave it
    job_status: JobStatus | None = None
    guard: GuardReport | None = None
    #: keep the monitoring flag alive (refresh its TTL) or clear it
    keep_monitoring: bool = True
    #: derived waves whose gate is open (their derived-ready flag is set)
    derived_ready: tuple[int, ...] = field(default=())
    #: machine-readable reason recorded with job_status (engine/rows.py Code values)
    code: str = ""
