"""A derived type with two parent types whose record ids overlap.

Staged lines name their parent's record type (`parent_record_type_id`), so each line belongs to
the derived batches of exactly one parent batch: none is imported twice, none is lost.
"""

from __future__ import annotations

import pytest

from helpers import drive, make_engine, tenant_conn
from importwaves.engine import derived
from importwaves.engine.model import Outcome
from importwaves.spec import ImportSpec

pytestmark = pytest.mark.integration

ORDER, INVOICE, LINE = -30, -31, -13


def _stage(dsn: str, tenant: str, job_id: str) -> int:
    """40 sales orders and 40 invoices with the SAME ids 1..40, each with 3 lines. (The
    reference import writes both into `transactions`, so there the invoice overwrites the order
    of the same id; what matters here is which derived batches each line lands in.)"""
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload) "
            "SELECT %s, %s, i, NULL, jsonb_build_object('amount', '1.00') "
            "FROM generate_series(1, 40) i",
            (job_id, ORDER),
        )
        conn.execute(
            "INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload) "
            "SELECT %s, %s, i, NULL, jsonb_build_object('amount', '2.00') "
            "FROM generate_series(1, 40) i",
            (job_id, INVOICE),
        )
        # lines of orders and of invoices: parent ids 1..40 both times, told apart only by
        # parent_record_type_id
        conn.execute(
            "INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, "
            "parent_record_type_id, payload) "
            "SELECT %s, %s, row_number() OVER (), p, t, jsonb_build_object('amount', '0.50') "
            "FROM (SELECT i AS p, %s AS t FROM generate_series(1, 40) i "
            "      UNION ALL SELECT i, %s FROM generate_series(1, 40) i) parents, "
            "     generate_series(1, 3) k",
            (job_id, LINE, ORDER, INVOICE),
        )
        row = conn.execute(
            "SELECT count(*) AS n FROM staging_records WHERE job_id = %s AND record_type_id = %s",
            (job_id, LINE),
        ).fetchone()
    assert row is not None
    return int(row["n"])


def test_lines_follow_their_own_parent_type(dsn: str, tenant: str, redis_url: str) -> None:
    lines = _stage(dsn, tenant, "mp")
    spec = ImportSpec.model_validate(
        {
            "tenant": tenant,
            "recordTypes": [
                {"name": "SalesOrder", "recordTypeId": ORDER, "batchSize": 10},
                {"name": "Invoice", "recordTypeId": INVOICE, "batchSize": 10},
            ],
            "derivedTypes": [
                {
                    "name": "TransactionLine",
                    "recordTypeId": LINE,
                    "batchSize": 7,
                    "parentTypes": ["SalesOrder", "Invoice"],
                }
            ],
            "parallelism": 3,
        }
    )
    with make_engine(dsn, tenant, redis_url) as engine:
        engine.submit("mp", spec)
        assert drive(engine, dsn, tenant, "mp").outcome == Outcome.COMPLETED
    with tenant_conn(dsn, tenant) as conn:
        covered = conn.execute(
            "SELECT coalesce(sum(record_count), 0) AS n FROM wave_batches "
            "WHERE job_id = 'mp' AND record_type_id = %s",
            (LINE,),
        ).fetchone()
        imported = conn.execute(
            "SELECT count(*) AS n FROM transaction_lines WHERE imported_job = 'mp'"
        ).fetchone()
        by_parent_type = conn.execute(
            "SELECT p.record_type_id, count(*) AS n FROM wave_batches d "
            "JOIN wave_batches p ON p.job_id = d.job_id AND p.batch_id = d.parent_batch_id "
            "WHERE d.job_id = 'mp' AND d.record_type_id = %s GROUP BY 1 ORDER BY 1",
            (LINE,),
        ).fetchall()
    assert covered is not None and imported is not None
    assert covered["n"] == lines == 240  # every line in exactly one derived batch
    assert imported["n"] == lines
    assert {r["record_type_id"] for r in by_parent_type} == {ORDER, INVOICE}


SHIPMENT = -14


def test_two_derived_types_of_one_parent_each_get_every_child_once(
    dsn: str, tenant: str, redis_url: str
) -> None:
    """Two derived types read the same parent type: each parent batch gets both types' derived
    batches (each statement covers the same parent set) and is marked derived once, also when
    the catch-up handles the parents a few at a time."""
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload) "
            "SELECT 'two', %s, i, NULL, jsonb_build_object('amount', '1.00') "
            "FROM generate_series(1, 40) i",
            (ORDER,),
        )
        # 3 lines and 2 shipments per order, ids apart
        conn.execute(
            "INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload) "
            "SELECT 'two', t, CASE WHEN t = %s THEN 1000 ELSE 100000 END * k + p, p, "
            "       jsonb_build_object('amount', '0.50') "
            "FROM generate_series(1, 40) p, generate_series(1, 3) k, "
            "     (VALUES (%s), (%s)) types(t) "
            "WHERE t = %s OR k <= 2",
            (LINE, LINE, SHIPMENT, LINE),
        )
    spec = ImportSpec.model_validate(
        {
            "tenant": tenant,
            "recordTypes": [{"name": "SalesOrder", "recordTypeId": ORDER, "batchSize": 10}],
            "derivedTypes": [
                {
                    "name": "TransactionLine",
                    "recordTypeId": LINE,
                    "batchSize": 7,
                    "parentTypes": ["SalesOrder"],
                },
                {
                    "name": "Shipment",
                    "recordTypeId": SHIPMENT,
                    "batchSize": 5,
                    "parentTypes": ["SalesOrder"],
                },
            ],
            "parallelism": 4,
        }
    )
    with make_engine(dsn, tenant, redis_url) as engine:
        engine.submit("two", spec)
        # only the parents run; their derived batches are created as they complete
        held = drive(engine, dsn, tenant, "two", run_if=lambda b: b.record_type_id == ORDER).held
        with tenant_conn(dsn, tenant) as conn, conn.transaction():
            # as if every parent's derivation had been lost: the catch-up, 3 parents per
            # round, finds all 4 again, creates nothing twice and marks each parent once
            conn.execute(
                "UPDATE wave_batches SET needs_derivation = true "
                "WHERE job_id = 'two' AND record_type_id = %s",
                (ORDER,),
            )
            again = derived.create_for_completed_parents(conn, "two", spec, limit=3)
        assert again.parent_batches == 4 and again.batch_ids == []
        with tenant_conn(dsn, tenant) as conn:
            rows = conn.execute(
                "SELECT record_type_id, count(*) AS batches, sum(record_count) AS records, "
                "count(DISTINCT parent_batch_id) AS parents FROM wave_batches "
                "WHERE job_id = 'two' AND record_type_id IN (%s, %s) GROUP BY 1 ORDER BY 1",
                (SHIPMENT, LINE),
            ).fetchall()
            left = conn.execute(
                "SELECT count(*) AS n FROM wave_batches WHERE job_id = 'two' AND needs_derivation"
            ).fetchone()
        assert [(r["record_type_id"], r["records"], r["parents"]) for r in rows] == [
            (SHIPMENT, 80, 4),
            (LINE, 120, 4),
        ]
        assert left is not None and left["n"] == 0
        # and the import runs to the end (both derived waves, every child imported once)
        assert drive(engine, dsn, tenant, "two", include=held).outcome == Outcome.COMPLETED
        with tenant_conn(dsn, tenant) as conn:
            imported = conn.execute(
                "SELECT count(*) AS n FROM transaction_lines WHERE imported_job = 'two'"
            ).fetchone()
        assert imported is not None and imported["n"] == 200
