"""Read a job's row with its spec parsed: the one place a stored spec becomes an ImportSpec."""

from __future__ import annotations

from typing import Any, NamedTuple

from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.spec import ImportSpec


class JobRow(NamedTuple):
    #: the import_jobs row as `job_get` (or, locked, `job_lock`) reads it
    row: dict[str, Any]
    spec: ImportSpec


def spec_of(row: dict[str, Any]) -> ImportSpec:
    """The parsed spec of an import_jobs row (any query that selects `spec`)."""
    return ImportSpec.model_validate(row["spec"])


def load_job(conn: Conn, job_id: str, *, lock: bool = False) -> JobRow | None:
    """The job's row and its parsed spec, or None when there is no such job. `lock`: take the
    per-job lock (`job_lock`, FOR UPDATE) that serializes every decision about the job."""
    row = conn.execute(Q("job_lock" if lock else "job_get"), {"job_id": job_id}).fetchone()
    if row is None:
        return None
    return JobRow(row, spec_of(row))
