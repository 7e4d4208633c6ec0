"""Tenant-scoped PostgreSQL connections: every statement runs inside the tenant's schema."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from importwaves.db.options import DEFAULT, ConnOptions

Conn = psycopg.Connection[dict[str, Any]]


def set_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """Point search_path at the tenant schema; the name is quoted as an identifier, never text."""
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))


def connect(
    dsn: str,
    schema: str,
    *,
    autocommit: bool = False,
    timeout: int | None = None,
    opts: ConnOptions = DEFAULT,
) -> Conn:
    """One connection with search_path set to `schema` and dict rows, with the timeouts and
    keepalives of `opts` (db/options.py)."""
    conn = psycopg.connect(
        dsn, autocommit=True, row_factory=dict_row, **opts.kwargs(connect_timeout=timeout)
    )
    try:
        set_schema(conn, schema)
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
    return conn


def make_pool(
    dsn: str,
    schema: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    timeout: float = 10.0,
    opts: ConnOptions = DEFAULT,
) -> ConnectionPool[Conn]:
    """A connection pool whose connections all live in `schema`. `timeout`: how long a caller
    waits for a connection before an OperationalError (PoolTimeout); with the database down
    that is how long a coordinator run waits before its caller (the operator's reconcile, the
    runner) reports the outage and backs off, so it stays short (psycopg_pool's default, 30 s,
    hid outages shorter than that and held the operator's handler threads meanwhile). Every
    connection sets the timeouts and keepalives of `opts`."""

    def configure(conn: Conn) -> None:
        _watch_fatal(conn)
        conn.autocommit = True
        set_schema(conn, schema)
        conn.autocommit = False
        _note_return(conn)  # just connected: as fresh as one just returned

    return ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, **opts.kwargs()},
        configure=configure,
        # A pooled connection can die while idle (a database restart, pg_terminate_backend, an
        # idle timeout): check it when it is handed out, so a dead one is replaced instead of
        # failing the next coordinator run (check_pooled: without a round trip when it can).
        check=check_pooled,
        reset=_note_return,
        connection_class=psycopg.Connection[dict[str, Any]],
        timeout=timeout,
        open=True,
        name=f"importwaves:{schema}",
    )


#: A pooled connection idle for longer than this gets a real round trip before it is handed out.
PING_AFTER_IDLE_S = 30.0
_returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
    weakref.WeakKeyDictionary()
)


_doomed: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


def _watch_fatal(conn: psycopg.Connection[Any]) -> None:
    """Mark `conn` dead when the server sends it a FATAL or PANIC message."""
    ref = weakref.ref(conn)

    def handler(diag: psycopg.errors.Diagnostic) -> None:
        c = ref()
        if c is not None and diag.severity_nonlocalized in ("FATAL", "PANIC"):
            _doomed.add(c)

    conn.add_notice_handler(handler)


def _note_return(conn: psycopg.Connection[Any]) -> None:
    """The pool's `reset` callback: when the connection came back, healthy and idle."""
    _returned_at[conn] = time.monotonic()


#: the callbacks a pool of tenant connections uses (db/pools.py shares them)
watch_fatal = _watch_fatal
note_return = _note_return


def check_pooled(conn: psycopg.Connection[Any]) -> None:
    """The pool's `check` callback: raise if a connection about to be handed out is dead.

    A connection the server closed while it sat idle (a restart, pg_terminate_backend, an idle
    timeout) has its FATAL message and end-of-file waiting on the socket: reading what is there,
    without waiting (libpq sockets are non-blocking), finds it with no round trip. Only one idle
    for longer than PING_AFTER_IDLE_S, which may have died silently (a dropped network path
    sends no end-of-file), is pinged. psycopg_pool's own check pings every time: one extra round
    trip per coordinator run, a quarter of the derived dispatch lag (bench row 1)."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the pooled connection is closed")
    pgconn = conn.pgconn
    # The server says FATAL before it hangs up (terminate, shutdown): libpq takes an error on an
    # idle connection for a notice, and _watch_fatal marks the connection. Reading past it finds
    # the end of file too when it has arrived (consume_input then raises).
    for _ in range(3):
        pgconn.consume_input()
    pgconn.is_busy()  # parses what was read: a FATAL reaches _watch_fatal
    if conn in _doomed:
        raise psycopg.OperationalError("the server closed the pooled connection while it was idle")
    if pgconn.status != pq.ConnStatus.OK or pgconn.transaction_status != pq.TransactionStatus.IDLE:
        raise psycopg.OperationalError("the pooled connection is not idle and healthy")
    returned = _returned_at.get(conn)
    if returned is None or time.monotonic() - returned > PING_AFTER_IDLE_S:
        ConnectionPool.check_connection(conn)


@contextmanager
def transaction(pool: ConnectionPool[Conn]) -> Iterator[Conn]:
    """Borrow a connection and run the block in one transaction (commit on success)."""
    with pool.connection() as conn, conn.transaction():
        yield conn
