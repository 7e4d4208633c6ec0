"""Plan a job: its waves and main batches, straight from staging, idempotently."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from psycopg.types.json import Jsonb

from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine.model import DERIVED, MAIN
from importwaves.engine.rows import (
    FIRST_IDS,
    PlanVerdict,
    TypeStaging,
    planning_verdict,
    staging_report,
)
from importwaves.log import event
from importwaves.spec import ImportSpec

log = logging.getLogger("importwaves.planner")


@dataclass(frozen=True)
class PlannedWave:
    wave_number: int
    record_type_id: int
    name: str
    level: int
    batch_size: int


def wave_plan(spec: ImportSpec) -> list[PlannedWave]:
    """Wave numbers follow the spec: main types in parent-first order, then derived types."""
    waves = [
        PlannedWave(i + 1, rt.recordTypeId, rt.name, MAIN, rt.batchSize)
        for i, rt in enumerate(spec.recordTypes)
    ]
    base = len(waves)
    waves += [
        PlannedWave(base + i + 1, dt.recordTypeId, dt.name, DERIVED, dt.batchSize)
        for i, dt in enumerate(spec.derivedTypes)
    ]
    return waves


def derived_wave_number(spec: ImportSpec, record_type_id: int) -> int:
    for w in wave_plan(spec):
        if w.level == DERIVED and w.record_type_id == record_type_id:
            return w.wave_number
    raise KeyError(record_type_id)


def staging_types(conn: Conn, job_id: str, spec: ImportSpec) -> list[TypeStaging]:
    """Per record type (every spec type, every staged type): staging rows and the rows no batch
    can cover, with their first ids. Read under the job lock, in the planning transaction."""
    staged = {
        int(r["record_type_id"]): int(r["n"])
        for r in conn.execute(Q("staging_counts"), {"job_id": job_id}).fetchall()
    }
    out: list[TypeStaging] = []
    for rt in spec.recordTypes:
        out.append(TypeStaging(rt.recordTypeId, rt.name, staged.get(rt.recordTypeId, 0)))
    for dt in spec.derivedTypes:
        n = staged.get(dt.recordTypeId, 0)
        row = None
        if n:
            row = conn.execute(
                Q("derived_uncovered"),
                {
                    "job_id": job_id,
                    "record_type_id": dt.recordTypeId,
                    "parent_type_ids": spec.parent_ids_of(dt),
                    "limit": FIRST_IDS,
                },
            ).fetchone()
        out.append(
            TypeStaging(
                dt.recordTypeId,
                dt.name,
                n,
                int(row["n"]) if row else 0,
                tuple(int(i) for i in row["first_ids"]) if row else (),
            )
        )
    known = {t.record_type_id for t in out}
    for rid in sorted(set(staged) - known):
        ids = conn.execute(
            Q("staging_first_ids"), {"job_id": job_id, "record_type_id": rid, "limit": FIRST_IDS}
        ).fetchall()
        out.append(
            TypeStaging(
                rid, None, staged[rid], staged[rid], tuple(int(r["record_id"]) for r in ids)
            )
        )
    return out


def plan(conn: Conn, job_id: str, spec: ImportSpec, tenant: str = "") -> PlanVerdict:
    """Count the staging rows and, when `planning_verdict` allows it, create every wave row and
    every main batch (derived batches come later) and mark the job planned. Runs under the job
    lock; re-running creates nothing. A refused plan changes nothing but the job's staging
    report: the caller records the verdict, and the next run counts again."""
    types = staging_types(conn, job_id, spec)
    verdict = planning_verdict(tenant, job_id, types, spec.uncoveredRows)
    conn.execute(
        Q("job_set_staging_report"),
        {"job_id": job_id, "report": Jsonb(staging_report(types, verdict))},
    )
    if not verdict.ok:
        event(
            log,
            "job_not_planned",
            logging.WARNING,
            job_id=job_id,
            tenant=tenant,
            code=verdict.code.value,
            reason=verdict.message,
        )
        return verdict
    by_type = {t.record_type_id: t for t in types}
    parents = spec.derived_parent_type_ids()
    created = 0
    for w in wave_plan(spec):
        conn.execute(
            Q("wave_insert"),
            {
                "job_id": job_id,
                "wave_number": w.wave_number,
                "record_type_id": w.record_type_id,
                "record_type_name": w.name,
                "dependency_level": w.level,
            },
        )
        conn.execute(
            Q("wave_set_rows"),
            {
                "job_id": job_id,
                "record_type_id": w.record_type_id,
                "staged": by_type[w.record_type_id].staged,
                "skipped": verdict.skipped.get(w.record_type_id, 0),
            },
        )
        if w.level == MAIN:
            cur = conn.execute(
                Q("plan_main_batches"),
                {
                    "job_id": job_id,
                    "prefix": w.name,
                    "wave_number": w.wave_number,
                    "record_type_id": w.record_type_id,
                    "batch_size": w.batch_size,
                    "needs_derivation": w.record_type_id in parents,
                },
            )
            created += max(cur.rowcount, 0)
    conn.execute(Q("job_set_planned"), {"job_id": job_id})
    event(
        log,
        "job_planned",
        job_id=job_id,
        waves=len(wave_plan(spec)),
        main_batches=created,
        rows_staged={t.label: t.staged for t in types},
        rows_skipped=sum(verdict.skipped.values()),
    )
    return verdict
