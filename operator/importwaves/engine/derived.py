"""Create derived (TransactionLine) batches for completed parent batches.

Used by the batch-completed listener (progressively, one parent batch at a time, and as the
final catch-up once parents reach the threshold) and by the coordinator (level-based catch-up,
so a listener that died after its commit cannot leave a job without its derived batches).
Always called under the job lock. Deterministic batch ids make every call idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine.planner import derived_wave_number
from importwaves.flags import Flags
from importwaves.log import event
from importwaves.spec import ImportSpec

log = logging.getLogger("importwaves.derived")


@dataclass
class Created:
    batch_ids: list[str] = field(default_factory=list)
    wave_numbers: set[int] = field(default_factory=set)
    parent_batches: int = 0
    db_fallbacks: int = 0

    def __iadd__(self, other: Created) -> Created:
        self.batch_ids += other.batch_ids
        self.wave_numbers |= other.wave_numbers
        self.parent_batches += other.parent_batches
        self.db_fallbacks += other.db_fallbacks
        return self


def create_for_completed_parents(
    conn: Conn, job_id: str, spec: ImportSpec, flags: Flags, *, limit: int = 1000
) -> Created:
    """Catch up on every completed parent batch whose derived batches do not exist yet."""
    out = Created()
    if not spec.derivedTypes:
        return out
    while True:
        rows = conn.execute(
            Q("batches_needing_derivation"), {"job_id": job_id, "limit": limit}
        ).fetchall()
        for row in rows:
            out += _derive_one(conn, job_id, spec, flags, row["batch_id"], row["record_type_id"])
        if len(rows) < limit:
            return out


def create_for_batch(
    conn: Conn, job_id: str, spec: ImportSpec, flags: Flags, batch: dict[str, Any]
) -> Created:
    """Progressive creation for one just-completed parent batch (pending-only upserts)."""
    if batch["status"] != "completed" or not batch.get("needs_derivation"):
        return Created()
    return _derive_one(conn, job_id, spec, flags, batch["batch_id"], batch["record_type_id"])


def _derive_one(
    conn: Conn, job_id: str, spec: ImportSpec, flags: Flags, batch_id: str, record_type_id: int
) -> Created:
    out = Created(parent_batches=1)
    ids = flags.parent_ids(job_id, batch_id)
    if ids is None:  # the cache has none: the DB copy is the truth
        out.db_fallbacks = 1
        row = conn.execute(
            Q("batch_chunk_ids"), {"job_id": job_id, "batch_id": batch_id}
        ).fetchone()
        ids = [int(x) for x in (row["chunk_ids_json"] if row else [])]
    for dt in spec.derivedTypes:
        if record_type_id not in spec.parent_ids_of(dt):
            continue
        wave = derived_wave_number(spec, dt.recordTypeId)
        rows = conn.execute(
            Q("derived_batches_upsert"),
            {
                "job_id": job_id,
                "prefix": f"{dt.name}-{batch_id}",
                "wave_number": wave,
                "record_type_id": dt.recordTypeId,
                "batch_size": dt.batchSize,
                "parent_ids": ids,
                "parent_batch_id": batch_id,
                "parent_record_type_id": record_type_id,
            },
        ).fetchall()
        if rows:
            out.batch_ids += [r["batch_id"] for r in rows]
            out.wave_numbers.add(wave)
    conn.execute(Q("batch_mark_derived"), {"job_id": job_id, "batch_id": batch_id})
    if out.batch_ids:
        event(
            log,
            "derived_batches_upserted",
            job_id=job_id,
            parent_batch_id=batch_id,
            created_batches=len(out.batch_ids),
            parent_ids_from_db=bool(out.db_fallbacks),
        )
    return out
