"""Recovery (the seed's `waves:reconcile`) and retry of failed batches.

`reconcile` demotes stale `processing` batches (heartbeat older than staleAfterSeconds), requeues
or releases dispatched batches no worker claimed within the claim timeout (or leaves them to
wait while their workers start: engine/workers.py `plan_unclaimed` decides), creates the
derived batches of completed parent batches that still lack them (a listener that died after its
worker's commit), refreshes the monitoring flag and forces a progression check, and reports
every action it took. The periodic sweep runs the same code.

The derived batches it creates are created outside a coordinator run, so no run has decided on
them yet: recovery is the producer of `DerivedWavesCreated(decided=False)`, whose handler
(listener.DerivedWavesCreatedListener, seed D) runs the coordinator at once to dispatch them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from importwaves import metrics
from importwaves.db.connect import Conn
from importwaves.db.pools import TenantPool
from importwaves.db.queries import Q
from importwaves.engine import derived
from importwaves.engine.coordinator import Coordinator, RunResult
from importwaves.engine.events import DerivedWavesCreated, EventBus
from importwaves.engine.jobrow import load_job
from importwaves.engine.model import JobStatus
from importwaves.engine.workers import held_batch, plan_unclaimed
from importwaves.flags import Flags
from importwaves.launch.port import Observation
from importwaves.log import event
from importwaves.spec import ImportSpec

log = logging.getLogger("importwaves.recovery")


@dataclass
class RecoveryReport:
    job_id: str
    actions: list[str] = field(default_factory=list)
    demoted: int = 0
    requeued: int = 0
    #: unclaimed dispatches back to pending without costing an attempt (no live worker)
    released: int = 0
    #: unclaimed dispatches past the claim timeout left to wait (their workers are starting)
    waiting: int = 0
    failed: int = 0
    #: derived batches created for completed parent batches that lacked them
    derived_created: int = 0
    result: RunResult | None = None


class Recovery:
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

    def reconcile(
        self,
        job_id: str,
        *,
        cause: str = "reconcile",
        seen: Observation | None = None,
        per_wave: bool = False,
    ) -> RecoveryReport:
        """`seen`: the launcher's observation of the job's workers, for the claim-timeout
        decision (engine/workers.py plan_unclaimed); None knows nothing of them (the claim
        timeout alone decides)."""
        report = RecoveryReport(job_id)
        with self.pool.connection() as conn, conn.transaction():
            loaded = load_job(conn, job_id, lock=True)
            if loaded is None:
                report.actions.append(f"no job {job_id!r} in tenant {self.tenant!r}")
                return report
            job, spec = loaded
            names = {rt.recordTypeId: rt.name for rt in spec.recordTypes} | {
                d.recordTypeId: d.name for d in spec.derivedTypes
            }
            params = {
                "job_id": job_id,
                "stale_after": spec.staleAfterSeconds,
                "claim_timeout": spec.claim_timeout,
                "max_attempts": spec.max_attempts,
            }
            for r in conn.execute(Q("batches_demote_stale_processing"), params).fetchall():
                if r["status"] == "failed":
                    report.failed += 1
                    self._act(
                        report,
                        "stale_batch_failed",
                        r["batch_id"],
                        f"failed stale batch {r['batch_id']}: processing with no heartbeat "
                        f"for {spec.staleAfterSeconds}s and no attempts left "
                        f"({r['attempts']}/{spec.max_attempts})",
                        cause,
                    )
                else:
                    report.demoted += 1
                    self._act(
                        report,
                        "stale_batch_demoted",
                        r["batch_id"],
                        f"demoted batch {r['batch_id']} processing -> pending (no "
                        f"heartbeat for {spec.staleAfterSeconds}s; attempt "
                        f"{r['attempts']}/{spec.max_attempts})",
                        cause,
                    )
            self._unclaimed(conn, report, job_id, spec, seen, per_wave, names, cause)
            # Completed parent batches still without their derived batches, under the same lock.
            created = derived.create_for_completed_parents(conn, job_id, spec)
            status = job["status"]
        if created.batch_ids:
            report.derived_created = len(created.batch_ids)
            self._act(
                report,
                "derived_batches_recovered",
                None,
                f"created {len(created.batch_ids)} derived batch(es) for "
                f"{created.parent_batches} completed parent batch(es) that had none",
                cause,
            )
            # After the commit: not decided on by any run yet, so the handler nudges (seed D).
            self.bus.emit(
                DerivedWavesCreated(
                    self.tenant,
                    job_id,
                    tuple(sorted(created.wave_numbers)),
                    len(created.batch_ids),
                    source=cause,
                    decided=False,
                )
            )
        stuck = report.demoted + report.requeued + report.released + report.failed
        if stuck:
            metrics.STUCK_DETECTED.labels(self.tenant, "stale").inc(stuck)
        if status == JobStatus.RUNNING.value:
            self.flags.set_monitoring(job_id)
            if cause == "reconcile":
                report.actions.append("refreshed the wave_monitoring_active flag")
        result = self.coordinator.check_and_trigger_next_wave(job_id, cause=cause)
        report.result = result
        if result.dispatched:
            self._act(
                report,
                "catch_up_dispatch",
                None,
                f"catch-up dispatch of {len(result.dispatched)} batch(es)",
                cause,
            )
        if cause == "reconcile":
            report.actions.append(f"progression check: {result.outcome.value} ({result.reason})")
        return report

    def _unclaimed(
        self,
        conn: Conn,
        report: RecoveryReport,
        job_id: str,
        spec: ImportSpec,
        seen: Observation | None,
        per_wave: bool,
        names: dict[int, str],
        cause: str,
    ) -> None:
        """Dispatches nobody claimed within the claim timeout: counted, released or left to
        wait, as plan_unclaimed decides from the batches and the workers."""
        held = [held_batch(r, names) for r in conn.execute(Q("batches_held"), {"job_id": job_id})]
        verdicts = plan_unclaimed(
            held,
            seen if seen is not None else Observation((), complete=False),
            per_wave=per_wave,
            claim_timeout=spec.claim_timeout,
        )
        for v in verdicts:
            if v.action == "wait":
                report.waiting += 1
                continue
            count = v.action == "count"
            row = conn.execute(
                Q("batch_unclaimed_requeue"),
                {
                    "job_id": job_id,
                    "batch_id": v.batch.batch_id,
                    "dispatch_seq": v.batch.dispatch_seq,
                    "worker_id": v.batch.worker_id,
                    "count": count,
                    "max_attempts": spec.max_attempts,
                    "error": v.why,
                },
            ).fetchone()
            if row is None:
                continue  # claimed meanwhile, or in a worker's hands right now
            bid = row["batch_id"]
            if row["status"] == "failed":
                report.failed += 1
                self._act(
                    report,
                    "stuck_batch_failed",
                    bid,
                    f"failed batch {bid}: {v.why}; attempt {row['attempts']}/{spec.max_attempts}, "
                    "no attempts left",
                    cause,
                )
            elif count:
                report.requeued += 1
                self._act(
                    report,
                    "stuck_batch_requeued",
                    bid,
                    f"requeued batch {bid} dispatched -> pending ({v.why}; attempt "
                    f"{row['attempts']}/{spec.max_attempts})",
                    cause,
                )
            else:
                report.released += 1
                self._act(
                    report,
                    "unclaimed_batch_released",
                    bid,
                    f"released batch {bid} dispatched -> pending, no attempt counted ({v.why})",
                    cause,
                )

    def retry_failed(self, job_id: str) -> RecoveryReport:
        """Requeue the failed batches of a job (completed ones are kept) and resume it."""
        report = RecoveryReport(job_id)
        with self.pool.connection() as conn, conn.transaction():
            job = conn.execute(Q("job_lock"), {"job_id": job_id}).fetchone()
            if job is None:
                report.actions.append(f"no job {job_id!r}")
                return report
            rows = conn.execute(Q("batches_requeue_failed"), {"job_id": job_id}).fetchall()
            # Reopen only a job there is something to retry for: a completed job with no failed
            # batch stays completed (re-running it would flip it to running and re-stamp it).
            if rows or job["status"] == JobStatus.FAILED.value:
                conn.execute(
                    Q("job_set_status"),
                    {
                        "job_id": job_id,
                        "status": JobStatus.RUNNING.value,
                        "reason": f"retry-failed requeued {len(rows)} batch(es)",
                    },
                )
        for r in rows:
            self._act(
                report,
                "failed_batch_requeued",
                r["batch_id"],
                f"requeued failed batch {r['batch_id']}",
                "retry_failed",
            )
        report.requeued = len(rows)
        report.result = self.coordinator.check_and_trigger_next_wave(job_id, cause="retry_failed")
        return report

    def _act(
        self, report: RecoveryReport, name: str, batch_id: str | None, text: str, cause: str
    ) -> None:
        report.actions.append(text)
        event(
            log,
            name,
            logging.WARNING if batch_id else logging.INFO,
            job_id=report.job_id,
            tenant=self.tenant,
            batch_id=batch_id,
            action=text,
            cause=cause,
        )
