"""The worker lifecycle decision (issue 12): which pooled workers should run, which batches lost
their worker, which ended workers to forget. Pure: `Engine.sync_workers` gathers the inputs
(the job's held batches, its parallelism, the launcher's observation) and applies the answer.

- Groups: one per job (a local launcher) or one per wave (Kubernetes: a work-queue Job per
  wave), each sized min(parallelism, batches of the group dispatched or processing); no group
  while nothing is dispatched or processing. A launcher starts what is missing and never stops
  a live worker: a worker with nothing left exits by itself (idle timeout, terminal job).
- Lost: a `processing` batch (or a `dispatched` one a pooled worker reserved for its custom
  command) whose worker (wave_batches.worker_id) is not alive in a COMPLETE observation (ended,
  or absent), with no sign of life (heartbeat, claim, reservation) for longer than
  `grace` seconds: its attempt failed, with the worker's exit code and last words when its end
  was seen. An incomplete observation (an API error) declares nothing lost.
- Discard: ended workers that hold no batch still waiting out its grace (their end is either
  recorded now, as a lost batch, or had nothing to record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from importwaves.launch.port import LaunchProblem, Observation, WorkerGroup, WorkerSeen

#: Job statuses for which no worker is wanted (a worker of such a job exits by itself).
IDLE_STATUSES = frozenset({"completed", "failed", "invalid", "suspended"})

#: Seconds a processing batch whose worker is not alive keeps its claim (a heartbeat in flight,
#: an observation taken a moment before the worker started).
DEFAULT_GRACE = 5.0


@dataclass(frozen=True)
class HeldBatch:
    """A batch handed to workers, as the sync reads it."""

    batch_id: str
    wave_number: int
    record_type_name: str
    status: str  # "dispatched" | "processing"
    dispatch_seq: int
    worker_id: str | None
    #: seconds since its last sign of life (heartbeat, claim, dispatch), by the database clock
    quiet: float


@dataclass(frozen=True)
class LostBatch:
    batch_id: str
    dispatch_seq: int
    worker_id: str
    error: str


@dataclass(frozen=True)
class WorkerPlan:
    groups: tuple[WorkerGroup, ...] = ()
    lost: tuple[LostBatch, ...] = ()
    discard: tuple[str, ...] = ()


@dataclass(frozen=True)
class FailLaunch:
    """A permanent launch problem: these dispatched batches' attempt failed."""

    batches: tuple[HeldBatch, ...]
    error: str


@dataclass(frozen=True)
class ProblemPlan:
    fail: tuple[FailLaunch, ...] = ()
    retry: tuple[LaunchProblem, ...] = field(default_factory=tuple)


def plan_workers(
    job_id: str,
    job_status: str | None,
    parallelism: int,
    held: Sequence[HeldBatch],
    seen: Observation,
    *,
    per_wave: bool,
    grace: float = DEFAULT_GRACE,
) -> WorkerPlan:
    alive = {w.worker_id for w in seen.workers if w.alive}
    ended = {w.worker_id: w for w in seen.workers if not w.alive}
    lost: list[LostBatch] = []
    waiting: set[str] = set()  # ended workers holding a batch still within its grace
    for b in held:
        # processing: claimed; dispatched with a worker id: reserved by a pooled worker for the
        # custom command it runs (batch_reserve_next)
        if not b.worker_id or b.worker_id in alive:
            continue
        if not seen.complete:
            continue
        if b.quiet <= grace:
            if b.worker_id in ended:
                waiting.add(b.worker_id)
            continue
        lost.append(LostBatch(b.batch_id, b.dispatch_seq, b.worker_id, _why(b.worker_id, ended)))
    lost_ids = {x.batch_id for x in lost}
    groups: list[WorkerGroup] = []
    if job_status not in IDLE_STATUSES and job_status is not None:
        counts: dict[int | None, tuple[str, int]] = {}
        for b in held:
            if b.batch_id in lost_ids:
                continue
            key = b.wave_number if per_wave else None
            name, n = counts.get(key, (b.record_type_name, 0))
            counts[key] = (name if per_wave else "", n + 1)
        for key in sorted(counts, key=lambda k: -1 if k is None else k):
            name, n = counts[key]
            size = min(max(parallelism, 0), n)
            if size > 0:
                groups.append(WorkerGroup(job_id, key, name, size))
    discard = tuple(sorted(w for w in ended if w not in waiting))
    return WorkerPlan(tuple(groups), tuple(lost), discard)


def _why(worker_id: str, ended: dict[str, WorkerSeen]) -> str:
    w = ended.get(worker_id)
    if w is None:
        return f"worker {worker_id} gone"
    code = "?" if w.exit_code is None else str(w.exit_code)
    text = f"worker {worker_id} exited {code}"
    return f"{text}: {w.message}" if w.message else text


def plan_problems(
    problems: Sequence[LaunchProblem], held: Sequence[HeldBatch], *, per_wave: bool
) -> ProblemPlan:
    """One launch-failure policy: a permanent problem fails the attempt of the group's
    dispatched batches no worker reserved ("launch failed: ..."); a transient one is retried by
    the next sync (the batches stay dispatched; recovery requeues one nobody claims in time)."""
    fail: list[FailLaunch] = []
    retry: list[LaunchProblem] = []
    for p in problems:
        if not p.permanent:
            retry.append(p)
            continue
        mine = tuple(
            b
            for b in held
            if b.status == "dispatched"
            and b.worker_id is None
            and (
                not per_wave or p.group.wave_number is None or b.wave_number == p.group.wave_number
            )
        )
        fail.append(FailLaunch(mine, f"launch failed: {p.error}"))
    return ProblemPlan(tuple(fail), tuple(retry))
