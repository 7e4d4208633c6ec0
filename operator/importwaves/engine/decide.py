"""The coordinator's brain: a pure function from one job snapshot to one decision.

No I/O here. Rules (from the seed design):
- main waves run one at a time in parent-first order; a wave is dispatched only when every wave
  before it has completed;
- a derived wave is dispatched only while its gate is open (parents >= completion threshold);
- at most `parallelism` batches are handed to workers at once (main waves first);
- COMPLETION GUARD: the job completes only when every batch of every wave, main and derived, has
  completed, every derived type's parents are all complete and every completed parent batch has
  had its derived batches created. While derived batches are pending or active the answer is
  `derived_wave_triggered` or `derived_pending` and monitoring stays on;
- the job fails only when a batch ran out of attempts and nothing else can move.

`derivation` is the coordinator's other pure choice: when, in a run, to create the derived
batches of completed parent batches that lack them (see its docstring).
"""

from __future__ import annotations

from enum import StrEnum

from importwaves.engine.model import (
    Decision,
    Dispatch,
    GuardReport,
    JobStatus,
    Outcome,
    Snapshot,
)


def decide(snap: Snapshot) -> Decision:
    if snap.status == JobStatus.COMPLETED:
        return Decision(Outcome.COMPLETED, "already completed", keep_monitoring=False)

    gates = {g.wave_number: g for g in snap.gates}
    ready = tuple(sorted(n for n, g in gates.items() if g.open))
    main = sorted(snap.main_waves, key=lambda w: w.wave_number)
    derived = sorted(snap.derived_waves, key=lambda w: w.wave_number)
    main_done = all(w.all_completed for w in main)
    guard = _guard(snap, main_done, all(gates[w.wave_number].open for w in derived))

    if snap.suspended:
        return Decision(
            Outcome.SUSPENDED,
            f"suspended; {snap.active} batch(es) still running",
            job_status=JobStatus.SUSPENDED,
            guard=guard,
            derived_ready=ready,
        )

    capacity = max(0, snap.parallelism - snap.active)
    dispatches: list[Dispatch] = []

    current = next((w for w in main if not w.all_completed), None)
    if current is not None and current.pending and capacity:
        n = min(capacity, current.pending)
        dispatches.append(Dispatch(current.wave_number, n, derived=False))
        capacity -= n

    for w in derived:
        if capacity and w.pending and gates[w.wave_number].open:
            n = min(capacity, w.pending)
            dispatches.append(Dispatch(w.wave_number, n, derived=True))
            capacity -= n

    derived_complete = all(w.all_completed and gates[w.wave_number].parents_done for w in derived)
    if main_done and derived_complete and snap.awaiting_derivation == 0:
        return Decision(
            Outcome.COMPLETED,
            "all waves completed, derived included",
            job_status=JobStatus.COMPLETED,
            guard=guard,
            keep_monitoring=False,
            derived_ready=ready,
        )

    failed = sum(w.failed for w in snap.waves)
    if failed and not dispatches and snap.active == 0:
        return Decision(
            Outcome.FAILED,
            f"{failed} batch(es) failed after their last attempt; nothing else can run",
            job_status=JobStatus.FAILED,
            guard=guard,
            keep_monitoring=False,
            derived_ready=ready,
        )

    status = JobStatus.RUNNING if snap.status != JobStatus.RUNNING else None
    if any(d.derived for d in dispatches):
        n = sum(d.limit for d in dispatches if d.derived)
        return Decision(
            Outcome.DERIVED_WAVE_TRIGGERED,
            f"dispatched {n} derived batch(es)",
            tuple(dispatches),
            status,
            guard,
            derived_ready=ready,
        )
    if dispatches:
        d = dispatches[0]
        return Decision(
            Outcome.WAVE_TRIGGERED,
            f"dispatched {d.limit} batch(es) of wave {d.wave_number}",
            tuple(dispatches),
            status,
            guard,
            derived_ready=ready,
        )
    if main_done:
        return Decision(
            Outcome.DERIVED_PENDING,
            _derived_pending_reason(guard),
            (),
            status,
            guard,
            derived_ready=ready,
        )
    return Decision(
        Outcome.IN_PROGRESS,
        f"{snap.active} batch(es) running",
        (),
        status,
        guard,
        derived_ready=ready,
    )


def _guard(snap: Snapshot, main_done: bool, gates_open: bool) -> GuardReport:
    derived = snap.derived_waves
    return GuardReport(
        main_done=main_done,
        derived_unfinished=sum(w.unfinished for w in derived),
        derived_active=sum(w.active for w in derived),
        awaiting_derivation=snap.awaiting_derivation,
        gates_open=gates_open,
    )


def _derived_pending_reason(g: GuardReport) -> str:
    parts = []
    if g.derived_unfinished:
        parts.append(f"{g.derived_unfinished} derived batch(es) pending or active")
    if g.awaiting_derivation:
        parts.append(f"{g.awaiting_derivation} parent batch(es) awaiting derived creation")
    if not g.gates_open:
        parts.append("parents below the completion threshold")
    return "main waves done; " + (", ".join(parts) or "derived waves not finished")


class Derivation(StrEnum):
    """When a coordinator run creates the derived batches its snapshot says are awaited."""

    #: none awaited, or create them now, then decide with them
    NOW = "now"
    #: the snapshot already lets the run dispatch derived batches (of earlier parents): dispatch
    #: those and commit first; a second run creates the rest and decides on them
    AFTER_DISPATCH = "after_dispatch"
    #: the gate is closed but its last parent batches may all be running: leave the creation to
    #: the run that sees the threshold crossed (AFTER_DISPATCH there), so that run never waits
    #: behind this one's creation; enough derived batches are pending to fill its slots
    AT_THRESHOLD = "at_threshold"


def derivation(snap: Snapshot) -> Derivation:
    """When to create the derived batches awaited in `snap`: a pure function of the snapshot.

    Creating a parent batch's derived batches reads its children in staging (milliseconds per
    parent batch) under the job lock. On the path from the parents' threshold crossing to the
    first derived dispatch (the dispatch lag) that time is waste whenever derived batches of
    earlier parents are already pending: those can go first, in any order (the gate is open for
    all of them). Never delays anything else: the completion guard counts awaited parents (no
    completion before they are created), and every run that finds the gate open creates them,
    at the latest in the second run of the crossing's own call."""
    if not snap.awaiting_derivation:
        return Derivation.NOW
    if any(d.derived for d in decide(snap).dispatches):
        return Derivation.AFTER_DISPATCH
    pending = sum(w.pending for w in snap.derived_waves)
    closed = [g for g in snap.gates if not g.open]
    if (
        closed
        and len(closed) == len(snap.gates)
        and pending >= snap.parallelism
        and any(g.parents_needed - g.parent_completed <= snap.parallelism for g in closed)
    ):
        return Derivation.AT_THRESHOLD
    return Derivation.NOW
