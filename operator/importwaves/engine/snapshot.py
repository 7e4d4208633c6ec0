"""Read one job's snapshot (a handful of indexed queries, independent of job size)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine.model import DerivedGate, JobStatus, Snapshot, WaveState
from importwaves.engine.planner import derived_wave_number
from importwaves.spec import ImportSpec

AWAITING_LIMIT = 1000


def _wave(r: dict[str, Any]) -> WaveState:
    return WaveState(
        wave_number=r["wave_number"],
        record_type_id=r["record_type_id"],
        name=r["record_type_name"],
        level=r["dependency_level"],
        status=r["status"],
        total=r["total_batches"],
        pending=r["pending_batches"],
        dispatched=r["dispatched_batches"],
        processing=r["processing_batches"],
        completed=r["completed_batches"],
        failed=r["failed_batches"],
        first_dispatched_at=r["first_dispatched_at"],
        last_completed_at=r["last_completed_at"],
        rows_staged=int(r.get("rows_staged") or 0),
        rows_skipped=int(r.get("rows_skipped") or 0),
        rows_planned=int(r.get("rows_planned") or 0),
        rows_written=int(r.get("rows_written") or 0),
    )


def read_waves(conn: Conn, job_id: str) -> tuple[WaveState, ...]:
    return tuple(_wave(r) for r in conn.execute(Q("waves_snapshot"), {"job_id": job_id}).fetchall())


def gates(spec: ImportSpec, waves: tuple[WaveState, ...]) -> tuple[DerivedGate, ...]:
    by_type = {w.record_type_id: w for w in waves}
    out = []
    for dt in spec.derivedTypes:
        parents = [by_type[rid] for rid in spec.parent_ids_of(dt) if rid in by_type]
        out.append(
            DerivedGate(
                wave_number=derived_wave_number(spec, dt.recordTypeId),
                parent_total=sum(p.total for p in parents),
                parent_completed=sum(p.completed for p in parents),
                threshold=spec.completionThreshold,
            )
        )
    return tuple(out)


def read_snapshot(conn: Conn, job: dict[str, Any], spec: ImportSpec) -> Snapshot:
    return send_snapshot(conn, job, spec)()


def send_snapshot(conn: Conn, job: dict[str, Any], spec: ImportSpec) -> Callable[[], Snapshot]:
    """Send the snapshot's statement (in the caller's pipeline, if it has one: its reply is not
    awaited here); returns the step that reads the reply into the Snapshot."""
    read = send_snapshot_of(conn, job["job_id"])
    return lambda: read(job, spec)


def send_snapshot_of(conn: Conn, job_id: str) -> Callable[[dict[str, Any], ImportSpec], Snapshot]:
    """`send_snapshot` before the job's row is read: the statement needs only the job's id (so it
    can travel in the round trip that takes the job lock); the step that reads its reply is given
    the row (as `job_lock` read it) and its spec."""
    # Waves and the parent batches awaiting derivation in ONE statement (one instant, one round
    # trip): a parent completion committed after it is in neither, one before it in both.
    cur = conn.execute(Q("job_snapshot"), {"job_id": job_id, "limit": AWAITING_LIMIT})

    def read(job: dict[str, Any], spec: ImportSpec) -> Snapshot:
        rows = cur.fetchall()
        waves = tuple(_wave(r) for r in rows)
        awaiting = int(rows[0]["awaiting_derivation"]) if rows and spec.derivedTypes else 0
        return Snapshot(
            job_id=job_id,
            status=JobStatus(job["status"]),
            suspended=spec.suspend,
            parallelism=spec.parallelism,
            waves=waves,
            gates=gates(spec, waves),
            awaiting_derivation=awaiting,
        )

    return read
