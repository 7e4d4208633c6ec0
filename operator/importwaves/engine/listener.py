"""The batch-completed listener (seed A) and the DerivedWavesCreated listener (seed D).

Order matters: the completion is recorded and COMMITTED first; only then is the parent
completion recomputed from the database, so the last parent batch always sees itself counted.
The listener never skips the progression nudge, whatever the monitoring flag says.

After that commit, one coordinator run does the rest under the job lock, in ONE transaction: the
parent batch's derived batches are created first (the run's `prepare` step), then the run reads
its snapshot (parent completion recomputed from the database), decides and dispatches, with
the derived batches just created included. So the completion of the last parent batch reaches
the first derived dispatch with a single commit, and the DerivedWavesCreated nudge (seed D) is
already done by the time the event is emitted.
"""

from __future__ import annotations

import logging

from psycopg_pool import ConnectionPool

from importwaves import metrics
from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine import derived
from importwaves.engine.coordinator import Coordinator, RunResult
from importwaves.engine.events import DerivedWavesCreated, EventBus
from importwaves.engine.model import Outcome
from importwaves.flags import Flags
from importwaves.launch.base import LaunchFailure
from importwaves.log import event
from importwaves.spec import ImportSpec

log = logging.getLogger("importwaves.listener")


class BatchCompletedListener:
    def __init__(
        self,
        tenant: str,
        pool: ConnectionPool[Conn],
        flags: Flags,
        bus: EventBus,
        coordinator: Coordinator,
    ) -> None:
        self.tenant = tenant
        self.pool = pool
        self.flags = flags
        self.bus = bus
        self.coordinator = coordinator

    def on_completed(self, job_id: str, batch_id: str, dispatch_seq: int) -> RunResult:
        """A worker reported success (or its pod exited 0). Idempotent.

        Fast path: the reference worker records its own completion in its transaction, so the
        coordinator run reads the batch row under the job lock (no round trip before it). If the
        completion is not recorded yet, the run is abandoned before it changes anything, the
        completion is recorded and committed here (fenced by the dispatch sequence), and the run
        is made again."""
        try:
            return self._derived_after_parent(job_id, batch_id, recorded_by="worker")
        except _NotRecorded:
            pass
        ids = {"job_id": job_id, "batch_id": batch_id}
        with self.pool.connection() as conn, conn.transaction():
            recorded = conn.execute(
                Q("batch_complete"), {**ids, "dispatch_seq": dispatch_seq}
            ).fetchone()
        # --- committed: the coordinator run below sees this completion ---
        return self._derived_after_parent(
            job_id, batch_id, recorded_by="listener" if recorded else "nobody (fenced)"
        )

    def on_failed(self, job_id: str, batch_id: str, dispatch_seq: int, error: str) -> RunResult:
        """A worker failed (or its pod did); counts an attempt unless the worker already did."""
        with self.pool.connection() as conn, conn.transaction():
            job = conn.execute(Q("job_get"), {"job_id": job_id}).fetchone()
            if job is None:
                return RunResult(job_id, Outcome.NOT_FOUND, "no such job")
            spec = ImportSpec.model_validate(job["spec"])
            row = conn.execute(
                Q("batch_fail"),
                {
                    "job_id": job_id,
                    "batch_id": batch_id,
                    "dispatch_seq": dispatch_seq,
                    "max_attempts": spec.max_attempts,
                    "error": error[:4000],
                },
            ).fetchone()
        if row is not None:
            event(
                log,
                "batch_attempt_failed",
                logging.WARNING,
                job_id=job_id,
                batch_id=batch_id,
                now=row["status"],
                attempts=row["attempts"],
                error=error,
            )
        return self.coordinator.check_and_trigger_next_wave(job_id, cause="batch_failed")

    def on_launch_failure(self, failure: LaunchFailure) -> None:
        b = failure.batch
        with self.pool.connection() as conn, conn.transaction():
            job = conn.execute(Q("job_get"), {"job_id": b.job_id}).fetchone()
            if job is None:
                return
            spec = ImportSpec.model_validate(job["spec"])
            conn.execute(
                Q("batch_fail"),
                {
                    "job_id": b.job_id,
                    "batch_id": b.batch_id,
                    "dispatch_seq": b.dispatch_seq,
                    "max_attempts": spec.max_attempts,
                    "error": f"launch failed: {failure.error}",
                },
            )
        # The next timer tick or completion re-dispatches; no recursion from inside a launch.

    # -- seed A: post-commit derived initialization ---------------------------------------------
    def _derived_after_parent(self, job_id: str, batch_id: str, recorded_by: str) -> RunResult:
        """The coordinator run for a completion, after its commit. For a parent batch, derived
        batches are created first in that run's transaction (under the job lock), for it and
        for any other completed parent batch still without them; the run then recomputes parent
        completion from the database and dispatches."""
        parent = False
        status: str | None = None  # the batch's, as the run read it (None: no such batch)

        def prepare(conn: Conn, spec: ImportSpec) -> derived.Created:
            nonlocal parent, status
            batch = conn.execute(
                Q("batch_get"), {"job_id": job_id, "batch_id": batch_id}
            ).fetchone()
            if batch is None:
                return derived.Created()
            if batch["status"] not in ("completed", "failed") and recorded_by == "worker":
                raise _NotRecorded(batch_id)  # rolls the run back: nothing was changed yet
            status = batch["status"]
            parent = batch["record_type_id"] in spec.derived_parent_type_ids()
            if not parent or batch["status"] != "completed":
                return derived.Created()
            return derived.create_for_completed_parents(conn, job_id, spec)

        def on_commit(result: RunResult) -> None:
            snap = result.snapshot
            if not parent or snap is None:
                return
            # Parent completion as the run recomputed it from the DB, after the commit above.
            open_gates = [g for g in snap.gates if g.open]
            if not open_gates:
                return
            self.flags.set_derived_ready(job_id)
            self.flags.set_monitoring(job_id)
            event(
                log,
                "derived_initialized",
                job_id=job_id,
                tenant=self.tenant,
                parent_batch_id=batch_id,
                parent_completion_percent=round(min(g.percent for g in open_gates), 2),
                threshold=min(g.threshold for g in open_gates),
                created_batches=result.derived_created,
                dispatched_batches=len(result.dispatched),
            )

        result = self.coordinator.check_and_trigger_next_wave(
            job_id,
            cause="batch_completed",
            prepare=prepare,
            on_commit=on_commit,
            source="listener",
        )
        if status is None:
            if result.outcome == Outcome.NOT_FOUND:
                return result
            return RunResult(job_id, Outcome.NOT_FOUND, f"no batch {batch_id}")
        # counted once the run that read the batch has committed
        metrics.COMPLETIONS.labels(self.tenant).inc()
        event(
            log,
            "batch_completed",
            logging.DEBUG,
            job_id=job_id,
            batch_id=batch_id,
            recorded_by=recorded_by,
            status=status,
        )
        return result


class _NotRecorded(Exception):
    """The worker's completion is not in the database (yet): take the recording path."""


class DerivedWavesCreatedListener:
    """Seed D: derived creation nudges the coordinator at once, not at the next tick.

    The engine creates derived batches only inside coordinator runs, which decide with them
    included before they commit (evt.decided): that run was the nudge. Batches created any other
    way get a coordinator run here."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def __call__(self, evt: DerivedWavesCreated) -> RunResult | None:
        if evt.decided:
            event(
                log,
                "derived_waves_created_handled",
                job_id=evt.job_id,
                tenant=evt.tenant,
                wave_numbers=list(evt.wave_numbers),
                batch_count=evt.batch_count,
                source=evt.source,
                nudged=False,
                reason="decided in the run that created them",
            )
            return None
        result = self.coordinator.check_and_trigger_next_wave(
            evt.job_id, cause="derived_waves_created"
        )
        event(
            log,
            "derived_waves_created_handled",
            job_id=evt.job_id,
            tenant=evt.tenant,
            wave_numbers=list(evt.wave_numbers),
            batch_count=evt.batch_count,
            source=evt.source,
            nudged=True,
            outcome=result.outcome.value,
            dispatched_batch_count=len(result.dispatched),
        )
        return result
