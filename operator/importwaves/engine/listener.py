"""The batch-completed listener (seed A) and the DerivedWavesCreated listener (seed D).

A notice is a prompt, never a record: a NOTIFY, a Job's success or a process exit 0 only makes
the engine look at the database. A completion is recorded by the worker's own fenced transaction
(worker.py); an exit 0 whose dispatch recorded none is a failed attempt (`on_worker_exited_ok`).

Order matters: the completion is recorded and COMMITTED first; only then is the parent
completion recomputed from the database, so the last parent batch always sees itself counted.
The listener never skips the progression nudge, whatever the monitoring flag says.

After that commit, one coordinator run does the rest under the job lock, in ONE transaction: it
reads the batches it was told of (its `prepare` step, in the round trip of its snapshot: parent
completion recomputed from the database), creates the derived batches of every completed parent
batch that lacks them, decides and dispatches, with the derived batches just created included;
the DerivedWavesCreated nudge (seed D) is then already done by the time the event is emitted.
When the parents have just crossed the threshold and derived batches of earlier parents are
pending, the run dispatches those first and a second run creates the rest (engine/coordinator.py):
the completion of the last parent batch reaches the first derived dispatch with a single commit
and no creation on the way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from importwaves import metrics
from importwaves.db.connect import Conn
from importwaves.db.pools import TenantPool
from importwaves.db.queries import Q
from importwaves.engine.coordinator import Coordinator, RunResult
from importwaves.engine.events import DerivedWavesCreated, EventBus
from importwaves.engine.jobrow import load_job
from importwaves.engine.model import Outcome
from importwaves.flags import Flags
from importwaves.launch.base import LaunchFailure
from importwaves.log import event
from importwaves.spec import ImportSpec
from importwaves.worker_pool import EXIT_WITHOUT_COMPLETION

log = logging.getLogger("importwaves.listener")

__all__ = ["EXIT_WITHOUT_COMPLETION", "BatchCompletedListener", "DerivedWavesCreatedListener"]


class BatchCompletedListener:
    def __init__(
        self,
        tenant: str,
        pool: TenantPool,
        flags: Flags,
        bus: EventBus,
        coordinator: Coordinator,
    ) -> None:
        self.tenant = tenant
        self.pool = pool
        self.flags = flags
        self.bus = bus
        self.coordinator = coordinator

    def on_worker_exited_ok(self, job_id: str, batch_id: str, dispatch_seq: int) -> RunResult:
        """A worker process (or its Job) for this dispatch exited 0. Its completion, if it did
        the work, committed before it exited; if this dispatch is still dispatched or processing
        it exited without recording one: a failed attempt (fenced by the dispatch sequence, so
        a newer dispatch or a recorded result is never touched)."""
        # The check runs inside the coordinator run it ends in (its `prepare`, under the job
        # lock, in the same transaction, pipelined with the batch's read): one transaction per
        # exit, not two; on the path the derived dispatch lag measures.
        return self._derived_after_parent(job_id, batch_id, exited=dispatch_seq)

    def record_exit_without_completion(self, job_id: str, batch_id: str, dispatch_seq: int) -> bool:
        """The exit-0 check alone: True when this dispatch had recorded no completion (or
        failure) and a failed attempt was counted for it now."""
        row = self.fail_attempt(job_id, batch_id, dispatch_seq, EXIT_WITHOUT_COMPLETION)
        if row is None:
            return False
        event(
            log,
            "worker_exited_without_completion",
            logging.WARNING,
            job_id=job_id,
            batch_id=batch_id,
            dispatch_seq=dispatch_seq,
            now=row["status"],
            attempts=row["attempts"],
        )
        return True

    def on_failed(self, job_id: str, batch_id: str, dispatch_seq: int, error: str) -> RunResult:
        """A worker failed (or its pod did); counts an attempt unless the worker already did."""
        row = self.fail_attempt(job_id, batch_id, dispatch_seq, error)
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
        """A per-batch launch failed (the operator's one-Job-per-batch mode)."""
        b = failure.batch
        self.fail_attempt(b.job_id, b.batch_id, b.dispatch_seq, f"launch failed: {failure.error}")
        # The next timer tick or completion re-dispatches; no recursion from inside a launch.

    def fail_attempt(
        self, job_id: str, batch_id: str, dispatch_seq: int, error: str
    ) -> dict[str, Any] | None:
        """THE failure path: count a failed attempt of this dispatch (back to pending, or failed
        when out of attempts), fenced by its dispatch sequence: a newer dispatch or a recorded
        result is never touched. The batch row after it, or None when nothing was recorded."""
        with self.pool.connection() as conn, conn.transaction():
            loaded = load_job(conn, job_id)
            if loaded is None:
                return None
            row: dict[str, Any] | None = conn.execute(
                Q("batch_fail"),
                {
                    "job_id": job_id,
                    "batch_id": batch_id,
                    "dispatch_seq": dispatch_seq,
                    "max_attempts": loaded.spec.max_attempts,
                    **loaded.spec.backoff_params,
                    "error": error[:4000],
                },
            ).fetchone()
        return row

    # -- seed A: post-commit derived initialization ---------------------------------------------
    def on_completions(self, job_id: str, batch_ids: Sequence[str]) -> RunResult:
        """Completion notices (NOTIFY) of one job, one or several (a host that found them
        queued): prompts, never records. Idempotent. ONE coordinator run looks at all of them
        (the run is level-based: it creates the derived batches of every completed parent that
        lacks them and dispatches what that unblocks), instead of one run per notice waiting
        behind the others. The run reads the batch rows under the job lock; whatever they say
        is the truth. A completion is recorded only by the worker's own fenced transaction (with
        its row count), so a forged notice changes nothing: the run finds the batch still
        running and only looks for other work."""
        return self._derived_after_parent(job_id, *dict.fromkeys(batch_ids))

    def _derived_after_parent(
        self, job_id: str, *batch_ids: str, exited: int | None = None
    ) -> RunResult:
        """The coordinator run for completions, after their commit. For a parent batch, derived
        batches are created first in that run's transaction (under the job lock), for it and
        for any other completed parent batch still without them; the run then recomputes parent
        completion from the database and dispatches.

        `exited`: the dispatch sequence of the (one) batch whose worker exited 0: the run first
        counts a failed attempt if that dispatch recorded no completion (`fail_attempt`'s
        statement, fenced by the sequence), in the same transaction as the batch's read."""
        parent: str | None = None  # the first batch of a parent record type among them
        #: the batches' statuses, as the run read them (absent: no such batch)
        statuses: dict[str, str] = {}
        #: the exit check's failed attempt (the batch row after it), if it counted one
        failed: dict[str, Any] | None = None

        def prepare(conn: Conn, spec: ImportSpec) -> Callable[[], None]:
            # Sent in the run's first round trip, before its snapshot: the exit check (so the
            # snapshot sees its failed attempt) and the batches' reads.
            fail_cur = (
                conn.execute(
                    Q("batch_fail"),
                    {
                        "job_id": job_id,
                        "batch_id": batch_ids[0],
                        "dispatch_seq": exited,
                        "max_attempts": spec.max_attempts,
                        **spec.backoff_params,
                        "error": EXIT_WITHOUT_COMPLETION,
                    },
                )
                if exited is not None
                else None
            )
            curs = [
                conn.execute(Q("batch_get"), {"job_id": job_id, "batch_id": batch_id})
                for batch_id in batch_ids
            ]

            def read() -> None:
                nonlocal parent, failed
                parents = spec.derived_parent_type_ids()
                failed = fail_cur.fetchone() if fail_cur is not None else None
                for batch_id, cur in zip(batch_ids, curs, strict=True):
                    batch = cur.fetchone()
                    if batch is None:
                        continue
                    statuses[batch_id] = batch["status"]
                    if batch["record_type_id"] in parents:
                        parent = parent or batch_id

            return read

        def on_commit(result: RunResult) -> None:
            snap = result.snapshot
            if parent is None or snap is None:
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
                parent_batch_id=parent,
                parent_completion_percent=round(min(g.percent for g in open_gates), 2),
                threshold=min(g.threshold for g in open_gates),
                created_batches=result.derived_created,
                dispatched_batches=len(result.dispatched),
            )

        result = self.coordinator.check_and_trigger_next_wave(
            job_id,
            cause="worker_exited" if exited is not None else "batch_completed",
            prepare=prepare,
            on_commit=on_commit,
            source="listener",
        )
        if failed is not None:
            event(
                log,
                "worker_exited_without_completion",
                logging.WARNING,
                job_id=job_id,
                batch_id=batch_ids[0],
                dispatch_seq=exited,
                now=failed["status"],
                attempts=failed["attempts"],
            )
            return result
        if not statuses:
            if result.outcome == Outcome.NOT_FOUND:
                return result
            return RunResult(job_id, Outcome.NOT_FOUND, f"no batch {', '.join(batch_ids)}")
        for batch_id, status in statuses.items():
            if status == "completed":
                # counted once the run that read the batch has committed
                metrics.COMPLETIONS.labels(self.tenant).inc()
            event(
                log,
                "batch_completed" if status == "completed" else "batch_notice_not_completed",
                logging.DEBUG,
                job_id=job_id,
                batch_id=batch_id,
                status=status,
            )
        return result


class DerivedWavesCreatedListener:
    """Seed D: derived creation nudges the coordinator at once, not at the next tick.

    Derived batches created inside a coordinator run are decided on by that run before it
    commits (evt.decided): that run was the nudge. Batches created outside a run (recovery's
    reconcile and sweep, engine/recovery.py, for completed parents that lacked them; or any other
    producer that emits decided=False) get a coordinator run here, at once."""

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
