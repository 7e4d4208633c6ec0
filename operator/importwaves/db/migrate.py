"""Numbered, reversible tenant migrations (`NNNN_name.up.sql` / `NNNN_name.down.sql`).

Each migration runs in its own transaction together with its bookkeeping row, under an advisory
lock per tenant schema, so two operators migrating the same tenant cannot interleave.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, LiteralString

import psycopg
from psycopg import pq, sql

from importwaves.db.connect import set_schema

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(up|down)\.sql$")
_LOCK_SQL: LiteralString = "SELECT pg_advisory_xact_lock(hashtext('importwaves:migrate:' || %s))"
#: A migration waits at most this long for the advisory lock (or any other lock) when the
#: connection sets no lock_timeout of its own: never forever.
MIGRATE_LOCK_TIMEOUT = "30s"
_BOUND_LOCK_WAIT: LiteralString = (
    "SELECT set_config('lock_timeout', %s, true) WHERE current_setting('lock_timeout') IN ('0', '')"
)
_BOOKKEEPING: LiteralString = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: str
    down: str


def migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order; each must have both halves."""
    found: dict[int, dict[str, str]] = {}
    names: dict[int, str] = {}
    for entry in files("importwaves.db").joinpath("migrations").iterdir():
        m = _FILE.match(entry.name)
        if not m:
            continue
        version = int(m.group(1))
        names[version] = m.group(2)
        found.setdefault(version, {})[m.group(3)] = entry.read_text(encoding="utf-8")
    out = []
    for version in sorted(found):
        halves = found[version]
        if set(halves) != {"up", "down"}:
            raise RuntimeError(f"migration {version:04d} lacks its up or down half")
        out.append(Migration(version, names[version], halves["up"], halves["down"]))
    return out


def applied(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    """Versions applied in `schema` (empty when the tenant was never migrated)."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.schema_migrations', %s::text)) IS NOT NULL AS present",
        (schema,),
    ).fetchone()
    if not row or not _first(row):
        return []
    query = sql.SQL("SELECT version FROM {}.schema_migrations ORDER BY version").format(
        sql.Identifier(schema)
    )
    return [int(_first(r)) for r in conn.execute(query).fetchall()]


def pending(conn: psycopg.Connection[Any], schema: str) -> list[Migration]:
    done = set(applied(conn, schema))
    return [m for m in migrations() if m.version not in done]


def up(conn: psycopg.Connection[Any], schema: str, target: int | None = None) -> list[Migration]:
    """Apply every pending migration up to `target` (all by default); return what was applied."""
    done: list[Migration] = []
    conn.autocommit = True
    for mig in migrations():
        if target is not None and mig.version > target:
            break
        with conn.transaction():
            conn.execute(_BOUND_LOCK_WAIT, (MIGRATE_LOCK_TIMEOUT,))
            conn.execute(_LOCK_SQL, (schema,))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            set_schema(conn, schema)
            conn.execute(_BOOKKEEPING)
            if conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = %s", (mig.version,)
            ).fetchone():
                continue
            conn.execute(mig.up)
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (mig.version, mig.name),
            )
            done.append(mig)
    return done


def ensure(conn: psycopg.Connection[Any], schema: str) -> list[Migration]:
    """Bring `schema` to the latest migration; return what was applied. It looks first, without
    the advisory lock (two reads: the usual case, a tenant already migrated, costs no more);
    only when something is pending does it run `up` (which checks again under the lock). The
    connection's autocommit is as it found it afterwards (it must be idle)."""
    was = conn.autocommit
    conn.autocommit = True
    try:
        if not pending(conn, schema):
            return []
        return up(conn, schema)
    finally:
        if not conn.closed and conn.info.transaction_status == pq.TransactionStatus.IDLE:
            conn.autocommit = was


def down(conn: psycopg.Connection[Any], schema: str, target: int = 0) -> list[Migration]:
    """Revert applied migrations above `target`, newest first; at 0 the bookkeeping goes too."""
    reverted: list[Migration] = []
    conn.autocommit = True
    for mig in reversed(migrations()):
        if mig.version <= target:
            break
        with conn.transaction():
            conn.execute(_BOUND_LOCK_WAIT, (MIGRATE_LOCK_TIMEOUT,))
            conn.execute(_LOCK_SQL, (schema,))
            if mig.version not in applied(conn, schema):
                continue
            set_schema(conn, schema)
            conn.execute(mig.down)
            conn.execute("DELETE FROM schema_migrations WHERE version = %s", (mig.version,))
            reverted.append(mig)
    if target == 0 and applied(conn, schema) == []:
        with conn.transaction():
            conn.execute(_BOUND_LOCK_WAIT, (MIGRATE_LOCK_TIMEOUT,))
            conn.execute(_LOCK_SQL, (schema,))
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}.schema_migrations").format(sql.Identifier(schema))
            )
    return reverted


def _first(row: Any) -> Any:
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def schema_exists(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Whether the tenant schema exists at all (the CLI checks before it reads or writes)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s) AS present", (schema,)
    ).fetchone()
    return bool(row and _first(row))


def missing_tables(
    conn: psycopg.Connection[Any], schema: str, tables: tuple[str, ...]
) -> list[str]:
    """Which of `tables` do not exist in `schema`, in the order given (a table dropped by hand
    from a migrated schema: its migration is still recorded as applied)."""
    rows = conn.execute(
        "SELECT t FROM unnest(%s::text[]) WITH ORDINALITY AS x(t, i) "
        "WHERE to_regclass(format('%%I.%%I', %s::text, t)) IS NULL ORDER BY i",
        (list(tables), schema),
    ).fetchall()
    return [str(_first(r)) for r in rows]
