"""Connection pools per database, shared by its tenants (issue 16).

A pool per (database, tenant) made 1,000 tenant schemas in one database cost up to 4,000 pooled
connections against that server, most of them for tenants with nothing running. Here every
engine of one database borrows from ONE pool (`SharedPools.get`): its size is the database's,
not the tenant's, and a tenant with nothing running holds no connection. A connection remembers
the schema it last served; it is pointed at the borrowing tenant's schema (`SET search_path`,
one round trip) only when that differs, so an import that runs alone pays nothing.

A pool lives while an engine uses it (reference counted) and closes when the last one is
closed (an evicted engine, an import finished): at rest, a database holds no pooled connection.
Idle connections above `min_size` (0) are closed after `max_idle` seconds.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from importwaves.db.connect import Conn, check_pooled, note_return, set_schema, watch_fatal
from importwaves.db.options import DEFAULT, ConnOptions

#: Seconds an idle pooled connection is kept before the pool closes it.
MAX_IDLE_S = 60.0

#: pg_stat_activity.application_name of the engines' pooled connections
APPLICATION_NAME = "importwaves-engine"

#: The schema each pooled connection's search_path points at (None: not set yet).
_schema_of: weakref.WeakKeyDictionary[Conn, str] = weakref.WeakKeyDictionary()


@dataclass
class _Shared:
    pool: ConnectionPool[Conn]
    users: int


class TenantPool:
    """One tenant's handle on its database's shared pool: `connection()` as ConnectionPool's."""

    def __init__(self, registry: SharedPools, key: tuple[str, str], schema: str) -> None:
        self._registry = registry
        self._key = key
        self._pool = registry._pools[key].pool
        self.schema = schema
        self._closed = False

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Conn]:
        with self._pool.connection(timeout) as conn:
            if _schema_of.get(conn) != self.schema:
                conn.autocommit = True  # idle: no round trip to switch, the SET is not undone
                try:
                    set_schema(conn, self.schema)
                finally:
                    conn.autocommit = False
                _schema_of[conn] = self.schema
            try:
                yield conn
            finally:
                # stamped here, not by the pool's `reset` callback: a pool with one returns
                # connections through its worker threads, and one returned that way just before
                # the pool closes is put back after close() took the pool's list, never closed
                note_return(conn)

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
        self._lock = threading.Lock()  # guards the dict; pools open and close outside it
        self._pools: dict[tuple[str, str], _Shared] = {}

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
        with self._lock:
            shared = self._pools.get(key)
            if shared is not None:
                shared.users += 1
                return TenantPool(self, key, schema)
        fresh = _open(dsn, max_size, timeout, opts)
        with self._lock:
            shared = self._pools.get(key)
            spare = shared is not None  # another thread made it first
            if shared is None:
                self._pools[key] = shared = _Shared(fresh, 0)
            shared.users += 1
            handle = TenantPool(self, key, schema)
        if spare:
            fresh.close()
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
        shared.pool.close()

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's pools without closing them (their sockets
        are the parent's; closing them here would end the parent's sessions)."""
        self._lock = threading.Lock()
        self._pools = {}

    def count(self) -> int:
        with self._lock:
            return len(self._pools)


def _open(dsn: str, max_size: int, timeout: float, opts: ConnOptions) -> ConnectionPool[Conn]:
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
        connection_class=psycopg.Connection[dict[str, Any]],
        timeout=timeout,
        open=True,
        name="importwaves:shared",
    )


#: The process-wide registry every Engine borrows from.
POOLS = SharedPools()
os.register_at_fork(after_in_child=POOLS._after_fork)
