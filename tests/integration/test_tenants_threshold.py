"""Two tenants with the same job id never collide; a threshold below 100 starts derived batches
early but never imports a line before its parent."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from helpers import (
    DERIVED_READY,
    LINE,
    MONITORING,
    SALES_ORDER,
    assert_complete,
    batches,
    drive,
    expected_batches,
    flag_ttl,
    job_status,
    redis_client,
    rows_by_type,
    setup_job,
    waves,
)
from importwaves.db import migrate
from importwaves.engine.model import Outcome, parents_needed

pytestmark = pytest.mark.integration


@pytest.fixture
def tenant2(dsn: str, tenant: str) -> Iterator[str]:
    name = f"{tenant}_b"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.up(conn, name)
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def test_two_tenants_with_the_same_job_id_do_not_collide(
    engines, dsn, tenant, tenant2, redis_url
) -> None:
    e1, e2 = engines(), engines(schema=tenant2)
    ds1, spec1 = setup_job(e1, "job", orders=300)
    ds2, spec2 = setup_job(e2, "job", orders=500, parallelism=2)
    assert expected_batches(ds1, spec1) != expected_batches(ds2, spec2)

    # Tenant 2 gets to its derived wave and stops there; tenant 1 runs to completion meanwhile.
    r2 = drive(e2, dsn, tenant2, "job", run_if=lambda b: b.record_type_id != LINE)
    assert r2.held and all(b.record_type_id == LINE for b in r2.held)
    assert drive(e1, dsn, tenant, "job").outcome == Outcome.COMPLETED

    assert job_status(dsn, tenant, "job") == "completed"
    assert job_status(dsn, tenant2, "job") == "running"
    # Redis: tenant 1's completion cleared only its own monitoring flag.
    assert flag_ttl(redis_url, tenant, "job", MONITORING) == -2
    assert flag_ttl(redis_url, tenant2, "job", MONITORING) > 0
    assert flag_ttl(redis_url, tenant2, "job", DERIVED_READY) > 0
    keys = redis_client(redis_url).keys("importwaves:*")
    assert keys and all(
        k.startswith((f"importwaves:{tenant}:job:", f"importwaves:{tenant2}:job:")) for k in keys
    )

    assert drive(e2, dsn, tenant2, "job", include=r2.held).outcome == Outcome.COMPLETED
    # DB: each schema holds exactly its own import.
    assert dict(rows_by_type(dsn, tenant, "job")) == expected_batches(ds1, spec1)
    assert dict(rows_by_type(dsn, tenant2, "job")) == expected_batches(ds2, spec2)
    assert_complete(e1, "job", ds1, spec1)
    assert_complete(e2, "job", ds2, spec2)
    assert flag_ttl(redis_url, tenant2, "job", MONITORING) == -2


@pytest.mark.parametrize("threshold", [50, 100])
def test_threshold_controls_when_derived_start_and_parents_always_come_first(
    engine, dsn, tenant, redis_url, threshold: int
) -> None:
    ds, spec = setup_job(engine, "job", orders=1000, completionThreshold=threshold, parallelism=8)
    r = drive(engine, dsn, tenant, "job")
    assert r.outcome == Outcome.COMPLETED
    rows = batches(dsn, tenant, "job")
    parents = {b["batch_id"]: b for b in rows if b["record_type_id"] == SALES_ORDER}
    lines = [b for b in rows if b["record_type_id"] == LINE]
    assert len(parents) == 10
    first_line = min(b["dispatched_at"] for b in lines)
    last_parent = max(b["completed_at"] for b in parents.values())
    parents_done_then = sum(1 for b in parents.values() if b["completed_at"] <= first_line)

    # never below the threshold
    assert parents_done_then >= parents_needed(threshold, len(parents))
    if threshold < 100:
        # derived work started while parent batches were still running
        assert first_line < last_parent
        assert parents_done_then < len(parents)
    else:
        assert first_line > last_parent
    # every derived batch ran after its own parent batch completed
    for b in lines:
        assert b["dispatched_at"] > parents[b["parent_batch_id"]]["completed_at"]
    assert waves(dsn, tenant, "job")[LINE]["dispatch_lag_seconds"] is not None
    # all rows, none orphaned, no line imported before its parent (verify_import checks)
    assert_complete(engine, "job", ds, spec)
