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
"""

from __future__ import annotations

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
