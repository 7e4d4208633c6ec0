"""The batch-completed listener (seed A) and the DerivedWavesCreated listener (seed D).

Order matters: the completion is recorded and COMMITTED first; only then is the parent
completion recomputed from the database, so the last parent batch always sees itself counted.
The listener never skips the progression nudge, whatever the monitoring flag says.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg_pool import ConnectionPool

from importwaves import metrics
from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine import derived
from importwaves.engine.coordinator import Coordinator, RunResult
from importwaves.engine.events import DerivedWavesCreated, EventBus
from importwaves.engine.model import Outcome
from importwaves.engine.snapshot import gates, read_waves
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
        """A worker reported success (or its pod exited 0). Idempotent."""
        with self.pool.connection() as conn:
            with conn.transaction():
                recorded = conn.execute(
                    Q("batch_complete"),
                    {
                        "job_id": job_id,
                        "batch_id": batch_id,
                        "dispatch_seq": dispatch_seq,
                    },
                ).fetchone()
            # --- committed: everything below sees this completion ---
            batch = conn.execute(
                Q("batch_get"), {"job_id": job_id, "batch_id": batch_id}
            ).fetchone()
            job = conn.execute(Q("job_get"), {"job_id": job_id}).fetchone()
            conn.commit()
            if batch is None or job is None:
                return RunResult(job_id, Outcome.NOT_FOUND, f"no batch {batch_id}")
            metrics.COMPLETIONS.labels(self.tenant).inc()
            event(
                log,
                "batch_completed",
                logging.DEBUG,
                job_id=job_id,
                batch_id=batch_id,
                recorded_by="listener" if recorded else "worker",
                status=batch["status"],
            )
            spec = ImportSpec.model_validate(job["spec"])
            created = None
            if batch["record_type_id"] in spec.derived_parent_type_ids():
                created = self._derived_after_parent(conn, job_id, spec, batch)
        # Emit only once the connection is back in the pool: the DerivedWavesCreated handler
        # runs the coordinator, which borrows a connection of its own; holding this one meanwhile
        # lets `pool size` concurrent completions exhaust the pool and stall on each other.
        if created is not None:
            self.bus.emit(created)
        return self.coordinator.check_and_trigger_next_wave(job_id, cause="batch_completed")

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
    def _derived_after_parent(
        self, conn: Conn, job_id: str, spec: ImportSpec, batch: dict[str, Any]
    ) -> DerivedWavesCreated | None:
        """Create derived batches after the parent's completion committed; return the
        DerivedWavesCreated event for the caller to emit (after it released `conn`)."""
        with conn.transaction():
            if conn.execute(Q("job_lock"), {"job_id": job_id}).fetchone() is None:
                return None
            created = derived.create_for_batch(conn, job_id, spec, self.flags, batch)
            # Recompute parent completion from the DB, after the commit above.
            open_gates = [g for g in gates(spec, read_waves(conn, job_id)) if g.open]
            if open_gates:
                created += derived.create_for_completed_parents(conn, job_id, spec, self.flags)
        if open_gates:
            self.flags.set_derived_ready(job_id)
            self.flags.set_monitoring(job_id)
            event(
                log,
                "derived_initialized",
                job_id=job_id,
                tenant=self.tenant,
                parent_batch_id=batch["batch_id"],
                parent_completion_percent=round(min(g.percent for g in open_gates), 2),
                threshold=spec.completionThreshold,
                created_batches=len(created.batch_ids),
            )
        if not created.batch_ids:
            return None
        return DerivedWavesCreated(
            self.tenant,
            job_id,
            tuple(sorted(created.wave_numbers)),
            len(created.batch_ids),
            source="listener",
        )


class DerivedWavesCreatedListener:
    """Seed D: derived creation nudges the coordinator at once, not at the next tick."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def __call__(self, evt: DerivedWavesCreated) -> RunResult:
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
            outcome=result.outcome.value,
            dispatched_batch_count=len(result.dispatched),
        )
        return result
