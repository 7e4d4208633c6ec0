"""Connection pools per database, shared by its tenants (issue 16).

A pool per (database, tenant) made 1,000 tenant schemas in one database cost up to 4,000 pooled
connections against that server, most of them for tenants with nothing running. Here every
engine of one database borrows from ONE pool (`SharedPools.get`): its size is the database's,
not the tenant's, and a tenant with nothing running holds no connection. A connection remembers
the schema it last served; it is pointed at the borrowing tenant's schema (`SET search_path`,
one round trip) only when that differs, so an import that runs alone pays nothing.

A pool lives while an engine uses it (reference counted) and closes when the last one is
closed (an evicted engine, an import finished): at rest, a database holds no pooled connection.
Idle connections above `min_size` (0) are closed after `max_idle` seconds. A new engine of a
database whose pool is being closed waits for that close before opening the next pool, so the
two never hold connections at the same instant.

The operator also migrates a new tenant through this pool (`TenantPool.connection` with
`connect_errors=True`): the pool connects in its own threads, so a connection that the server
refuses would only show as a PoolTimeout after the pool's timeout; the pool remembers what its
last attempt said, and that waiter gets the server's own error (`role "x" does not exist`) as
soon as an attempt made while it waits failed.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Self

import psycopg
from psycopg import pq
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from importwaves.db.connect import Conn, check_pooled, note_return, set_schema, watch_fatal
from importwaves.db.options import DEFAULT, ConnOptions

#: Seconds an idle pooled connection is kept before the pool closes it.
MAX_IDLE_S = 60.0

#: pg_stat_activity.application_name of the engines' pooled connections
APPLICATION_NAME = "importwaves-engine"

#: Seconds between looks at the pool's connection attempts while waiting with connect_errors.
REPORT_POLL_S = 0.1
#: Longest wait for a closing pool of the same database before opening the next one (its
#: close waits for its worker threads, at most 5 s by psycopg_pool's default).
CLOSE_WAIT_S = 10.0

#: The schema each pooled connection's search_path points at (None: not set yet).
_schema_of: weakref.WeakKeyDictionary[Conn, str] = weakref.WeakKeyDictionary()


class ConnectAttempts:
    """What a pool's connection attempts (made in its worker threads) said last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._error: psycopg.Error | None = None
        self._failed_at = 0.0

    def failed(self, exc: psycopg.Error) -> None:
        with self._lock:
            self._error, self._failed_at = exc, time.monotonic()

    def succeeded(self) -> None:
        with self._lock:
            self._error = None

    def failing(self, since: float = 0.0) -> psycopg.Error | None:
        """The last attempt's error if it failed (at or after `since`) and none succeeded
        after it; a copy, so that each waiter raises its own."""
        with self._lock:
            exc = self._error if self._error is not None and self._failed_at >= since else None
        return copy.copy(exc) if exc is not None else None


@dataclass
class _Shared:
    pool: ConnectionPool[Conn]
    users: int
    attempts: ConnectAttempts


class TenantPool:
    """One tenant's handle on its database's shared pool: `connection()` as ConnectionPool's."""

    def __init__(self, registry: SharedPools, key: tuple[str, str], schema: str) -> None:
        self._registry = registry
        self._key = key
        shared = registry._pools[key]
        self._pool = shared.pool
        self._attempts = shared.attempts
        self.schema = schema
        self._closed = False

    @contextmanager
    def connection(
        self, timeout: float | None = None, *, connect_errors: bool = False
    ) -> Iterator[Conn]:
        """A connection of the shared pool, in this tenant's schema, for the block (committed
        or rolled back at its end, as ConnectionPool.connection). `connect_errors`: raise the
        error of the pool's connection attempt (what the server said) as soon as one made while
        waiting failed, instead of a PoolTimeout after `timeout` (used where the kind of
        problem is reported: the operator's migration of a new tenant)."""
        if not connect_errors:
            with self._pool.connection(timeout) as conn, self._serving(conn):
                yield conn
            return
        conn = self._getconn_reporting(timeout)
        try:
            with conn, self._serving(conn):
                yield conn
        finally:
            self._pool.putconn(conn)

    @contextmanager
    def _serving(self, conn: Conn) -> Iterator[None]:
        if _schema_of.get(conn) != self.schema:
            conn.autocommit = True  # idle: no round trip to switch, the SET is not undone
            try:
                set_schema(conn, self.schema)
            finally:
                conn.autocommit = False
            _schema_of[conn] = self.schema
        try:
            yield
        finally:
            if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                # a user that switched to autocommit (a migration) gives it back as it found it
                with suppress(psycopg.Error):
                    conn.autocommit = False
            # stamped here, not by the pool's `reset` callback: a pool with one returns
            # connections through its worker threads, and one returned that way just before
            # the pool closes is put back after close() took the pool's list, never closed
            note_return(conn)

    def _getconn_reporting(self, timeout: float | None) -> Conn:
        start = time.monotonic()
        deadline = start + (self._pool.timeout if timeout is None else timeout)
        while True:
            try:
                return self._pool.getconn(max(0.0, min(deadline - time.monotonic(), REPORT_POLL_S)))
            except PoolTimeout:
                failed = self._attempts.failing(since=start)
                if failed is None and time.monotonic() >= deadline:
                    failed = self._attempts.failing()
                    if failed is None:
                        raise
                if failed is not None:
                    raise failed from None

    def close(self) -> None:
        """This engine no longer needs the pool (the last user's close closes it)."""
        if not self._closed:
            self._closed = True
            self._registry._release(self._key)

    @property
    def closed(self) -> bool:
        return self._closed


