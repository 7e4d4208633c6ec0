"""Adversarial cases for data-level completion (issue 11), on the real PostgreSQL and Redis with
the real engine, worker and local runner: `Completed` is a proof about rows, not about exit codes
or notices.

- a worker command that exits 0 and writes nothing never completes a batch (local runner);
- a completion notice for a running batch (what a forged NOTIFY delivers) records nothing;
- an import id with no staging rows is `invalid` / NoStagingRecords, never completed, and starts
  once its rows are loaded;
- derived rows whose parent is NULL or not staged, and rows of a record type the spec does not
  list, block planning (UncoveredStagingRows, count and first ids) unless uncoveredRows: Skip,
  which completes and reports the skipped count;
- a staging row deleted after planning fails its batch at once (row count != planned), and rows
  staged after planning keep the import from completing (RowCountMismatch);
- the database refuses a completion without a row count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from helpers import (
    CUSTOMER,
    LINE,
    SALES_ORDER,
    assert_complete,
    batches,
    drive,
    make_engine,
    small_spec,
    stage,
    tenant_conn,
)
from importwaves.engine.app import Engine
from importwaves.engine.listener import EXIT_WITHOUT_COMPLETION
from importwaves.engine.model import Outcome
from importwaves.flags import Flags
from importwaves.launch.local import LocalLauncher
from importwaves.report import job_report
from importwaves.runner import LocalRunner
from importwaves.verify import verify_import
from importwaves.worker import WorkItem, run_batch

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(dsn: str, tenant: str, redis_url: str) -> Iterator[Engine]:
    e = make_engine(dsn, tenant, redis_url)
    yield e
    e.close()


def job_row(dsn: str, tenant: str, job_id: str = "job") -> dict[str, Any]:
    with tenant_conn(dsn, tenant) as conn:
        row = conn.execute(
            "SELECT status, status_code, status_reason, planned_at, staging_report "
            "FROM import_jobs WHERE job_id = %s",
            (job_id,),
        ).fetchone()
    assert row is not None
    return dict(row)


def wave_rows(dsn: str, tenant: str, job_id: str = "job") -> dict[str, tuple[int, int, int, int]]:
    with tenant_conn(dsn, tenant) as conn:
        rows = conn.execute(
            "SELECT record_type_name, rows_staged, rows_planned, rows_written, rows_skipped "
            "FROM wave_coordination WHERE job_id = %s",
            (job_id,),
        ).fetchall()
    return {
        r["record_type_name"]: (
            r["rows_staged"],
            r["rows_planned"],
            r["rows_written"],
            r["rows_skipped"],
        )
        for r in rows
    }


# -- a notice is only a prompt ------------------------------------------------------------------
def test_worker_command_that_exits_0_and_writes_nothing_never_completes(
    engine: Engine, dsn: str, tenant: str
) -> None:
    """The local runner with a custom worker command `sh -c "exit 0"`: every attempt is a failed
    attempt with the contract's message; the import ends failed, never completed, nothing
    written."""
    stage(dsn, tenant, "job", orders=40)
    launcher = LocalLauncher(dsn, command=["sh", "-c", "exit 0"])
    engine.launcher = launcher
    spec = small_spec(tenant, retries=1)
    assert engine.submit("job", spec)
    stats = LocalRunner(engine, tick=0.2, notify=True).run("job", timeout=60)
    print(f"exit-0 worker: status {stats.status}, {stats.worker_runs} runs, "
          f"{stats.worker_failures} failed attempts")  # fmt: skip
    assert stats.status == "failed"
    assert stats.worker_failures == stats.worker_runs == spec.max_attempts  # one Customer batch
    job = job_row(dsn, tenant)
    assert job["status"] == "failed"
    [customer] = [b for b in batches(dsn, tenant, "job") if b["record_type_id"] == CUSTOMER]
    assert (customer["status"], customer["attempts"]) == ("failed", 2)
    assert customer["last_error"] == EXIT_WITHOUT_COMPLETION
    assert "see the worker contract" in customer["last_error"]
    assert {
        b["status"] for b in batches(dsn, tenant, "job") if b["record_type_id"] != CUSTOMER
    } == {"pending"}
    with tenant_conn(dsn, tenant) as conn:
        assert conn.execute("SELECT count(*) AS n FROM customers").fetchone()["n"] == 0
        assert not verify_import(conn, "job", spec).ok


def test_a_completion_notice_for_a_running_batch_records_nothing(
    engine: Engine, dsn: str, tenant: str
) -> None:
    """What a forged NOTIFY (any role can send one) delivers: the batch's real id and current
    dispatch sequence. The listener only looks; the batch stays dispatched, its real worker then
    completes it with its rows, and the import completes with every row."""
    ds = stage(dsn, tenant, "job", orders=300)
    spec = small_spec(tenant)
    assert engine.submit("job", spec)
    [b] = engine.check("job", "start").dispatched
    for _ in range(3):
        res = engine.listener.on_completions("job", [b.batch_id])
        assert res.dispatched == [] and res.outcome == Outcome.IN_PROGRESS
    row = next(x for x in batches(dsn, tenant, "job") if x["batch_id"] == b.batch_id)
    assert (row["status"], row["attempts"]) == ("dispatched", 0)
    assert run_batch(WorkItem(dsn, tenant, "job", b.batch_id, b.dispatch_seq)).exit_code == 0
    r = drive(engine, dsn, tenant, "job")
    assert r.outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)


def test_the_database_refuses_a_completion_without_a_row_count(
    engine: Engine, dsn: str, tenant: str
) -> None:
    stage(dsn, tenant, "job", orders=50)
    assert engine.submit("job", small_spec(tenant))
    [b] = engine.check("job", "start").dispatched
    with tenant_conn(dsn, tenant) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "UPDATE wave_batches SET status = 'completed' WHERE job_id = 'job' AND batch_id = %s",
            (b.batch_id,),
        )
    row = next(x for x in batches(dsn, tenant, "job") if x["batch_id"] == b.batch_id)
    assert row["status"] == "dispatched"


# -- no staging rows ---------------------------------------------------------------------------
def test_import_id_with_no_staging_rows_is_invalid_until_rows_are_loaded(
    engine: Engine, dsn: str, tenant: str
) -> None:
    stage(dsn, tenant, "other-import", orders=100)  # rows exist, but for another import id
    spec = small_spec(tenant)
    assert engine.submit("job", spec)
    for _ in range(3):
        res = engine.check("job", "timer")
        assert res.outcome == Outcome.INVALID
        assert res.dispatched == []
    job = job_row(dsn, tenant)
    print(f"no staging rows: {job['status']} / {job['status_code']}: {job['status_reason']}")
    assert (job["status"], job["status_code"]) == ("invalid", "NoStagingRecords")
    assert (
        "import id 'job'" in job["status_reason"] and f"tenant '{tenant}'" in job["status_reason"]
    )
    assert job["planned_at"] is None
    assert batches(dsn, tenant, "job") == []
    assert wave_rows(dsn, tenant) == {}
    assert [t["staged"] for t in job["staging_report"]["types"]] == [0, 0, 0]

    # The rows arrive: the next run plans and the import completes with every row.
    ds = stage(dsn, tenant, "job", orders=200)
    r = drive(engine, dsn, tenant, "job")
    assert r.outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)
    job = job_row(dsn, tenant)
    assert (job["status"], job["status_code"]) == ("completed", "")
    assert wave_rows(dsn, tenant) == {
        "Customer": (ds.customers, ds.customers, ds.customers, 0),
        "SalesOrder": (ds.orders, ds.orders, ds.orders, 0),
        "TransactionLine": (ds.lines, ds.lines, ds.lines, 0),
    }
    # the imported-rows metric counted each type's rows once, when the import completed
    for name, n in (("Customer", ds.customers), ("TransactionLine", ds.lines)):
        got = REGISTRY.get_sample_value(
            "importwaves_rows_imported_total", {"tenant": tenant, "record_type": name}
        )
        assert got == n, (name, got)


def test_run_local_reports_no_staging_records_and_exits_1(
    engine: Engine, dsn: str, tenant: str
) -> None:
    launcher = LocalLauncher(dsn)
    engine.launcher = launcher
    assert engine.submit("job", small_spec(tenant))
    stats = LocalRunner(engine, tick=0.2).run("job", timeout=30)
    assert stats.status == "invalid"
    assert stats.worker_runs == 0


# -- rows no batch can cover ----------------------------------------------------------------------
ORPHANS = """
INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload)
VALUES ('job', -13, 900001, NULL, '{"amount": "1.00"}'),
       ('job', -13, 900002, 777777, '{"amount": "2.00"}'),
       ('job', -13, 900003, 1, '{"amount": "3.00"}')
