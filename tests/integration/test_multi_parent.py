"""A derived type with two parent types whose record ids overlap.

Staged lines name their parent's record type (`parent_record_type_id`), so each line belongs to
the derived batches of exactly one parent batch: none is imported twice, none is lost.
"""

from __future__ import annotations

import pytest

from helpers import drive, make_engine, tenant_conn
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
