"""Create derived (TransactionLine) batches for completed parent batches.

Used by the coordinator run (level-based: the run a parent batch's completion prompts creates
its derived batches, progressively, seed A; any later run catches up on a parent whose prompt
never came; `decide.derivation` says when a run leaves it to the next) and by recovery's
reconcile. Always called under the job lock. Set-based: one statement per
derived type creates the derived batches of every completed parent batch that lacks them (the
parent ids read from the parent batches' rows in that statement) and marks those parents done.
Deterministic batch ids make every call idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine.planner import derived_wave_number
from importwaves.log import event
from importwaves.spec import DerivedType, ImportSpec

log = logging.getLogger("importwaves.derived")

#: Parent batches handled per statement (the loop goes on until fewer are left).
PARENTS_PER_STATEMENT = 1000


@dataclass
class Created:
    batch_ids: list[str] = field(default_factory=list)
    wave_numbers: set[int] = field(default_factory=set)
    parent_batches: int = 0

    def __iadd__(self, other: Created) -> Created:
        self.batch_ids += other.batch_ids
        self.wave_numbers |= other.wave_numbers
        self.parent_batches += other.parent_batches
        return self


def create_for_completed_parents(
    conn: Conn, job_id: str, spec: ImportSpec, *, limit: int = PARENTS_PER_STATEMENT
) -> Created:
    """Create the derived batches of every completed parent batch that does not have them yet."""
    out = Created()
    if not spec.derivedTypes:
        return out
    while True:
        if len(spec.derivedTypes) == 1:
            # One statement finds the parent batches, creates their children and marks them.
            handled = _create(conn, job_id, spec, spec.derivedTypes[0], None, True, limit, out)
        else:
            # Several derived types: fix the parent set first, so that every type's statement
            # and the final mark cover the same parent batches.
            ids = [
                r["batch_id"]
                for r in conn.execute(
                    Q("batches_needing_derivation"), {"job_id": job_id, "limit": limit}
                ).fetchall()
            ]
            for dt in spec.derivedTypes:
                _create(conn, job_id, spec, dt, ids, False, limit, out)
            conn.execute(Q("batches_mark_derived"), {"job_id": job_id, "batch_ids": ids})
            handled = len(ids)
        out.parent_batches += handled
        if handled < limit:
            return out


def send_create(conn: Conn, job_id: str, spec: ImportSpec) -> Callable[[], Created] | None:
    """For a spec with ONE derived type: send (in the caller's pipeline, without waiting for
    its reply) the statement that creates the derived batches of every completed parent batch
    that lacks them, up to PARENTS_PER_STATEMENT of them; returns the step that reads the reply.
    Parent batches beyond that are left to the coordinator run's level-based catch-up (its
    snapshot counts them). None (nothing sent) for a spec with no or several derived types."""
    if len(spec.derivedTypes) != 1:
        return None
    dt = spec.derivedTypes[0]
    wave = derived_wave_number(spec, dt.recordTypeId)
    cur = conn.execute(Q("derived_batches_create"), _params(job_id, spec, dt, wave, None, True))

    def read() -> Created:
        out = Created()
        row = cur.fetchone()
        assert row is not None  # an aggregate: always one row
        out.parent_batches += _record(row, job_id, dt, wave, out)
        return out

    return read


def _params(
    job_id: str,
    spec: ImportSpec,
    dt: DerivedType,
    wave: int,
    parent_batch_ids: list[str] | None,
    mark: bool,
    limit: int = PARENTS_PER_STATEMENT,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "name": dt.name,
        "wave_number": wave,
        "record_type_id": dt.recordTypeId,
        "batch_size": dt.batchSize,
        "parent_type_ids": spec.parent_ids_of(dt),
        "parent_batch_ids": parent_batch_ids,
        "mark_derived": mark,
        "limit": limit,
    }


def _create(
    conn: Conn,
    job_id: str,
    spec: ImportSpec,
    dt: DerivedType,
    parent_batch_ids: list[str] | None,
    mark: bool,
    limit: int,
    out: Created,
) -> int:
    wave = derived_wave_number(spec, dt.recordTypeId)
    row = conn.execute(
        Q("derived_batches_create"),
        _params(job_id, spec, dt, wave, parent_batch_ids, mark, limit),
    ).fetchone()
    assert row is not None  # an aggregate: always one row
    return _record(row, job_id, dt, wave, out)


def _record(row: dict[str, Any], job_id: str, dt: DerivedType, wave: int, out: Created) -> int:
    """Add what one derived_batches_create reply created to `out` (logged per parent batch);
    how many parent batches it read."""
    if row["batch_ids"]:
        out.batch_ids += row["batch_ids"]
        out.wave_numbers.add(wave)
        per_parent: dict[str, int] = {}
        for parent in row["parent_batch_ids"]:
            per_parent[parent] = per_parent.get(parent, 0) + 1
        for parent, n in per_parent.items():
            event(
                log,
                "derived_batches_upserted",
                job_id=job_id,
                parent_batch_id=parent,
                derived_type=dt.name,
                created_batches=n,
            )
    return int(row["parents"])