class SharedPools:
    """The process's pools, one per (database DSN, connection options)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dicts; pools open and close outside it
        self._pools: dict[tuple[str, str], _Shared] = {}
        #: pools being closed (their last user left), set once closed
        self._closing: dict[tuple[str, str], threading.Event] = {}

    def get(
        self,
        dsn: str,
        schema: str,
        *,
        max_size: int = 4,
        timeout: float = 10.0,
        opts: ConnOptions = DEFAULT,
    ) -> TenantPool:
        """A handle for `schema` on the pool of `dsn` (created on first use). `max_size` is the
        database's pool size (the first engine's setting makes the pool)."""
        key = (hashlib.sha256(dsn.encode()).hexdigest(), repr(opts))
        while True:
            with self._lock:
                closing = self._closing.get(key)
                shared = self._pools.get(key)
                if closing is None and shared is not None:
                    shared.users += 1
                    return TenantPool(self, key, schema)
            if closing is not None:
                # the database's previous pool is closing: its connections go first
                closing.wait(CLOSE_WAIT_S)
                continue
            attempts = ConnectAttempts()
            fresh = _open(dsn, max_size, timeout, opts, attempts)
            handle: TenantPool | None = None
            with self._lock:
                shared = self._pools.get(key)
                if key not in self._closing:
                    if shared is None:  # no other thread made one meanwhile: this one serves
                        self._pools[key] = shared = _Shared(fresh, 0, attempts)
                    shared.users += 1
                    handle = TenantPool(self, key, schema)
            if handle is None or handle._pool is not fresh:
                fresh.close()  # unused (it never connected)
            if handle is not None:
                return handle

    def _release(self, key: tuple[str, str]) -> None:
        with self._lock:
            shared = self._pools.get(key)
            if shared is None:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            del self._pools[key]
            self._closing[key] = done = threading.Event()
        try:
            shared.pool.close()
        finally:
            with self._lock:
                if self._closing.get(key) is done:
                    del self._closing[key]
            done.set()

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's pools without closing them (their sockets
        are the parent's; closing them here would end the parent's sessions)."""
        self._lock = threading.Lock()
        self._pools = {}
        self._closing = {}

    def count(self) -> int:
        with self._lock:
            return len(self._pools)


def _recording(attempts: ConnectAttempts) -> type[Conn]:
    """The pool's connection class: a psycopg connection whose `connect` tells `attempts` how
    it went (the pool connects in its worker threads and only logs a failure)."""

    class Recording(psycopg.Connection[dict[str, Any]]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            try:
                conn = super().connect(conninfo, **kwargs)
            except psycopg.Error as exc:
                attempts.failed(exc)
                raise
            attempts.succeeded()
            return conn

    return Recording


def _open(
    dsn: str, max_size: int, timeout: float, opts: ConnOptions, attempts: ConnectAttempts
) -> ConnectionPool[Conn]:
    def configure(conn: Conn) -> None:
        watch_fatal(conn)
        conn.autocommit = False
        note_return(conn)

    return ConnectionPool(
        dsn,
        min_size=0,
        max_size=max_size,
        max_idle=MAX_IDLE_S,
        kwargs={"row_factory": dict_row, "application_name": APPLICATION_NAME, **opts.kwargs()},
        configure=configure,
        check=check_pooled,
        connection_class=_recording(attempts),
        timeout=timeout,
        open=True,
        name="importwaves:shared",
    )


#: The process-wide registry every Engine borrows from.
POOLS = SharedPools()
os.register_at_fork(after_in_child=POOLS._after_fork)
