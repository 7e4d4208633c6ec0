"""Connections scale with databases and active work, not with tenants (db/pools.py, issue 16):
many tenant engines on one database share one pool; idle tenants hold no connection; closing
the engines leaves none; each tenant's statements run in its own schema."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from helpers import setup_job, wait_until
from importwaves.db import migrate
from importwaves.db.pools import APPLICATION_NAME, POOLS

pytestmark = pytest.mark.integration

TENANTS = 24


@pytest.fixture
def many_tenants(dsn: str, tenant: str) -> Iterator[list[str]]:
    names = [f"{tenant}_{i}" for i in range(TENANTS)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in names:
            migrate.up(conn, n)
    yield names
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(n)))


def engine_connections(dsn: str) -> int:
    """The engines' pooled connections the server has (pg_stat_activity)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (APPLICATION_NAME,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_many_tenants_share_one_pool_and_idle_ones_hold_nothing(engines, dsn, many_tenants) -> None:
    assert engine_connections(dsn) == 0
    made = [engines(schema=t, pool_size=4) for t in many_tenants]
    # engines exist, nothing runs: no connection at all (an idle tenant holds none)
    assert engine_connections(dsn) == 0
    busy = made[:6]
    for i, e in enumerate(busy):
        setup_job(e, f"job{i}", orders=100)
    errors: list[BaseException] = []

    def work(e, job: str) -> None:
        try:
            for _ in range(5):
                e.check(job)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(e, f"job{i}")) for i, e in enumerate(busy)]
    for t in threads:
        t.start()
    peak = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, engine_connections(dsn))
    for t in threads:
        t.join()
    assert not errors
    # six busy tenants and 18 idle ones of one database: at most the one pool's size
    assert 1 <= peak <= 4
    assert POOLS.count() == 1
    # each tenant's runs saw its own schema through the shared connections
    for e in busy:
        with e.pool.connection() as conn:
            row = conn.execute("SELECT current_schema() AS s").fetchone()
            assert row is not None and row["s"] == e.tenant
            assert conn.execute("SELECT count(*) AS n FROM import_jobs").fetchone() == {"n": 1}
    for e in made:
        e.close()
    assert POOLS.count() == 0

    # the server drops a closed connection's backend a moment after the client hangs up
    wait_until(lambda: engine_connections(dsn) == 0, timeout=10)
