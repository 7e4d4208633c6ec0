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
  recorded now, as a lost batch, or had nothing to record), and workers that cannot start
  (below) once that is reported.
- Start problems (`start_problem`, a table of the kubelet's waiting reasons): a worker whose
  process cannot start and will not by itself (the image refused by runAsNonRoot:
  CreateContainerConfigError; InvalidImageName; ErrImageNeverPull; ErrImagePull or
  ImagePullBackOff for longer than `pull_grace`; a pod that ended without its process ever
  running) is a launch problem naming the pod, the reason and the kubelet's message. When no
  worker of its group runs, it is permanent: the one launch-failure policy (`plan_problems`)
  fails the attempt of the group's dispatched batches, the stuck workers are discarded (their
  Job deleted, so the wave's next Job is made from the current pod settings) and the group is
  not started again in the same sync. Waiting that resolves by itself (ContainerCreating,
  PodInitializing, a pull shorter than the grace, not scheduled yet) is not a problem: the
  worker is starting.
- Unclaimed dispatches (`plan_unclaimed`, applied by recovery): what counts an attempt. A batch
  dispatched and not claimed within the claim timeout costs an attempt only when its group had
  the whole claim timeout to claim it: a worker of the group has run idle (holding no batch)
  for at least the claim timeout. It costs nothing, and stays dispatched, while its group is
  still starting (a worker pending without a start problem, a worker that started less than
  the claim timeout ago, a launch made less than the claim timeout ago with no worker seen
  yet) or busy (every running worker of the group holds a batch). With no live worker and no
  launch in progress it is released (back to pending, no attempt): the next check dispatches
  it again and the sync starts its group. A worker that cannot start is a launch problem
  (above), not a claim timeout. An incomplete observation (an API error, or a launcher that
  sees nothing) knows nothing of the workers: the claim timeout alone decides, and the
  unclaimed dispatch costs an attempt (a launcher that never gets a batch claimed ends in
  `failed` instead of looping).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from importwaves.engine.model import WaveState
from importwaves.launch.port import LaunchProblem, Observation, WorkerGroup, WorkerSeen

#: Job statuses for which no worker is wanted (a worker of such a job exits by itself).
IDLE_STATUSES = frozenset({"completed", "failed", "invalid", "suspended"})

#: Seconds a processing batch whose worker is not alive keeps its claim (a heartbeat in flight,
#: an observation taken a moment before the worker started).
DEFAULT_GRACE = 5.0

#: Seconds a worker may wait in ErrImagePull / ImagePullBackOff before that is a launch problem
#: (a registry hiccup resolves within the kubelet's first pull retries: 10 s, 20 s, 40 s).
DEFAULT_PULL_GRACE = 120.0

#: The kubelet's waiting reasons, by what they mean for a worker that has not started:
#: "never": will not resolve by itself (a launch problem at once); "pull": a failing image pull,
#: a launch problem after `pull_grace`; any other reason (ContainerCreating, PodInitializing,
#: Unschedulable, none yet) is a start in progress.
WAITING_REASONS: dict[str, Literal["never", "pull"]] = {
    "CreateContainerConfigError": "never",
    "InvalidImageName": "never",
    "ErrImageNeverPull": "never",
    "ErrImagePull": "pull",
    "ImagePullBackOff": "pull",
    "CreateContainerError": "pull",
    "RunContainerError": "pull",
}


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
    #: seconds since its dispatch, by the database clock (None: take `quiet`)
    since_dispatch: float | None = None


def held_batch(row: Mapping[str, Any], names: Mapping[int, str]) -> HeldBatch:
    """A `batches_held` row as a HeldBatch (`names`: record type names by id)."""
    rtid = int(row["record_type_id"])
    return HeldBatch(
        row["batch_id"],
        int(row["wave_number"]),
        names.get(rtid, str(rtid)),
        row["status"],
        int(row["dispatch_seq"]),
        row["worker_id"],
        float(row["quiet"] or 0.0),
        None if row.get("since_dispatch") is None else float(row["since_dispatch"]),
    )


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
    #: workers that cannot start, as launch problems (see the module docstring)
    problems: tuple[LaunchProblem, ...] = ()


def start_problem(
    w: WorkerSeen, *, pull_grace: float = DEFAULT_PULL_GRACE, launch_active: bool = True
) -> str | None:
    """Why worker `w` cannot start and will not by itself ("worker pod <name> cannot start:
    <reason>: <kubelet's message>"), or None: it runs, it ended after running, or its start is
    still in progress (a transient wait). An ended worker whose process never ran is a problem
    while its launch is in progress (`launch_active`: its Job still retries the same pod);
    once that launch has ended it is history (a later launch may have other settings)."""
    if w.started:
        return None
    if not w.alive:
        # it ended without its process ever running: nothing left to wait for
        kind: str | None = "never" if launch_active else None
    else:
        kind = WAITING_REASONS.get(w.waiting)
        if kind == "pull" and (w.age is None or w.age < pull_grace):
            kind = None
    if kind is None:
        return None
    reason = w.waiting or "did not start"
    head = f"worker pod {w.worker_id} cannot start: {reason}"
    if kind == "pull" and w.alive and w.age is not None:
        head += f" for {int(w.age)}s"
    return f"{head}: {w.waiting_message}" if w.waiting_message else head


@dataclass(frozen=True)
class FailLaunch:
    """A permanent launch problem: these dispatched batches' attempt failed."""

    batches: tuple[HeldBatch, ...]
    error: str


@dataclass(frozen=True)
class ProblemPlan:
    fail: tuple[FailLaunch, ...] = ()
    retry: tuple[LaunchProblem, ...] = field(default_factory=tuple)


#: Seconds ahead of a wave's expected opening its workers are started (`wave_ahead`): a pod
#: start on a real cluster takes seconds (Kubernetes' pod-startup SLO: 5 s at p99), well below
#: the pooled worker's idle timeout (30 s) that ends workers started too early.
AHEAD_SECONDS = 5.0


def wave_ahead(
    job_id: str,
    waves: Sequence[WaveState],
    parallelism: int,
    *,
    now: datetime | None = None,
    lead: float = AHEAD_SECONDS,
) -> WorkerGroup | None:
    """The next wave's worker group, to start BEFORE its first dispatch (one work-queue Job per
    wave: a pod start costs seconds, paid once per wave, in sequence, if the Job waits for the
    dispatch). The next wave is the first, by number, with no dispatch yet. It is started once
    every earlier wave with work left is running, has completed a batch, and at the rate it
    has completed batches since its first dispatch is expected to finish within `lead`
    seconds ((pending + active) / rate); and no earlier batch failed for good. So a first wave
    whose only batch keeps failing starts no Job for the next, nor does anything before the
    first completions. Its workers claim only dispatched batches of their wave (and wait on
    LISTEN until then): the engine still decides every dispatch, so a derived wave's workers
    claim nothing before its parents reach the completion threshold. Size: a main wave's
    batches (all made at planning), at most the parallelism; a derived wave grows while its
    parents complete: the parallelism. None: nothing to start ahead."""
    now = now or datetime.now(UTC)
    ordered = sorted(waves, key=lambda w: w.wave_number)
    for i, w in enumerate(ordered):
        if w.first_dispatched_at is not None or w.active or w.completed or w.failed:
            continue  # started (or done): its group is the held batches' business
        earlier = [e for e in ordered[:i] if e.pending or e.active]
        if not earlier or any(e.failed for e in ordered[:i]):
            return None
        for e in earlier:
            if not e.active or not e.completed or e.first_dispatched_at is None:
                return None
            elapsed = (now - e.first_dispatched_at).total_seconds()
            if (e.pending + e.active) * max(elapsed, 0.0) / e.completed > lead:
                return None
        size = parallelism if w.is_derived else min(parallelism, w.pending)
        if size <= 0:
            return None
        return WorkerGroup(job_id, w.wave_number, w.name, size)
    return None


def after_dispatch(
    waves: Sequence[WaveState], dispatched: Mapping[int, int]
) -> tuple[WaveState, ...]:
    """The waves of a snapshot read before a dispatch, as they are after it (`dispatched`:
    batches dispatched per wave number): pending -> dispatched, first dispatch stamped."""
    return tuple(
        replace(
            w,
            pending=max(0, w.pending - n),
            dispatched=w.dispatched + n,
            first_dispatched_at=w.first_dispatched_at or datetime.now(UTC),
        )
        if (n := dispatched.get(w.wave_number, 0))
        else w
        for w in waves
    )


def plan_workers(
    job_id: str,
    job_status: str | None,
    parallelism: int,
    held: Sequence[HeldBatch],
    seen: Observation,
    *,
    per_wave: bool,
    grace: float = DEFAULT_GRACE,
    pull_grace: float = DEFAULT_PULL_GRACE,
    ahead: WorkerGroup | None = None,
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
    # workers that cannot start, by group; permanent when nothing of their group runs
    stuck: dict[int | None, list[tuple[WorkerSeen, str]]] = {}
    healthy: set[int | None] = set()  # groups with a worker that runs or is starting normally
    launches = {x.name for x in seen.launches}
    for w in seen.workers:
        key = w.wave_number if per_wave else None
        why = start_problem(
            w, pull_grace=pull_grace, launch_active=not w.launch or w.launch in launches
        )
        if why is not None:
            stuck.setdefault(key, []).append((w, why))
        elif w.alive:
            healthy.add(key)
    problems: list[LaunchProblem] = []
    blocked: set[int | None] = set()
    stuck_ids: set[str] = set()
    for key in sorted(stuck, key=lambda k: -1 if k is None else k):
        running = key in healthy
        names = [b.record_type_name for b in held if (b.wave_number if per_wave else None) == key]
        group = WorkerGroup(job_id, key, names[0] if names and per_wave else "", 0)
        why = stuck[key][0][1]
        more = len(stuck[key]) - 1
        text = why + (f" (and {more} more worker(s) of this group)" if more else "")
        problems.append(LaunchProblem(group, text, permanent=seen.complete and not running))
        if seen.complete and not running:
            blocked.add(key)
            stuck_ids.update(w.worker_id for w, _ in stuck[key] if w.alive)
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
            if size > 0 and key not in blocked:
                groups.append(WorkerGroup(job_id, key, name, size))
        # the next wave's workers ahead of its dispatch (per wave only: a job's one group
        # already runs every wave's batches)
        if (
            per_wave
            and ahead is not None
            and ahead.wave_number not in counts
            and ahead.wave_number not in blocked
        ):
            groups.append(ahead)
    discard = tuple(sorted({w for w in ended if w not in waiting} | stuck_ids))
    return WorkerPlan(tuple(groups), tuple(lost), discard, tuple(problems))


@dataclass(frozen=True)
class Unclaimed:
    """What to do with a batch dispatched longer than the claim timeout ago and not claimed:
    "count": its attempt failed (back to pending, or failed when it was its last); "release":
    back to pending without costing an attempt; "wait": nothing (it stays dispatched)."""

    batch: HeldBatch
    action: Literal["count", "release", "wait"]
    why: str


def plan_unclaimed(
    held: Sequence[HeldBatch],
    seen: Observation,
    *,
    per_wave: bool,
    claim_timeout: float,
    pull_grace: float = DEFAULT_PULL_GRACE,
) -> tuple[Unclaimed, ...]:
    """The claim-timeout decision for every batch of `held` that is dispatched (unclaimed) for
    longer than `claim_timeout` (see the module docstring for what counts an attempt; a batch a
    pooled worker reserved for its custom command counts once that worker has run the whole
    claim timeout). `held`: all the job's dispatched and processing batches (a running
    worker that holds a processing batch is busy)."""
    overdue = [
        b
        for b in held
        if b.status == "dispatched"
        and (b.quiet if b.since_dispatch is None else b.since_dispatch) > claim_timeout
    ]
    if not overdue:
        return ()
    late = f"not claimed by a worker within {claim_timeout:g} s"
    if not seen.complete:
        return tuple(
            Unclaimed(b, "count", f"{late} (its workers could not be observed)") for b in overdue
        )
    busy = {b.worker_id for b in held if b.worker_id}  # claimed, or reserved for a command
    out: list[Unclaimed] = []
    for b in overdue:
        if b.worker_id:
            # reserved by a pooled worker for its custom command, which has not claimed it: it
            # counts once that worker has run the whole claim timeout (it is not starting); a
            # reserving worker that ended is the sync's lost batch (plan_workers)
            owner = next((w for w in seen.workers if w.worker_id == b.worker_id), None)
            if owner is None or not owner.alive:
                continue
            if owner.running_for is not None and owner.running_for < claim_timeout:
                out.append(Unclaimed(b, "wait", f"{late}: worker {owner.worker_id} is starting"))
                continue
            out.append(
                Unclaimed(
                    b,
                    "count",
                    f"{late}: worker {owner.worker_id} reserved it for its command, which did "
                    "not claim it",
                )
            )
            continue
        key = b.wave_number if per_wave else None
        mine = [w for w in seen.workers if not per_wave or w.wave_number == key]
        what = f"wave {b.wave_number}" if per_wave else "the job"
        live = [w for w in mine if w.alive]
        running = [w for w in live if w.started]
        idle = [
            w
            for w in running
            if w.worker_id not in busy and (w.running_for is None or w.running_for >= claim_timeout)
        ]
        if idle:
            out.append(
                Unclaimed(
                    b,
                    "count",
                    f"{late}, though worker {idle[0].worker_id} of {what} ran idle that long",
                )
            )
            continue
        starting = [
            w
            for w in live
            if not w.started and start_problem(w, pull_grace=pull_grace, launch_active=True) is None
        ]
        fresh = [w for w in running if w.worker_id not in busy]  # started < claim_timeout ago
        young = [
            x
            for x in seen.launches
            if (not per_wave or x.wave_number == key) and x.age < claim_timeout
        ]
        if starting or fresh or young:
            if starting:
                w0 = starting[0]
                detail = f"worker {w0.worker_id} is starting" + (
                    f" ({w0.waiting})" if w0.waiting else ""
                )
            elif fresh:
                detail = f"worker {fresh[0].worker_id} started less than {claim_timeout:g} s ago"
            else:
                detail = f"launch {young[0].name or what} was made {int(young[0].age)} s ago"
            out.append(Unclaimed(b, "wait", f"{late}: {what} is still starting ({detail})"))
            continue
        if running:  # every running worker of the group holds a batch: it waits for one
            out.append(Unclaimed(b, "wait", f"{late}: every worker of {what} is busy"))
            continue
        if live:  # only workers that cannot start: a launch problem, reported by the sync
            out.append(Unclaimed(b, "wait", f"{late}: the workers of {what} cannot start"))
            continue
        gone = [w for w in mine if not w.alive and w.exit_code not in (None, 0)]
        note = f"; last: {_why(gone[-1].worker_id, {w.worker_id: w for w in gone})}" if gone else ""
        out.append(
            Unclaimed(
                b,
                "release",
                f"released: {late} and no worker of {what} is alive{note}",
            )
        )
    return tuple(out)


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
    """One launch-failure policy: a permanent problem (a refused Job, a group whose workers
    cannot start) fails the attempt of the group's dispatched batches no worker reserved
    ("launch failed: ..."); a transient one is retried by the next sync (the batches stay
    dispatched; recovery's claim-timeout decision, `plan_unclaimed`, applies to them)."""
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
