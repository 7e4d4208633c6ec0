"""Shared benchmark plumbing: real servers, tenants, bench SQL, statistics, statement counting."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from importwaves import log as iwlog
from importwaves.db import migrate
from importwaves.db.connect import Conn, connect
from importwaves.db.queries import all_queries, parse
from importwaves.localdev import LocalPostgres, LocalRedis

BENCH_DIR = Path(__file__).resolve().parent


@cache
def _bench_queries() -> dict[str, LiteralString]:
    return parse((BENCH_DIR / "queries.sql").read_text(encoding="utf-8"))


def BQ(name: str) -> LiteralString:
    """A statement of bench/queries.sql (benchmark fixtures, never engine code)."""
    return _bench_queries()[name]


def one(conn: Conn, name: str, params: dict[str, Any] | None = None) -> Any:
    row = conn.execute(BQ(name), params or {}).fetchone()
    return None if row is None else next(iter(row.values()))


# -- servers ----------------------------------------------------------------------------------
@dataclass
class Servers:
    pg: LocalPostgres
    redis: LocalRedis
    workdir: Path

    @property
    def dsn(self) -> str:
        return self.pg.dsn()

    def stop(self) -> None:
        self.redis.stop()
        self.pg.destroy()


def start_servers(workdir: Path) -> Servers:
    """PostgreSQL (fsync on, as in production) with pg_stat_statements preloaded, and Redis."""
    pg = LocalPostgres(workdir / "pg", fsync=True).start()
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.max = 10000")
    pg.stop()
    pg.start()
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")
    redis = LocalRedis(workdir / "redis").start()
    return Servers(pg, redis, workdir)


def new_tenant(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        migrate.up(conn, name)
    return name


def drop_tenant(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        conn.execute("CHECKPOINT")


def tenant_conn(dsn: str, tenant: str) -> Conn:
    return connect(dsn, tenant, autocommit=True)


def engine_logs_to(path: Path) -> None:
    """The engine logs JSON at INFO, as the operator does; into a file, not the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    iwlog.setup("INFO", path.open("a", encoding="utf-8"))
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


# -- statistics -------------------------------------------------------------------------------
def pct(xs: Sequence[float], q: float) -> float:
    """Percentile by linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_ms(xs: Sequence[float]) -> dict[str, Any]:
    """p50/p90/p99/max in milliseconds of samples given in seconds."""
    return {
        "n": len(xs),
        "p50_ms": round(pct(xs, 50) * 1000, 2),
        "p90_ms": round(pct(xs, 90) * 1000, 2),
        "p99_ms": round(pct(xs, 99) * 1000, 2),
        "max_ms": round(max(xs) * 1000, 2) if xs else None,
        "mean_ms": round(sum(xs) / len(xs) * 1000, 2) if xs else None,
    }


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# -- counting the statements the engine sends -------------------------------------------------
class StatementCounter:
    """Counts every statement sent through psycopg (Cursor.execute), by queries.sql name.

    BEGIN/COMMIT that psycopg issues for `conn.transaction()` do not pass through
    Cursor.execute; transactions are counted apart (Transaction.__enter__)."""

    def __init__(self) -> None:
        self._by_text = {text: name for name, text in all_queries().items()}
        self._lock = threading.Lock()
        self._active = False
        self.counts: Counter[str] = Counter()
        self.transactions = 0
        self._orig_execute: Any = None
        self._orig_tx_enter: Any = None

    def _name(self, query: Any) -> str:
        text = query if isinstance(query, str) else str(query)
        if not text.strip():
            return "(empty query: psycopg_pool check_connection)"
        return self._by_text.get(text, "other:" + " ".join(text.split())[:40])

    @contextlib.contextmanager
    def installed(self) -> Iterator[StatementCounter]:
        counter = self
        orig_execute = psycopg.Cursor.execute
        orig_enter = psycopg.Transaction.__enter__

        def execute(cur: Any, query: Any, params: Any = None, **kw: Any) -> Any:
            if counter._active:
                with counter._lock:
                    counter.counts[counter._name(query)] += 1
            return orig_execute(cur, query, params, **kw)

        def enter(tx: Any) -> Any:
            if counter._active:
                with counter._lock:
                    counter.transactions += 1
            return orig_enter(tx)

        psycopg.Cursor.execute = execute  # type: ignore[method-assign]
        psycopg.Transaction.__enter__ = enter  # type: ignore[method-assign]
        try:
            yield self
        finally:
            psycopg.Cursor.execute = orig_execute  # type: ignore[method-assign]
            psycopg.Transaction.__enter__ = orig_enter  # type: ignore[method-assign]

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counter[str]]:
        with self._lock:
            self.counts = Counter()
            self.transactions = 0
        self._active = True
        try:
            yield self.counts
        finally:
            self._active = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def pgss_snapshot(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """{'toplevel': n, 'nested': n} statement executions pg_stat_statements saw."""
    out = {"toplevel": 0, "nested": 0}
    for row in conn.execute(BQ("pgss_calls")).fetchall():
        top, calls, query = (
            (row["toplevel"], row["calls"], row["query"]) if isinstance(row, dict) else row
        )
        if "pg_stat_statements" in query:
            continue
        out["toplevel" if top else "nested"] += int(calls)
    return out


def proc_status_kb(pid: int, field: str) -> int | None:
    """A /proc/<pid>/status field in kB (VmHWM, VmRSS, RssAnon, ...)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
