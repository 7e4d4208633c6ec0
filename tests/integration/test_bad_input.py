"""Bad input that reaches the database: hostile tenant (schema) names and job ids, and malformed
staging rows.

Nothing is executed as SQL text: a tenant name is always an identifier (`psycopg.sql.Identifier`)
and every value a parameter. The spec's tenant pattern already refuses such names
(tests/unit/test_spec_bounds.py); these tests take that first wall away and show the second one
holds: the exact schema is created, the tables land in it, no other schema changes, and a whole
import runs in it.

Malformed staging rows fail their own batch at once (no retry: the data fails every attempt
alike), with the record id in the batch's error; every
other batch goes on (in its wave, and derived batches of completed parents under a threshold);
the import ends `failed`, never completed, and the runner says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.types.json import Jsonb

from helpers import (
    CUSTOMER,
    LINE,
    SALES_ORDER,
    TrackingLauncher,
    assert_complete,
    batches,
    drive,
    small_spec,
    stage,
    tenant_conn,
)
from importwaves.db import migrate
from importwaves.db.queries import Q
from importwaves.engine.app import Engine
from importwaves.engine.model import Outcome
from importwaves.spec import ImportSpec
from importwaves.verify import verify_import

pytestmark = pytest.mark.integration

HOSTILE_SCHEMAS = ['x"; DROP SCHEMA public CASCADE; --', "Robert'); DROP TABLE import_jobs;--"]
HOSTILE_JOB = "job'); DELETE FROM wave_batches; --\""
TENANT_TABLES = {
    "schema_migrations",
    "import_jobs",
    "wave_coordination",
    "wave_batches",
    "staging_records",
    "customers",
    "transactions",
    "transaction_lines",
}
_CATALOG = """
SELECT n.nspname AS schema, c.relname AS name, c.relkind AS kind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
"""


def catalog(dsn: str, exclude: str) -> set[tuple[str, str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(_CATALOG).fetchall()
        schemas = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace").fetchall()}
    return {(s, n, k) for s, n, k in rows if s != exclude} | {("schema", s, "") for s in schemas}


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.parametrize("schema", HOSTILE_SCHEMAS)
def test_hostile_tenant_name_neither_breaks_nor_escapes_its_schema(
    dsn: str, tenant: str, redis_url: str, schema: str
) -> None:
    # A neighbour tenant with data, which must come out untouched.
    neighbour = stage(dsn, tenant, "job", orders=50)
    before = catalog(dsn, exclude=schema)
    assert ("schema", "public", "") in before
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            applied = migrate.up(conn, schema)
            assert [m.version for m in applied] == [m.version for m in migrate.migrations()]
            assert migrate.applied(conn, schema) == [m.version for m in migrate.migrations()]
            got = conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = %s", (schema,)
            ).fetchall()
            assert got == [(schema,)], "the schema is not exactly the tenant name"
            tables = {
                r[0]
                for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                    (schema,),
                ).fetchall()
            }
        assert tables == TENANT_TABLES
        after = catalog(dsn, exclude=schema)
        assert after - before == {("schema", schema, "")}, "something outside the schema changed"
        assert before - after == set(), "something outside the schema vanished"

        # A whole import in it, the job id hostile too. Engine.submit refuses a spec whose
        # tenant is not the engine's, and the spec refuses such a tenant: that first wall is
        # taken away by registering the job row directly (the spec's tenant is then only a
        # label; the schema every connection and worker uses is the hostile name).
        ds = stage(dsn, schema, HOSTILE_JOB, orders=300)
        spec = small_spec("walled_off")
        with tenant_conn(dsn, schema) as conn:
            conn.execute(Q("job_insert"), {"job_id": HOSTILE_JOB, "spec": Jsonb(spec.model_dump())})
        with Engine(
            dsn, schema, redis_url=redis_url, launcher=TrackingLauncher(dsn, schema)
        ) as engine:
            r = drive(engine, dsn, schema, HOSTILE_JOB)
            assert r.outcome == Outcome.COMPLETED, r.reason
            assert_complete(engine, HOSTILE_JOB, ds, spec)
            report = engine.recovery.reconcile(HOSTILE_JOB)
            assert report.result is not None and report.result.outcome == Outcome.COMPLETED
        assert catalog(dsn, exclude=schema) == after
        with tenant_conn(dsn, tenant) as conn:  # the neighbour's data is all there
            n = conn.execute(
                "SELECT count(*) AS n FROM staging_records WHERE job_id = 'job'"
            ).fetchone()
            assert n["n"] == neighbour.customers + neighbour.orders + neighbour.lines

        # migrate down removes exactly what up created
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert len(migrate.down(conn, schema)) == len(migrate.migrations())
            left = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            ).fetchone()
            assert left == (0,)
        assert catalog(dsn, exclude=schema) == after
    finally:
        drop_schema(dsn, schema)


def test_hostile_tenant_through_the_cli(dsn: str) -> None:
    """`importwaves migrate up|status|down --tenant <hostile>`: refused by the spec's tenant rule
    in one line (exit 2) before anything is created (the library above holds without that wall;
    the CLI's whole table is tests/integration/test_cli_bad_input.py)."""
    before = catalog(dsn, exclude="")
    exe = [sys.executable, "-m", "importwaves.cli"]
    for schema in HOSTILE_SCHEMAS:
        for direction in ("up", "status", "down"):
            r = subprocess.run(
                [*exe, "migrate", direction, "--dsn", dsn, "--tenant", schema],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert r.returncode == 2, r.stderr
            assert len(r.stderr.splitlines()) == 1, r.stderr
            assert "is not a tenant name" in r.stderr, r.stderr
    assert catalog(dsn, exclude="") == before


# -- malformed staging rows ------------------------------------------------------------------------
#: (record type, record id, breaking SQL, the problem its batch's error must name)
CUSTOMER_ROWS = [
    (
        CUSTOMER,
        7,
        "UPDATE staging_records SET payload = '\"oops\"'::jsonb "
        "WHERE record_type_id = -2 AND record_id = 7",
        "record 7: payload is not an object",
    ),
    (
        CUSTOMER,
        120,
        'UPDATE staging_records SET payload = \'{"name": ""}\'::jsonb '
        "WHERE record_type_id = -2 AND record_id = 120",
        "record 120: missing name",
    ),
]
ORDER_AND_LINE_ROWS = [
    (
        SALES_ORDER,
        150,
        "UPDATE staging_records SET payload = payload - 'amount' "
        "WHERE record_type_id = -30 AND record_id = 150",
        "record 150: missing amount",
    ),
    (
        SALES_ORDER,
        420,
        "UPDATE staging_records SET parent_id = 999999 WHERE record_type_id = -30 "
        "AND record_id = 420",
        "record 420: parent customer 999999 not imported",
    ),
    (
        LINE,
        30,
        'UPDATE staging_records SET payload = payload || \'{"amount": "1e400"}\' '
        "WHERE record_type_id = -13 AND record_id = 30",
        "record 30: amount is not a number",
    ),
    (
        LINE,
        31,
        "UPDATE staging_records SET payload = '[1, 2]'::jsonb "
        "WHERE record_type_id = -13 AND record_id = 31",
        "record 31: payload is not an object",
    ),
]


def _break(dsn: str, tenant: str, rows: list[tuple[int, int, str, str]]) -> None:
    with tenant_conn(dsn, tenant) as conn:
        for _, _, breaking, _ in rows:
            assert conn.execute(breaking).rowcount == 1


def _batch_of(dsn: str, tenant: str, rid: int, record_id: int) -> dict[str, Any]:
    """The batch whose IN() list holds `record_id` (its parent order's, for a line)."""
    with tenant_conn(dsn, tenant) as conn:
        key = record_id
        if rid == LINE:
            key = conn.execute(
                "SELECT parent_id FROM staging_records WHERE record_type_id = -13 "
                "AND record_id = %s",
                (record_id,),
            ).fetchone()["parent_id"]
        return conn.execute(
            "SELECT batch_id, status, attempts, last_error FROM wave_batches "
            "WHERE job_id = 'job' AND record_type_id = %s AND chunk_ids_json @> %s::jsonb",
            (rid, f"[{key}]"),
        ).fetchone()


@pytest.mark.parametrize(
    ("bad", "threshold"),
    [(CUSTOMER_ROWS, 100), (ORDER_AND_LINE_ROWS, 100), (ORDER_AND_LINE_ROWS, 50)],
    ids=["customers", "orders-threshold-100", "orders-and-lines-threshold-50"],
)
def test_malformed_rows_fail_their_batch_others_go_on_and_the_import_fails(
    engine, dsn: str, tenant: str, redis_url: str, bad: list[Any], threshold: int
) -> None:
    stage(dsn, tenant, "job", orders=1500)  # 150 customers: 3 batches; 15 order batches
    spec = small_spec(tenant, retries=1, completionThreshold=threshold)
    _break(dsn, tenant, bad)
    assert engine.submit("job", spec)
    r = drive(engine, dsn, tenant, "job", threads=3)
    assert r.outcome == Outcome.FAILED, r.reason
    assert not r.stalled

    rows = batches(dsn, tenant, "job")
    failed = {b["batch_id"] for b in rows if b["status"] == "failed"}
    expect_failed = set()
    for rid, record_id, _, problem in bad:
        if rid == LINE and threshold == 100:
            continue  # its parents never all completed: the lines never ran
        b = _batch_of(dsn, tenant, rid, record_id)
        expect_failed.add(b["batch_id"])
        assert b["status"] == "failed"
        # bad staging data fails every attempt alike: failed at its first, not retried
        assert b["attempts"] == 1 < spec.max_attempts == 2
        assert b["last_error"].startswith("non-retryable: BatchDataError"), b["last_error"]
        assert problem in b["last_error"], b["last_error"]
    assert failed == expect_failed
    # Other batches went on: every other batch of a wave that ran completed.
    ran = {b["record_type_id"] for b in rows if b["status"] in ("completed", "failed")}
    for b in rows:
        if b["record_type_id"] in ran and b["batch_id"] not in failed:
            if b["record_type_id"] == LINE and b["status"] == "pending":
                continue  # a derived batch whose gate (threshold 100) never opened
            assert b["status"] == "completed", b
    if bad is CUSTOMER_ROWS:  # parents first: no order was dispatched
        assert {b["status"] for b in rows if b["record_type_id"] == SALES_ORDER} == {"pending"}
        assert ran == {CUSTOMER}
    elif threshold == 50:  # the derived gate opened at half the parents: lines ran too
        done = [b for b in rows if b["record_type_id"] == LINE and b["status"] == "completed"]
        assert done, "no derived batch of a completed parent ran"

    # Never a silent success: the job, the verification and the runner all say failed.
    with tenant_conn(dsn, tenant) as conn:
        job = conn.execute(Q("job_get"), {"job_id": "job"}).fetchone()
        v = verify_import(conn, "job", spec)
        lines = conn.execute(
            "SELECT count(*) AS n FROM transaction_lines WHERE id = ANY(%s)",
            ([rid for t, rid, _, _ in bad if t == LINE],),
        ).fetchone()["n"]
    assert job["status"] == "failed"
    assert "failed after their last attempt" in job["status_reason"]
    assert not v.ok
    assert {n for n, ok, _ in v.checks if not ok} >= {"no batch failed", "job completed"}
    assert lines == 0, "a line of a failed batch was imported"
    # a nudge of a failed job changes nothing
    assert engine.check("job", "timer").outcome == Outcome.FAILED


def test_run_local_exits_non_zero_on_a_malformed_row(dsn: str, tenant: str, tmp_path) -> None:
    """The same with the real runner and worker processes: `importwaves run-local` ends
    `failed`, exit code 1, and `importwaves status` names the bad record."""
    stage(dsn, tenant, "job", orders=400)
    _break(dsn, tenant, ORDER_AND_LINE_ROWS[:1])
    spec = small_spec(tenant, retries=0, parallelism=3)
    manifest = tmp_path / "importjob.yaml"
    manifest.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    env = {**os.environ, "IMPORTWAVES_LOG_LEVEL": "WARNING"}
    exe = [sys.executable, "-m", "importwaves.cli"]
    r = subprocess.run(
        [*exe, "run-local", "job", "-f", str(manifest), "--dsn", dsn, "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "job: failed" in r.stdout
    s = subprocess.run(
        [*exe, "status", "job", "--tenant", tenant, "--dsn", dsn, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert s.returncode == 0, s.stderr
    assert "record 150: missing amount" in s.stdout
    assert ImportSpec.model_validate(spec.model_dump(mode="json")) == spec
