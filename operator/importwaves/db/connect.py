"""Tenant-scoped PostgreSQL connections: every statement runs inside the tenant's schema."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

Conn = psycopg.Connection[dict[str, Any]]


def set_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """Point search_path at the tenant schema; the name is quoted as an identifier, never text."""
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))


def connect(dsn: str, schema: str, *, autocommit: bool = False, timeout: int = 10) -> Conn:
    """One connection with search_path set to `schema` and dict rows."""
    conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row, connect_timeout=timeout)
    try:
        set_schema(conn, schema)
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
    return conn


def make_pool(
    dsn: str, schema: str, *, min_size: int = 1, max_size: int = 4, timeout: float = 10.0
) -> ConnectionPool[Conn]:
    """A connection pool whose connections all live in `schema`. `timeout`: how long a caller
    waits for a connection before an OperationalError (PoolTimeout); with the database down
    that is how long a coordinator run waits before its caller (the operator's reconcile, the
    runner) reports the outage and backs off, so it stays short (psycopg_pool's default, 30 s,
    hid outages shorter than that and held the operator's handler threads meanwhile)."""

    def configure(conn: Conn) -> None:
        conn.autocommit = True
        set_schema(conn, schema)
        conn.autocommit = False

    return ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "connect_timeout": 10},
        configure=configure,
        # A pooled connection can die while idle (a database restart, pg_terminate_backend, an
        # idle timeout): check it when it is handed out, so a dead one is replaced instead of
        # failing the next coordinator run.
        check=ConnectionPool.check_connection,
        connection_class=psycopg.Connection[dict[str, Any]],
        timeout=timeout,
        open=True,
        name=f"importwaves:{schema}",
    )


@contextmanager
def transaction(pool: ConnectionPool[Conn]) -> Iterator[Conn]:
    """Borrow a connection and run the block in one transaction (commit on success)."""
    with pool.connection() as conn, conn.transaction():
        yield conn
