"""The pool's hand-out check (db/connect.check_pooled) on the real server: a connection the
server closed while it sat idle is never handed out, a fresh healthy one costs no round trip,
and one idle for long gets a real ping."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from helpers import tenant_conn
from importwaves.db import connect as dbconnect

pytestmark = pytest.mark.integration


@pytest.fixture
def pool(dsn: str, tenant: str) -> Iterator[ConnectionPool[dbconnect.Conn]]:
    p = dbconnect.make_pool(dsn, tenant, min_size=1, max_size=1)
    try:
        yield p
    finally:
        p.close()


def backend_pid(pool: ConnectionPool[dbconnect.Conn]) -> int:
    with pool.connection() as conn:
        return int(conn.info.backend_pid)


def pings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the real round-trip checks (psycopg_pool's own check_connection)."""
    calls: list[int] = []
    real = ConnectionPool.check_connection

    def counting(conn: Any) -> None:
        calls.append(1)
        real(conn)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(counting))
    return calls


def test_a_connection_killed_while_idle_is_replaced_without_a_ping(
    pool: ConnectionPool[dbconnect.Conn], dsn: str, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = pings(monkeypatch)
    old = backend_pid(pool)
    with tenant_conn(dsn, tenant) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 5000) AS ok", (old,)).fetchone()["ok"]
    with pool.connection() as conn:
        row = conn.execute("SELECT pg_backend_pid() AS pid, current_schema() AS s").fetchone()
    assert row is not None
    assert row["pid"] != old  # the dead one was dropped, a new one connected
    assert row["s"] == tenant  # in the tenant's schema, like every pooled connection
    assert calls == []  # found dead by reading its socket, not by a round trip


def test_a_fresh_healthy_connection_costs_no_round_trip(
    pool: ConnectionPool[dbconnect.Conn], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = pings(monkeypatch)
    first = backend_pid(pool)
    for _ in range(5):
        assert backend_pid(pool) == first
    assert calls == []


def test_a_connection_idle_for_long_is_pinged(
    pool: ConnectionPool[dbconnect.Conn], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = pings(monkeypatch)
    backend_pid(pool)
    monkeypatch.setattr(dbconnect, "PING_AFTER_IDLE_S", 0.0)
    backend_pid(pool)
    assert calls == [1]


def test_check_refuses_a_closed_or_busy_connection(dsn: str, tenant: str) -> None:
    conn = dbconnect.connect(dsn, tenant)
    try:
        conn.execute("SELECT 1")  # a transaction is open (not autocommit)
        with pytest.raises(psycopg.OperationalError, match="not idle"):
            dbconnect.check_pooled(conn)
        conn.rollback()
        dbconnect.check_pooled(conn)  # idle again, never handed back: pinged, passes
    finally:
        conn.close()
    with pytest.raises(psycopg.OperationalError, match="closed"):
        dbconnect.check_pooled(conn)
