"""Plan a job: its waves and main batches, straight from staging, idempotently."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine.model import DERIVED, MAIN
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


def plan(conn: Conn, job_id: str, spec: ImportSpec) -> int:
    """Create every wave row and every main batch (derived batches come later). Returns the
    number of main batches created. Runs under the job lock; re-running creates nothing."""
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
    event(log, "job_planned", job_id=job_id, waves=len(wave_plan(spec)), main_batches=created)
    return created