"""
# 900003 names parent 1, a staged SalesOrder, but of a parent type it does not belong to
ORPHAN_TYPE = "UPDATE staging_records SET parent_record_type_id = -2 WHERE record_id = 900003"
UNKNOWN_TYPE = """
INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload)
VALUES ('job', -99, 5, NULL, '{}'), ('job', -99, 6, NULL, '{}')
"""


def _stage_uncoverable(dsn: str, tenant: str, orders: int = 300) -> Any:
    ds = stage(dsn, tenant, "job", orders=orders)
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(ORPHANS)
        conn.execute(ORPHAN_TYPE)
        conn.execute(UNKNOWN_TYPE)
    return ds


def test_uncovered_rows_block_the_import_with_count_and_first_ids(
    engine: Engine, dsn: str, tenant: str
) -> None:
    _stage_uncoverable(dsn, tenant)
    assert engine.submit("job", small_spec(tenant))
    res = engine.check("job", "start")
    assert res.outcome == Outcome.INVALID and res.dispatched == []
    job = job_row(dsn, tenant)
    print(f"uncovered rows: {job['status_code']}: {job['status_reason']}")
    assert (job["status"], job["status_code"]) == ("invalid", "UncoveredStagingRows")
    reason = job["status_reason"]
    assert reason.startswith("5 staging row(s) of import id 'job'")
    assert "TransactionLine (-13): 3 row(s), parent_id null or no staged parent" in reason
    assert "first ids 900001, 900002, 900003" in reason
    assert "record type -99: 2 row(s), not in the spec (first ids 5, 6)" in reason
    assert "uncoveredRows: Skip" in reason
    assert batches(dsn, tenant, "job") == []
    # Nudges change nothing; it never completes.
    for _ in range(2):
        assert engine.check("job", "timer").outcome == Outcome.INVALID
    assert job_row(dsn, tenant)["status"] == "invalid"


def test_uncovered_rows_fixed_then_the_import_runs(engine: Engine, dsn: str, tenant: str) -> None:
    _stage_uncoverable(dsn, tenant, orders=200)
    spec = small_spec(tenant)
    assert engine.submit("job", spec)
    assert engine.check("job", "start").outcome == Outcome.INVALID
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "DELETE FROM staging_records WHERE record_id >= 900001 OR record_type_id = -99"
        )
    r = drive(engine, dsn, tenant, "job")
    assert r.outcome == Outcome.COMPLETED


def test_skip_completes_and_reports_the_skipped_rows(engine: Engine, dsn: str, tenant: str) -> None:
    ds = _stage_uncoverable(dsn, tenant)
    spec = small_spec(tenant, uncoveredRows="Skip")
    assert engine.submit("job", spec)
    r = drive(engine, dsn, tenant, "job")
    assert r.outcome == Outcome.COMPLETED, r.reason
    job = job_row(dsn, tenant)
    assert job["status"] == "completed"
    rows = wave_rows(dsn, tenant)
    print(f"skip: {rows}")
    assert rows["TransactionLine"] == (ds.lines + 3, ds.lines, ds.lines, 3)
    assert rows["Customer"] == (ds.customers, ds.customers, ds.customers, 0)
    with tenant_conn(dsn, tenant) as conn:  # what `importwaves status` shows
        report = job_report(conn, Flags(None, tenant), "job")
    assert report is not None
    assert report.rows == {
        "Customer": {"staged": ds.customers, "imported": ds.customers, "skipped": 0},
        "SalesOrder": {"staged": ds.orders, "imported": ds.orders, "skipped": 0},
        "TransactionLine": {"staged": ds.lines + 3, "imported": ds.lines, "skipped": 3},
        "recordType-99": {"staged": 2, "imported": 0, "skipped": 2},
    }
    unknown = [t for t in job["staging_report"]["types"] if t["recordTypeId"] == -99]
    assert unknown == [
        {
            "recordTypeId": -99,
            "name": None,
            "staged": 2,
            "uncovered": 2,
            "firstIds": [5, 6],
            "skipped": 2,
        }
    ]
    with tenant_conn(dsn, tenant) as conn:
        lines = conn.execute(
            "SELECT count(*) AS n FROM transaction_lines WHERE imported_job = 'job'"
        ).fetchone()["n"]
        assert lines == ds.lines
        assert (
            conn.execute(
                "SELECT count(*) AS n FROM transaction_lines WHERE id >= 900001"
            ).fetchone()["n"]
            == 0
        )


# -- staging changed under a running import --------------------------------------------------
def test_a_staging_row_deleted_after_planning_fails_its_batch_at_once(
    engine: Engine, dsn: str, tenant: str
) -> None:
    stage(dsn, tenant, "job", orders=300)  # 30 customers: one Customer batch of 50
    spec = small_spec(tenant, retries=3)
    assert engine.submit("job", spec)
    [b] = engine.check("job", "start").dispatched
    with tenant_conn(dsn, tenant) as conn:
        conn.execute("DELETE FROM staging_records WHERE record_type_id = -2 AND record_id = 7")
    wr = run_batch(WorkItem(dsn, tenant, "job", b.batch_id, b.dispatch_seq))
    assert wr.exit_code == 1
    row = next(x for x in batches(dsn, tenant, "job") if x["batch_id"] == b.batch_id)
    print(f"deleted staging row: {row['last_error']}")
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"] == (
        "non-retryable: BatchDataError: wrote 29 row(s), 30 planned: record(s) 7 no longer staged"
    )
    with tenant_conn(dsn, tenant) as conn:
        assert conn.execute("SELECT count(*) AS n FROM customers").fetchone()["n"] == 0
    assert engine.check("job", "timer").outcome == Outcome.FAILED


def test_rows_staged_after_planning_keep_the_import_from_completing(
    engine: Engine, dsn: str, tenant: str
) -> None:
    stage(dsn, tenant, "job", orders=200)
    spec = small_spec(tenant)
    assert engine.submit("job", spec)
    engine.check("job", "start")
    with tenant_conn(dsn, tenant) as conn:  # a late order, after its wave was cut into batches
        conn.execute(
            "INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload) "
            "VALUES ('job', %s, 10001, 1, '{\"amount\": \"9.99\"}')",
            (SALES_ORDER,),
        )
    r = drive(engine, dsn, tenant, "job")
    assert r.outcome == Outcome.FAILED
    job = job_row(dsn, tenant)
    print(f"late row: {job['status_code']}: {job['status_reason']}")
    assert (job["status"], job["status_code"]) == ("failed", "RowCountMismatch")
    assert (
        "SalesOrder (-30): 201 row(s) staged now, 200 planned + 0 skipped" in job["status_reason"]
    )
    # every batch did complete: only the rows tell
    assert {b["status"] for b in batches(dsn, tenant, "job")} == {"completed"}
    assert {b["record_type_id"] for b in batches(dsn, tenant, "job")} == {
        CUSTOMER,
        SALES_ORDER,
        LINE,
    }


def test_switching_an_invalid_import_to_skip_plans_it(
    engine: Engine, dsn: str, tenant: str
) -> None:
    """The import is unplanned while invalid, so `uncoveredRows` may still change (the ImportJob's
    spec edited after reading the condition): the next run plans it with the skip recorded."""
    ds = _stage_uncoverable(dsn, tenant, orders=100)
    assert engine.submit("job", small_spec(tenant))
    assert engine.check("job", "start").outcome == Outcome.INVALID
    assert not engine.submit("job", small_spec(tenant, uncoveredRows="Skip"))
    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    assert wave_rows(dsn, tenant)["TransactionLine"] == (ds.lines + 3, ds.lines, ds.lines, 3)
    assert job_row(dsn, tenant)["status_code"] == ""
