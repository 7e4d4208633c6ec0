"""Row accounting: what `Completed` proves about data (pure decisions, no I/O).

At planning the engine counts, per record type of the import id, the staging rows and those no
batch can ever cover (a derived row whose parent_id is NULL or names no staged parent; every row
of a record type the spec does not list). `planning_verdict` decides from those counts whether
the import may be planned: an import covering no row is invalid (`NoStagingRecords`); uncovered
rows block it (`UncoveredStagingRows`) unless the spec says `uncoveredRows: Skip`, which records
them as skipped.

At completion, in the coordinator's transaction, `completion_problems` compares, per record type,
the rows the completing workers recorded (each in its own fenced transaction) with the rows
planned, and the rows staged now with the rows planned plus skipped. Any difference keeps the job
from `Completed`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

#: How many record ids a report shows per record type.
FIRST_IDS = 10


class Code(StrEnum):
    """Machine-readable job status codes (ImportJob condition reasons)."""

    NONE = ""
    NO_STAGING_RECORDS = "NoStagingRecords"
    UNCOVERED_STAGING_ROWS = "UncoveredStagingRows"
    ROW_COUNT_MISMATCH = "RowCountMismatch"


@dataclass(frozen=True)
class TypeStaging:
    """One record type's staging rows at planning."""

    record_type_id: int
    #: the spec's name for it; None when the spec does not list this record type
    name: str | None
    staged: int
    #: rows no batch can cover (for a type not in the spec: all of them)
    uncovered: int = 0
    first_ids: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        if self.name is None:
            return f"record type {self.record_type_id} (not in the spec)"
        return f"{self.name} ({self.record_type_id})"


@dataclass(frozen=True)
class PlanVerdict:
    ok: bool
    code: Code = Code.NONE
    message: str = ""
    #: rows skipped per record type id (uncoveredRows: Skip)
    skipped: dict[int, int] = field(default_factory=dict)


def planning_verdict(
    tenant: str, job_id: str, types: Sequence[TypeStaging], policy: str
) -> PlanVerdict:
    """May the import be planned? `types`: every spec type and every staged type."""
    covered = sum(t.staged - t.uncovered for t in types if t.name is not None)
    uncovered = [t for t in types if t.uncovered > 0]
    n_uncovered = sum(t.uncovered for t in uncovered)
    if covered <= 0:
        msg = (
            f"import id {job_id!r} of tenant {tenant!r} has no staging rows the plan can cover "
            f"(staging_records with job_id = {job_id!r} of the spec's record types: none"
        )
        if n_uncovered:
            msg += f"; {n_uncovered} uncovered row(s): " + _describe(uncovered)
        msg += "); load the staging rows or fix spec.importId"
        return PlanVerdict(False, Code.NO_STAGING_RECORDS, msg)
    if uncovered and policy != "Skip":
        return PlanVerdict(
            False,
            Code.UNCOVERED_STAGING_ROWS,
            f"{n_uncovered} staging row(s) of import id {job_id!r} (tenant {tenant!r}) no batch "
            f"can cover: {_describe(uncovered)}; fix the staging rows, or set "
            "spec.uncoveredRows: Skip to import the rest and record them as skipped",
        )
    return PlanVerdict(True, skipped={t.record_type_id: t.uncovered for t in uncovered})


def _describe(types: Sequence[TypeStaging]) -> str:
    parts = []
    for t in types:
        why = "not in the spec" if t.name is None else "parent_id null or no staged parent"
        label = t.label if t.name is not None else f"record type {t.record_type_id}"
        ids = ", ".join(str(i) for i in t.first_ids[:FIRST_IDS])
        more = ", ..." if t.uncovered > len(t.first_ids[:FIRST_IDS]) else ""
        parts.append(f"{label}: {t.uncovered} row(s), {why} (first ids {ids}{more})")
    return "; ".join(parts)


def staging_report(types: Sequence[TypeStaging], verdict: PlanVerdict) -> dict[str, Any]:
    """The planning's report, kept on the job row (JSON)."""
    return {
        "types": [
            {
                "recordTypeId": t.record_type_id,
                "name": t.name,
                "staged": t.staged,
                "uncovered": t.uncovered,
                "firstIds": list(t.first_ids[:FIRST_IDS]),
                "skipped": verdict.skipped.get(t.record_type_id, 0),
            }
            for t in types
        ],
        "code": verdict.code.value,
    }


@dataclass(frozen=True)
class TypeRows:
    """One record type's rows at the completion check (fresh from the batch rows)."""

    record_type_id: int
    name: str
    #: staging rows of this type now
    staged: int
    #: sum of the batches' record_count
    planned: int
    #: sum of the row counts the completing workers recorded
    written: int
    skipped: int = 0
    #: completed batches that recorded no row count
    uncounted: int = 0


def completion_problems(rows: Sequence[TypeRows]) -> list[str]:
    """Why the rows say "not complete" (empty: every staged row is written or skipped)."""
    out = []
    for r in rows:
        label = f"{r.name} ({r.record_type_id})"
        if r.uncounted:
            out.append(
                f"{label}: {r.uncounted} completed batch(es) recorded no row count (completed "
                "outside the worker contract)"
            )
        if r.written != r.planned:
            out.append(f"{label}: {r.written} row(s) written, {r.planned} planned")
        if r.planned + r.skipped != r.staged:
            out.append(
                f"{label}: {r.staged} row(s) staged now, {r.planned} planned + {r.skipped} "
                "skipped (staging changed after planning)"
            )
    return out


@dataclass(frozen=True)
class RowCounts:
    staged: int
    imported: int
    skipped: int


def rows_by_name(waves: Sequence[Any], report: Mapping[str, Any] | None) -> dict[str, RowCounts]:
    """Staged / imported / skipped rows per record type, for status views: wave counters when
    the job is planned, plus (or, unplanned, only) the planning report's types without a wave."""
    out: dict[str, RowCounts] = {}
    seen: set[int] = set()
    for w in waves:
        seen.add(w.record_type_id)
        out[w.name] = RowCounts(w.rows_staged, w.rows_written, w.rows_skipped)
    for t in (report or {}).get("types", []):
        rid = int(t["recordTypeId"])
        if rid in seen:
            continue
        name = t.get("name") or f"recordType{rid}"
        out[name] = RowCounts(int(t["staged"]), 0, int(t.get("skipped", 0)))
    return out
