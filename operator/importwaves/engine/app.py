"""`Engine`: one tenant's wave engine, wired together (pool, flags, events, coordinator,
listeners, recovery, and the worker launcher it applies its lifecycle decisions through). The
local runner and the operator both drive this object, through its public methods only: `submit`,
`check`, `sync_workers`, `on_completions`, `sweep`, `retry_failed`."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from importwaves import metrics
from importwaves.db import migrate
from importwaves.db.connect import Conn
from importwaves.db.options import ConnOptions
from importwaves.db.pools import POOLS, TenantPool
from importwaves.db.queries import Q
from importwaves.engine import failures
from importwaves.engine.capacity import CapacityKeeper
from importwaves.engine.coordinator import Coordinator, RunResult
from importwaves.engine.events import DerivedWavesCreated, EventBus
from importwaves.engine.failures import FailedBatch
from importwaves.engine.jobrow import load_job, spec_of
from importwaves.engine.jobs import SpecChangeRefused, spec_change_problems
from importwaves.engine.listener import BatchCompletedListener, DerivedWavesCreatedListener
from importwaves.engine.model import JobStatus, WaveState
from importwaves.engine.recovery import Recovery, RecoveryReport
from importwaves.engine.snapshot import read_waves
from importwaves.engine.workers import (
    DEFAULT_GRACE,
    DEFAULT_PULL_GRACE,
    LostBatch,
    after_dispatch,
    held_batch,
    plan_problems,
    plan_workers,
    wave_ahead,
)
from importwaves.flags import DEFAULT_TTL, Flags
from importwaves.launch.base import (
    BatchDispatch,
    DispatchObserver,
    NoWorkers,
    RecordingLauncher,
)
from importwaves.launch.port import (
    LaunchProblem,
    LaunchTarget,
    Observation,
    WorkerGroup,
    WorkerLauncher,
)
from importwaves.log import event
from importwaves.spec import ImportSpec

log = logging.getLogger("importwaves.engine")


#: Jobs whose last observation of their workers an engine keeps for the hot path (bounded).
OBSERVATIONS_KEPT = 1024


class SchemaNotReady(RuntimeError):
    """The tenant schema lacks migrations this importwaves needs (or was never migrated)."""


def default_worker_grace() -> float:
    """Seconds a processing batch whose worker is not alive keeps its claim
    (IMPORTWAVES_WORKER_GRACE_SECONDS, default 5)."""
    return float(os.environ.get("IMPORTWAVES_WORKER_GRACE_SECONDS") or DEFAULT_GRACE)


@dataclass
class WorkerSync:
    """What one `sync_workers` did."""

    job_id: str
    groups: list[WorkerGroup] = field(default_factory=list)
    #: processing batches whose worker was gone: their attempt was failed
    lost: list[LostBatch] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    problems: list[LaunchProblem] = field(default_factory=list)
    #: batches whose attempt a permanent launch problem failed
    launch_failed: int = 0
    #: workers the launcher saw alive
    live: int = 0
    job_status: str | None = None


class Engine:
    def __init__(
        self,
        dsn: str,
        tenant: str,
        *,
        redis_url: str | None = None,
        launcher: WorkerLauncher | None = None,
        pool_size: int = 8,
        flag_ttl: int = DEFAULT_TTL,
        opts: ConnOptions | None = None,
        worker_grace: float | None = None,
        capacity: CapacityKeeper | None = None,
    ) -> None:
        self.tenant = tenant
        self.dsn = dsn
        #: timeouts and keepalives of every connection (default: the IMPORTWAVES_* variables)
        self.opts = opts = opts or ConnOptions.from_env()
        #: this tenant's handle on its database's shared pool (db/pools.py)
        self.pool: TenantPool = POOLS.get(dsn, tenant, max_size=pool_size, opts=opts)
        self.flags = Flags(redis_url, tenant, ttl=flag_ttl)
        self.bus = EventBus()
        self.launcher: WorkerLauncher = launcher if launcher is not None else RecordingLauncher()
        self.worker_grace = default_worker_grace() if worker_grace is None else worker_grace
        #: seconds a worker may fail its image pull before that is a launch problem
        #: (IMPORTWAVES_IMAGE_PULL_GRACE_SECONDS, default 120)
        self.pull_grace = float(
            os.environ.get("IMPORTWAVES_IMAGE_PULL_GRACE_SECONDS") or DEFAULT_PULL_GRACE
        )
        #: the host's own per-batch launching (the operator's one-Job-per-batch mode), called
        #: after the worker sync of every run that dispatched
        self.on_dispatch: Any = None
        #: the host's report of launch problems (the operator posts them as Warning Events on
        #: the ImportJob): called with (job_id, target, problems) by every sync that has some
        self.on_launch_problems: Any = None
        self.coordinator = Coordinator(tenant, self.pool, self.flags, self.bus)
        self.coordinator.on_dispatched = self._dispatched
        #: the batch slots shared with every other import of this process (issue 16)
        self.coordinator.capacity = capacity
        #: launch targets read by sync_workers (a job's target changes only at submit)
        self._targets: dict[str, LaunchTarget] = {}
        #: the newest complete observation of each job's workers (monotonic time it was asked
        #: for, the observation), for the dispatch hot path (`_recent_observation`)
        self._observed: OrderedDict[str, tuple[float, Observation]] = OrderedDict()
        self._observed_lock = threading.Lock()
        self.clock = time.monotonic
        self.listener = BatchCompletedListener(
            tenant, self.pool, self.flags, self.bus, self.coordinator
        )
        self.recovery = Recovery(tenant, self.pool, self.flags, self.bus, self.coordinator)
        self.bus.subscribe(DerivedWavesCreated, DerivedWavesCreatedListener(self.coordinator))
        self._schema_ready = False

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs ----------------------------------------------------------------------------------
    def submit(
        self,
        job_id: str,
        spec: ImportSpec,
        target: LaunchTarget | None = None,
        *,
        source: tuple[str, int] | None = None,
    ) -> bool:
        """Register a job (idempotent) and make it planned; True when it was new. A changed spec
        for an existing job is applied if it can be, else SpecChangeRefused says why (and the
        refusal is recorded in the job row until a submitted spec is accepted). `target`: where
        its workers run, stored with the job (None keeps the stored one).

        `source`: the (uid, generation) of the ImportJob the spec comes from. A submit of an
        older generation of the same ImportJob than the last one submitted is stale (a reconcile
        that started before an edit) and changes nothing."""
        if spec.tenant != self.tenant:
            raise ValueError(
                f"spec.tenant {spec.tenant!r} does not match engine tenant {self.tenant!r}"
            )
        data = spec.model_dump(mode="json")
        refused: SpecChangeRefused | None = None
        reopened = False
        with self.pool.connection() as conn, conn.transaction():
            self._require_schema(conn)
            created = (
                conn.execute(Q("job_insert"), {"job_id": job_id, "spec": Jsonb(data)}).fetchone()
                is not None
            )
            if created and source is not None:
                conn.execute(
                    Q("job_set_spec_source"),
                    {"job_id": job_id, "uid": source[0], "generation": source[1]},
                )
            if not created:
                loaded = load_job(conn, job_id, lock=True)
                assert loaded is not None
                row, old = loaded
                if _stale(row, source):
                    return False
                if source is not None:
                    conn.execute(
                        Q("job_set_spec_source"),
                        {"job_id": job_id, "uid": source[0], "generation": source[1]},
                    )
                problems = (
                    spec_change_problems(old, spec, planned=row["planned_at"] is not None)
                    if old != spec
                    else []
                )
                if problems:
                    # Recorded durably (the job keeps its stored spec): every path that writes
                    # the ImportJob's status reads the same refusal from the job row.
                    refused = SpecChangeRefused(problems)
                    conn.execute(
                        Q("job_set_refusal"),
                        {"job_id": job_id, "refusal": str(refused), "refused_spec": Jsonb(data)},
                    )
                else:
                    if old != spec:
                        conn.execute(Q("job_set_spec"), {"job_id": job_id, "spec": Jsonb(data)})
                        event(log, "job_spec_updated", job_id=job_id, tenant=self.tenant)
                    if row.get("refusal"):
                        conn.execute(
                            Q("job_set_refusal"),
                            {"job_id": job_id, "refusal": "", "refused_spec": None},
                        )
                    if row["status"] == JobStatus.CANCELLED.value:
                        reopened = self._reopen(conn, job_id)
            if target is not None:
                self._targets.pop(job_id, None)
                conn.execute(
                    Q("job_set_launch_target"),
                    {"job_id": job_id, "target": Jsonb(target.to_json())},
                )
        if refused is not None:
            raise refused
        if created or reopened:
            event(
                log,
                "job_reopened" if reopened else "job_submitted",
                job_id=job_id,
                tenant=self.tenant,
            )
            self.flags.set_monitoring(job_id)
        return created

    def _reopen(self, conn: Conn, job_id: str) -> bool:
        """A cancelled job submitted again: running, and any batch still marked as handed to a
        worker released (its worker went with the deleted ImportJob)."""
        if conn.execute(Q("job_reopen"), {"job_id": job_id}).fetchone() is None:
            return False
        conn.execute(
            Q("batches_release"),
            {"job_id": job_id, "reason": "released: its worker went with the deleted ImportJob"},
        )
        return True

    def cancel(self, job_id: str, reason: str) -> list[str] | None:
        """Cancel a job whose ImportJob was deleted: status `cancelled` (a completed job stays
        completed), batches handed to workers released to pending with their data kept.
        Returns the released batch ids, or None when there was nothing to cancel."""
        with self.pool.connection() as conn, conn.transaction():
            self._require_schema(conn)
            was = conn.execute(Q("job_cancel"), {"job_id": job_id, "reason": reason}).fetchone()
            if was is None:
                return None
            rows = conn.execute(
                Q("batches_release"), {"job_id": job_id, "reason": f"released: {reason}"}
            ).fetchall()
        released = [r["batch_id"] for r in rows]
        self.flags.clear_monitoring(job_id)
        event(
            log,
            "job_cancelled",
            job_id=job_id,
            tenant=self.tenant,
            was=was["was"],
            released=len(released),
            reason=reason,
        )
        return released

    def _require_schema(self, conn: Conn) -> None:
        """Fail with what to do, not with "relation ... does not exist" somewhere later."""
        if self._schema_ready:
            return
        missing = migrate.pending(conn, self.tenant)
        if missing:
            total = len(migrate.migrations())
            raise SchemaNotReady(
                f"tenant schema {self.tenant!r} has {total - len(missing)} of {total} "
                "migrations applied (missing "
                + ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
                + f"); run `importwaves migrate up --tenant {self.tenant}` first (the operator "
                "and `importwaves run-local` migrate their tenants themselves)"
            )
        self._schema_ready = True

    def check(self, job_id: str, cause: str = "nudge") -> RunResult:
        return self.coordinator.check_and_trigger_next_wave(job_id, cause=cause)

    def on_completions(self, job_id: str, batch_ids: Sequence[str]) -> RunResult:
        """Completion notices (NOTIFY) of one job, one or several found queued together: one
        look at the database for all (a prompt: records nothing)."""
        return self.listener.on_completions(job_id, batch_ids)

    def sweep(self, job_id: str, cause: str = "sweep") -> RecoveryReport:
        """Recovery: stale claims back to pending, unclaimed dispatches counted, released or
        left to wait as their workers (the launcher's observation) say (engine/workers.py
        plan_unclaimed), missing derived batches created, then a progression check."""
        target = self._targets.get(job_id) or self.launch_target(job_id)
        seen = self._observe(target, job_id)
        return self.recovery.reconcile(
            job_id,
            cause=cause,
            seen=seen,
            per_wave=bool(getattr(self.launcher, "per_wave", False)),
        )

    def retry_failed(self, job_id: str) -> RecoveryReport:
        return self.recovery.retry_failed(job_id)

    # -- the worker lifecycle ------------------------------------------------------------------
    def sync_workers(self, job_id: str) -> WorkerSync:
        """The engine-owned worker lifecycle, for both hosts: read the job's held batches and
        launch target, observe its workers, decide (engine/workers.py) and apply: fail the
        attempt of batches whose worker is gone (one failure path, with the worker's exit code
        and last words), forget ended workers, ensure the wanted worker groups, and apply the
        one launch-failure policy (permanent: the group's dispatched batches' attempt fails;
        transient: logged, retried at the next sync). Idempotent; it dispatches nothing (the
        caller's next check re-dispatches what went back to pending)."""
        out = WorkerSync(job_id)
        with self.pool.connection() as conn:
            job = conn.execute(Q("job_workers_view"), {"job_id": job_id}).fetchone()
        if job is None:
            return out
        target = self._targets[job_id] = LaunchTarget.from_json(job["launch_target"])
        spec = spec_of(job)
        seen = self._observe(target, job_id)
        per_wave = bool(getattr(self.launcher, "per_wave", False))
        ahead = None
        with self.pool.connection() as conn:
            rows = conn.execute(Q("batches_held"), {"job_id": job_id}).fetchall()
            if per_wave and job["status"] == "running":
                ahead = wave_ahead(job_id, read_waves(conn, job_id), spec.parallelism)
        names = {rt.recordTypeId: rt.name for rt in spec.recordTypes} | {
            d.recordTypeId: d.name for d in spec.derivedTypes
        }
        held = [held_batch(r, names) for r in rows]
        plan = plan_workers(
            job_id,
            job["status"],
            spec.parallelism,
            held,
            seen,
            per_wave=per_wave,
            grace=self.worker_grace,
            pull_grace=self.pull_grace,
            ahead=ahead,
        )
        out.job_status = job["status"]
        out.live = sum(1 for w in seen.workers if w.alive)
        for lost in plan.lost:
            row = self.listener.fail_attempt(job_id, lost.batch_id, lost.dispatch_seq, lost.error)
            if row is not None:
                out.lost.append(lost)
                event(
                    log,
                    "worker_lost",
                    logging.WARNING,
                    job_id=job_id,
                    batch_id=lost.batch_id,
                    worker_id=lost.worker_id,
                    now=row["status"],
                    attempts=row["attempts"],
                    error=lost.error,
                )
        if plan.discard:
            with self.pool.connection() as conn:
                keep = [
                    r["worker_id"]
                    for r in conn.execute(
                        Q("workers_with_failed_attempt"),
                        {"job_id": job_id, "worker_ids": list(plan.discard)},
                    ).fetchall()
                ]
            self.launcher.discard(target, self.tenant, job_id, plan.discard, keep=keep)
            out.discarded = list(plan.discard)
        out.groups = list(plan.groups)
        out.problems = list(plan.problems)
        if plan.groups:
            out.problems += self.launcher.ensure(target, self.tenant, plan.groups)
        policy = plan_problems(out.problems, held, per_wave=per_wave)
        if out.problems and self.on_launch_problems is not None:
            self.on_launch_problems(job_id, target, list(out.problems))
        for p in policy.retry:
            event(
                log,
                "launch_retry_later",
                logging.WARNING,
                job_id=job_id,
                wave=p.group.wave_number,
                error=p.error,
            )
        for f in policy.fail:
            event(
                log,
                "launch_failed",
                logging.WARNING,
                job_id=job_id,
                error=f.error,
                batches=len(f.batches),
            )
            for b in f.batches:
                if self.listener.fail_attempt(job_id, b.batch_id, b.dispatch_seq, f.error):
                    out.launch_failed += 1
        return out

    def _dispatched(
        self,
        job_id: str,
        spec: ImportSpec,
        batches: list[BatchDispatch],
        snapshot_waves: Sequence[WaveState] = (),
    ) -> None:
        """After the commit of a run that dispatched: workers for them at once (and, with one
        worker group per wave, the next wave's ahead of its dispatch: `wave_ahead`).
        `snapshot_waves`: the run's snapshot of the waves, read before this dispatch."""
        if isinstance(self.launcher, DispatchObserver):
            self.launcher.on_dispatched(job_id, batches)
        if type(self.launcher).ensure is NoWorkers.ensure:
            # a launcher that starts nothing (the host runs its workers itself): nothing to
            # sync on the hot path; its host's timer may still call sync_workers
            return self._host_dispatch(job_id, spec, batches)
        target = self._targets.get(job_id)
        if target is not None:
            # The hot path (a completion -> the next dispatch): with all its workers alive the
            # job needs no sync; their LISTEN already has this run's dispatch NOTIFY. With one
            # worker group per wave, only the dispatched waves' workers can claim these
            # batches: a pooled worker of an earlier wave, idling until its idle timeout,
            # claims none of them, so it does not count (issue 16, row "many": each wave of
            # a parallelism-1 import waited ~30 s for the previous wave's worker to exit).
            seen = self._recent_observation(target, job_id)
            waves = {b.wave_number for b in batches}
            per_wave = bool(getattr(self.launcher, "per_wave", False))
            alive = sum(
                1 for w in seen.workers if w.alive and (not per_wave or w.wave_number in waves)
            )
            if (
                seen.complete
                and alive >= spec.parallelism
                and not self._ahead_missing(job_id, spec, batches, snapshot_waves, seen)
            ):
                return self._host_dispatch(job_id, spec, batches)
        self.sync_workers(job_id)
        self._host_dispatch(job_id, spec, batches)

    def _ahead_missing(
        self,
        job_id: str,
        spec: ImportSpec,
        batches: list[BatchDispatch],
        waves: Sequence[WaveState],
        seen: Observation,
    ) -> bool:
        """This dispatch left a next wave to start ahead (`wave_ahead` of the waves as they are
        after it) with no worker or launch of that wave seen: a sync starts it."""
        if not waves or not getattr(self.launcher, "per_wave", False):
            return False
        counts: dict[int, int] = {}
        for b in batches:
            counts[b.wave_number] = counts.get(b.wave_number, 0) + 1
        ahead = wave_ahead(job_id, after_dispatch(waves, counts), spec.parallelism)
        if ahead is None:
            return False
        return not any(
            w.alive and w.wave_number == ahead.wave_number for w in seen.workers
        ) and not any(x.wave_number == ahead.wave_number for x in seen.launches)

    def _observe(self, target: LaunchTarget, job_id: str) -> Observation:
        """The launcher's observation of the job's workers, now; a complete one is kept for the
        hot path (unless a newer one was asked for meanwhile)."""
        asked = self.clock()
        seen = self.launcher.observe(target, self.tenant, job_id)
        if seen.complete and self._observation_ttl() > 0:
            with self._observed_lock:
                old = self._observed.get(job_id)
                if old is None or old[0] <= asked:
                    self._observed[job_id] = (asked, seen)
                    self._observed.move_to_end(job_id)
                    while len(self._observed) > OBSERVATIONS_KEPT:
                        self._observed.popitem(last=False)
        return seen

    def _recent_observation(self, target: LaunchTarget, job_id: str) -> Observation:
        """The hot path's observation: one asked for less than the launcher's
        `observation_ttl` seconds ago (by any path: a sync, a sweep, an earlier dispatch), or a
        new one. With a Kubernetes launcher an observation is two LIST calls (pods, Jobs) and
        a dispatch follows nearly every completion: 2 x 840 LISTs for a 1M-line import, each
        deserialized by the operator, for an answer that changes only when a worker starts or
        ends. A worker's start or end is a worker Job event, whose sync observes anew (and
        refreshes this); until it is handled the hot path may skip a sync the event's own sync
        then makes (the level-based paths converge, as they did when a worker ended between
        the observation and the dispatch). 0 (a local launcher): always a new one."""
        ttl = self._observation_ttl()
        if ttl > 0:
            with self._observed_lock:
                hit = self._observed.get(job_id)
            if hit is not None and 0 <= self.clock() - hit[0] < ttl:
                return hit[1]
        return self._observe(target, job_id)

    def _observation_ttl(self) -> float:
        return float(getattr(self.launcher, "observation_ttl", 0.0) or 0.0)

    def _host_dispatch(self, job_id: str, spec: ImportSpec, batches: list[BatchDispatch]) -> None:
        if self.on_dispatch is not None:
            self.on_dispatch(job_id, spec, batches)

    def launch_target(self, job_id: str) -> LaunchTarget:
        """Where the job's workers run, as stored at submit (kind "none" for an unknown job;
        the one a sync read, kept until the next submit of the job, when there is one: a
        NOTIFY prompt asks for it after every completion)."""
        known = self._targets.get(job_id)
        if known is not None:
            return known
        with self.pool.connection() as conn:
            job = conn.execute(Q("job_workers_view"), {"job_id": job_id}).fetchone()
        return LaunchTarget.from_json(job["launch_target"] if job else None)

    def update_gauges(self) -> None:
        """Refresh this tenant's queue.active_jobs and derived-backlog gauges from the DB."""
        with self.pool.connection() as conn:
            active = conn.execute(Q("job_active_count")).fetchone()
            derived_ids = sorted(
                {
                    d.recordTypeId
                    for row in conn.execute(Q("job_specs_running")).fetchall()
                    for d in spec_of(row).derivedTypes
                }
            )
            backlog = conn.execute(
                Q("derived_backlog"), {"derived_type_ids": derived_ids}
            ).fetchone()
        metrics.ACTIVE_JOBS.labels(self.tenant).set(active["n"] if active else 0)
        metrics.DERIVED_BACKLOG.labels(self.tenant).set(backlog["n"] if backlog else 0)

    def attempts(self, job_id: str) -> tuple[int, int]:
        """(attempts the job's workers made, batches completed), from the batch rows."""
        with self.pool.connection() as conn:
            row = conn.execute(Q("job_attempts"), {"job_id": job_id}).fetchone()
        return (int(row["attempts"]), int(row["completed"])) if row else (0, 0)

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            return conn.execute(Q("job_get"), {"job_id": job_id}).fetchone()

    def failed_batches(self, job_id: str, limit: int = 20) -> list[FailedBatch]:
        """The job's batches that failed for good (newest first), with their recorded errors."""
        with self.pool.connection() as conn:
            return failures.failed_batches(conn, job_id, limit)

    def retrying_batches(self, job_id: str, limit: int = 20) -> list[FailedBatch]:
        """The job's batches waiting for a retry after a failed attempt (newest first)."""
        with self.pool.connection() as conn:
            return failures.retrying_batches(conn, job_id, limit)


def release_completed_workers(
    launcher: WorkerLauncher, target: LaunchTarget, tenant: str, job_id: str
) -> list[str]:
    """Forget the ended workers of a job that has completed (its host knows it from the status
    the engine wrote): every batch is done, so there is nothing to record of them, nothing to
    fence and no group to start; no tenant engine, pool or database round trip is needed. A
    worker still alive is left to exit on its own (it finds nothing to claim); a launcher keeps
    what it keeps for diagnosis (a failed Kubernetes Job, for `kubectl logs`). Returns the
    workers discarded. Safe if the host was wrong: a worker discarded without its end recorded
    is a lost worker to the next `sync_workers`, whose batch goes back to pending."""
    seen = launcher.observe(target, tenant, job_id)
    if not seen.complete:
        return []
    ended = [w.worker_id for w in seen.workers if not w.alive]
    if ended:
        launcher.discard(target, tenant, job_id, ended)
    return ended


def _stale(row: dict[str, Any], source: tuple[str, int] | None) -> bool:
    """A submit from an older generation of the same ImportJob than the last one submitted."""
    if source is None or row.get("spec_generation") is None:
        return False
    return bool(row.get("spec_uid") == source[0] and source[1] < int(row["spec_generation"]))
