"""`Engine`: one tenant's wave engine, wired together (pool, flags, events, coordinator,
listeners, recovery, launcher). The local runner and the operator both drive this object."""

from __future__ import annotations

import logging
from typing import Any

from psycopg.types.json import Jsonb

from importwaves import metrics
from importwaves.db import migrate
from importwaves.db.connect import Conn, make_pool
from importwaves.db.options import ConnOptions
from importwaves.db.queries import Q
from importwaves.engine.coordinator import Coordinator, RunResult
from importwaves.engine.events import DerivedWavesCreated, EventBus
from importwaves.engine.jobrow import load_job, spec_of
from importwaves.engine.jobs import SpecChangeRefused, spec_change_problems
from importwaves.engine.listener import BatchCompletedListener, DerivedWavesCreatedListener
from importwaves.engine.model import JobStatus
from importwaves.engine.recovery import Recovery
from importwaves.flags import DEFAULT_TTL, Flags
from importwaves.launch.base import Launcher, RecordingLauncher
from importwaves.log import event
from importwaves.spec import ImportSpec

log = logging.getLogger("importwaves.engine")


class SchemaNotReady(RuntimeError):
    """The tenant schema lacks migrations this importwaves needs (or was never migrated)."""


class Engine:
    def __init__(
        self,
        dsn: str,
        tenant: str,
        *,
        redis_url: str | None = None,
        launcher: Launcher | None = None,
        pool_size: int = 8,
        flag_ttl: int = DEFAULT_TTL,
        opts: ConnOptions | None = None,
    ) -> None:
        self.tenant = tenant
        self.dsn = dsn
        #: timeouts and keepalives of every connection (default: the IMPORTWAVES_* variables)
        self.opts = opts = opts or ConnOptions.from_env()
        self.pool = make_pool(dsn, tenant, max_size=pool_size, opts=opts)
        self.flags = Flags(redis_url, tenant, ttl=flag_ttl)
        self.bus = EventBus()
        self.launcher: Launcher = launcher or RecordingLauncher()
        self.coordinator = Coordinator(tenant, self.pool, self.flags, self.bus, self.launcher)
        self.listener = BatchCompletedListener(
            tenant, self.pool, self.flags, self.bus, self.coordinator
        )
        self.coordinator.on_launch_failure = self.listener.on_launch_failure
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
        self, job_id: str, spec: ImportSpec, *, source: tuple[str, int] | None = None
    ) -> bool:
        """Register a job (idempotent) and make it planned; True when it was new. A changed spec
        for an existing job is applied if it can be, else SpecChangeRefused says why (and the
        refusal is recorded in the job row until a submitted spec is accepted).

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

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            return conn.execute(Q("job_get"), {"job_id": job_id}).fetchone()


def _stale(row: dict[str, Any], source: tuple[str, int] | None) -> bool:
    """A submit from an older generation of the same ImportJob than the last one submitted."""
    if source is None or row.get("spec_generation") is None:
        return False
    return bool(row.get("spec_uid") == source[0] and source[1] < int(row["spec_generation"]))
