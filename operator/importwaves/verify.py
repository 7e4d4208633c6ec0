"""Verify an import from the database: counts, parents, counters, nothing left unfinished."""

from __future__ import annotations

from dataclasses import dataclass, field

from importwaves.datagen import CUSTOMER
from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.spec import ImportSpec


@dataclass
class Verification:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append((name, passed, detail))

    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, passed, detail in self.checks if not passed]


def verify_import(conn: Conn, job_id: str, spec: ImportSpec) -> Verification:
    v = Verification()
    staging = {
        r["record_type_id"]: r["n"]
        for r in conn.execute(Q("staging_counts"), {"job_id": job_id}).fetchall()
    }
    target = {
        r["target"]: r["n"] for r in conn.execute(Q("target_counts"), {"job_id": job_id}).fetchall()
    }
    derived_ids = {d.recordTypeId for d in spec.derivedTypes}
    expected = {
        "customers": sum(n for t, n in staging.items() if t == CUSTOMER),
        "transactions": sum(
            n for t, n in staging.items() if t != CUSTOMER and t not in derived_ids
        ),
        "transaction_lines": sum(n for t, n in staging.items() if t in derived_ids),
    }
    for table, want in expected.items():
        got = target.get(table, 0)
        v.add(f"{table} rows = staging", got == want, f"{got} imported / {want} staged")
    orphans = conn.execute(Q("orphan_lines"), {"job_id": job_id}).fetchone()["n"]  # type: ignore[index]
    v.add("every line's parent exists", orphans == 0, f"{orphans} orphan line(s)")
    early = conn.execute(Q("lines_before_parent"), {"job_id": job_id}).fetchone()["n"]  # type: ignore[index]
    v.add("no line imported before its parent", early == 0, f"{early} line(s) before parent")
    left = conn.execute(Q("unfinished_by_type"), {"job_id": job_id}).fetchall()
    n_left = sum(r["n"] for r in left)
    v.add("no batch left unfinished", n_left == 0, f"{n_left} unfinished batch(es)")
    failed = conn.execute(Q("batches_failed"), {"job_id": job_id, "limit": 5}).fetchall()
    v.add("no batch failed", not failed, f"{len(failed)} failed batch(es)")
    bad = conn.execute(Q("counters_mismatch"), {"job_id": job_id}).fetchall()
    v.add("wave counters equal batch rows", not bad, f"{len(bad)} wave(s) disagree")
    bad_rows = conn.execute(Q("rows_counters_mismatch"), {"job_id": job_id}).fetchall()
    v.add("row counters equal batch rows", not bad_rows, f"{len(bad_rows)} wave(s) disagree")
    job = conn.execute(Q("job_get"), {"job_id": job_id}).fetchone()
    status = job["status"] if job else "missing"
    v.add("job completed", status == "completed", f"status {status}")
    return v
