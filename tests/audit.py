"""Test instrumentation: every batch transition recorded in the tenant schema, and the guard rules
checked against that record and the rows.

`install(conn)` adds a row-level trigger (test schemas only, never shipped) that writes every
insert, status change and fencing-token bump of `wave_batches` into `iw_audit`, in the same
transaction as the change: a rolled-back change leaves no audit row, a committed one always does.
`violations()` then checks, from the database alone:

- never `completed` while any batch (main or derived) is unfinished, any parent batch still
  awaits its derived batches, or a staged row is missing from its target table;
- a batch fails only after its last attempt; a failed job has a failed batch and nothing active;
- main waves in order: no batch of wave n dispatched before every batch of the main waves before
  it completed; no derived batch dispatched before its own parent batch completed and before the
  parents reached the completion threshold (counted from completions committed before that
  dispatch; `clock_timestamp()` of a committed completion is always earlier than that of a
  dispatch whose transaction saw it);
- at most one active dispatch per batch: each (batch, dispatch_seq) claimed at most once, each
  batch completed at most once;
- counters equal to the batch rows; rows imported equal the records of the completed batches
  (nothing lost, nothing imported by a batch that did not complete); no line imported before its
  parent, no orphan line.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from importwaves.datagen import CUSTOMER
from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine.model import parents_needed
from importwaves.spec import ImportSpec
from importwaves.verify import verify_import

AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS iw_audit (
    id              bigserial PRIMARY KEY,
    job_id          text NOT NULL,
    batch_id        text NOT NULL,
    wave_number     integer NOT NULL,
    record_type_id  integer NOT NULL,
    parent_batch_id text,
    old_status      text,
    new_status      text NOT NULL,
    dispatch_seq    integer NOT NULL,
    worker_id       text,
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION iw_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status
       OR NEW.dispatch_seq IS DISTINCT FROM OLD.dispatch_seq THEN
        INSERT INTO iw_audit (job_id, batch_id, wave_number, record_type_id, parent_batch_id,
                              old_status, new_status, dispatch_seq, worker_id)
        VALUES (NEW.job_id, NEW.batch_id, NEW.wave_number, NEW.record_type_id,
                NEW.parent_batch_id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
                NEW.status, NEW.dispatch_seq, NEW.worker_id);
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS iw_audit ON wave_batches;
CREATE TRIGGER iw_audit AFTER INSERT OR UPDATE ON wave_batches
    FOR EACH ROW EXECUTE FUNCTION iw_audit_fn();
"""

_BATCHES = (
    "SELECT batch_id, wave_number, record_type_id, status, attempts, dispatch_seq, "
    "needs_derivation, parent_batch_id, record_count FROM wave_batches WHERE job_id = %s "
    "ORDER BY id"
)
_AUDIT = (
    "SELECT id, batch_id, wave_number, record_type_id, parent_batch_id, old_status, new_status, "
    "dispatch_seq, worker_id, at FROM iw_audit WHERE job_id = %s ORDER BY id"
)
_IMPORTED = """
SELECT 'customers' AS t, count(*) AS n FROM customers WHERE imported_job = %(j)s
UNION ALL SELECT 'transactions', count(*) FROM transactions WHERE imported_job = %(j)s
UNION ALL SELECT 'transaction_lines', count(*) FROM transaction_lines WHERE imported_job = %(j)s
"""


def install(conn: Conn) -> None:
    """Add the audit table and trigger to the connection's (tenant) schema."""
    conn.execute(AUDIT_SQL)


def audit_rows(conn: Conn, job_id: str) -> list[dict[str, Any]]:
    return conn.execute(_AUDIT, (job_id,)).fetchall()


