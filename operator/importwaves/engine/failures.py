"""Batches that failed for good, or failed an attempt and wait for their retry, as data for the
hosts' reports (the operator's BatchFailed Event names the batch, its record type and wave, and
the recorded error: a failed worker's termination message or a custom command's stderr tail)."""

from __future__ import annotations

from dataclasses import dataclass

from importwaves.db.connect import Conn
from importwaves.db.queries import Q


@dataclass(frozen=True)
class FailedBatch:
    batch_id: str
    record_type_id: int
    wave_number: int
    attempts: int
    error: str


def failed_batches(conn: Conn, job_id: str, limit: int = 20) -> list[FailedBatch]:
    """The job's failed batches, the most recently failed first."""
    return _batches(conn, "batches_failed_recent", job_id, limit)


def retrying_batches(conn: Conn, job_id: str, limit: int = 20) -> list[FailedBatch]:
    """The job's batches back to pending after a failed attempt (waiting for their retry),
    the most recently failed first; `attempts` counts the attempts made so far."""
    return _batches(conn, "batches_retrying_recent", job_id, limit)


def _batches(conn: Conn, query: str, job_id: str, limit: int) -> list[FailedBatch]:
    rows = conn.execute(Q(query), {"job_id": job_id, "limit": limit}).fetchall()
    return [
        FailedBatch(
            str(r["batch_id"]),
            int(r["record_type_id"]),
            int(r["wave_number"]),
            int(r["attempts"]),
            str(r["last_error"] or ""),
        )
        for r in rows
    ]