def violations(conn: Conn, job_id: str, spec: ImportSpec) -> list[str]:
    """Every guard rule broken right now (empty when all hold)."""
    out: list[str] = []
    job = conn.execute(Q("job_get"), {"job_id": job_id}).fetchone()
    if job is None:
        return [f"job {job_id} vanished"]
    rows = conn.execute(_BATCHES, (job_id,)).fetchall()
    audit = audit_rows(conn, job_id)
    status = job["status"]
    unfinished = [b for b in rows if b["status"] in ("pending", "dispatched", "processing")]
    active = [b for b in rows if b["status"] in ("dispatched", "processing")]

    # -- never completed early -------------------------------------------------------------------
    if status == "completed":
        if unfinished:
            out.append(
                f"job completed with {len(unfinished)} unfinished batch(es): "
                + ", ".join(f"{b['batch_id']}={b['status']}" for b in unfinished[:5])
            )
        if any(b["status"] == "failed" for b in rows):
            out.append("job completed with a failed batch")
        awaiting = [b["batch_id"] for b in rows if b["needs_derivation"]]
        if awaiting:
            out.append(f"job completed while parent batches await derived creation: {awaiting}")
        v = verify_import(conn, job_id, spec)
        if not v.ok:
            out.append("job completed but verification fails: " + "; ".join(v.failures()))

    # -- failures only after the last attempt ------------------------------------------------------
    for b in rows:
        if b["status"] == "failed" and b["attempts"] < spec.max_attempts:
            out.append(
                f"batch {b['batch_id']} failed after {b['attempts']} of "
                f"{spec.max_attempts} attempts"
            )
    if status == "failed":
        if not any(b["status"] == "failed" for b in rows):
            out.append("job failed without a failed batch")
        if active:
            out.append(f"job failed with {len(active)} batch(es) still handed to workers")

    # -- parents first -----------------------------------------------------------------------------
    out += _order_violations(rows, audit, spec)

    # -- one active dispatch per batch ------------------------------------------------------------
    claims = Counter(
        (a["batch_id"], a["dispatch_seq"]) for a in audit if a["new_status"] == "processing"
    )
    out += [f"dispatch {k} claimed {n} times" for k, n in claims.items() if n > 1]
    done = Counter(a["batch_id"] for a in audit if a["new_status"] == "completed")
    out += [f"batch {b} completed {n} times" for b, n in done.items() if n > 1]
    dispatched_seqs: dict[str, list[int]] = {}
    for a in audit:
        if a["new_status"] == "dispatched":
            dispatched_seqs.setdefault(a["batch_id"], []).append(a["dispatch_seq"])
    for bid, seqs in dispatched_seqs.items():
        if seqs != sorted(set(seqs)):
            out.append(f"batch {bid} reused a fencing token: dispatch_seq {seqs}")

    # -- counters and rows -------------------------------------------------------------------------
    bad = conn.execute(Q("counters_mismatch"), {"job_id": job_id}).fetchall()
    if bad:
        out.append(f"wave counters differ from the batch rows: {bad}")
    out += _row_violations(conn, job_id, rows, spec)
    return out


def _order_violations(
    rows: list[dict[str, Any]], audit: list[dict[str, Any]], spec: ImportSpec
) -> list[str]:
    out: list[str] = []
    by_type: Counter[int] = Counter(b["record_type_id"] for b in rows)
    main_ids = [rt.recordTypeId for rt in spec.recordTypes]
    derived = {d.recordTypeId: d for d in spec.derivedTypes}
    completed_at: dict[str, Any] = {}
    completions: list[tuple[Any, int]] = []
    for a in audit:
        if a["new_status"] == "completed":
            completed_at[a["batch_id"]] = a["at"]
            completions.append((a["at"], a["record_type_id"]))

    def done_before(at: Any, types: set[int]) -> int:
        return sum(1 for t, rid in completions if t < at and rid in types)

    for a in audit:
        if a["new_status"] != "dispatched":
            continue
        rid = a["record_type_id"]
        if rid in main_ids:
            earlier = set(main_ids[: main_ids.index(rid)])
            need = sum(by_type[t] for t in earlier)
            got = done_before(a["at"], earlier)
            if got < need:
                out.append(
                    f"{a['batch_id']} (seq {a['dispatch_seq']}) dispatched when {got} of {need} "
                    "batches of the main waves before it had completed"
                )
        elif rid in derived:
            parent = a["parent_batch_id"]
            if parent not in completed_at or completed_at[parent] > a["at"]:
                out.append(f"derived {a['batch_id']} dispatched before its parent {parent}")
            parents = set(spec.parent_ids_of(derived[rid]))
            total = sum(by_type[t] for t in parents)
            k = parents_needed(spec.completionThreshold, total)
            got = done_before(a["at"], parents)
            if got < k:
                out.append(
                    f"derived {a['batch_id']} dispatched with {got} of {total} parent batches "
                    f"completed (threshold {spec.completionThreshold}% needs {k})"
                )
    for a in audit:  # derived batches are created for completed parents only
        if a["old_status"] is None and a["record_type_id"] in derived:
            parent = a["parent_batch_id"]
            if parent not in completed_at or completed_at[parent] > a["at"]:
                out.append(f"derived {a['batch_id']} created before its parent {parent} completed")
    return out


def _row_violations(
    conn: Conn, job_id: str, rows: list[dict[str, Any]], spec: ImportSpec
) -> list[str]:
    out: list[str] = []
    derived_ids = {d.recordTypeId for d in spec.derivedTypes}

    def table(rid: int) -> str:
        if rid == CUSTOMER:
            return "customers"
        return "transaction_lines" if rid in derived_ids else "transactions"

    want: Counter[str] = Counter()
    for b in rows:
        if b["status"] == "completed":
            want[table(b["record_type_id"])] += b["record_count"]
    got = {r["t"]: r["n"] for r in conn.execute(_IMPORTED, {"j": job_id}).fetchall()}
    for t in ("customers", "transactions", "transaction_lines"):
        if got.get(t, 0) != want[t]:
            out.append(f"{t}: {got.get(t, 0)} rows imported, the completed batches hold {want[t]}")
    orphans = conn.execute(Q("orphan_lines"), {"job_id": job_id}).fetchone()
    early = conn.execute(Q("lines_before_parent"), {"job_id": job_id}).fetchone()
    if orphans and orphans["n"]:
        out.append(f"{orphans['n']} imported line(s) without their parent")
    if early and early["n"]:
        out.append(f"{early['n']} line(s) imported before their parent")
    return out
