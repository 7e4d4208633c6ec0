"""Tenant migrations: up/down/up gives the same schema, down leaves nothing of ours, every step
is recorded in schema_migrations; concurrent migrators apply each version once; every named
query is valid SQL against the migrated schema."""

from __future__ import annotations

import itertools
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from importwaves.db import migrate
from importwaves.db.connect import connect
from importwaves.db.queries import all_queries

pytestmark = pytest.mark.integration

_names = itertools.count()

CATALOG = {
    "relations": """
        SELECT c.relname, c.relkind FROM pg_class c
        WHERE c.relnamespace = %(ns)s::regnamespace ORDER BY 1""",
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type,
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid) AS default
        FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE c.relnamespace = %(ns)s::regnamespace AND c.relkind IN ('r', 'p')
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = %(ns)s ORDER BY 1, 2""",
    "constraints": """
        SELECT c.relname, con.conname, con.contype, pg_get_constraintdef(con.oid) AS def
        FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
        WHERE con.connamespace = %(ns)s::regnamespace ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid) AS def
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE NOT t.tgisinternal AND c.relnamespace = %(ns)s::regnamespace ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args,
               pg_get_functiondef(p.oid) AS def
        FROM pg_proc p WHERE p.pronamespace = %(ns)s::regnamespace ORDER BY 1, 2""",
    "types": """
        SELECT t.typname, t.typtype FROM pg_type t
        WHERE t.typnamespace = %(ns)s::regnamespace ORDER BY 1""",
    "sequences": """
        SELECT c.relname, s.seqtypid::regtype::text AS type, s.seqstart, s.seqincrement
        FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
        WHERE c.relnamespace = %(ns)s::regnamespace ORDER BY 1""",
}


def dump(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: [tuple(r) for r in conn.execute(q, {"ns": schema}).fetchall()]
        for name, q in CATALOG.items()
    }


def recorded(conn: psycopg.Connection[Any], schema: str) -> list[tuple[int, str]]:
    if not migrate.applied(conn, schema):
        return []
    q = sql.SQL("SELECT version, name FROM {}.schema_migrations ORDER BY version").format(
        sql.Identifier(schema)
    )
    return [tuple(r) for r in conn.execute(q).fetchall()]  # type: ignore[misc]


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    name = f"mig_{os.getpid()}_{next(_names)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def test_up_down_up_gives_the_same_schema_and_down_leaves_nothing(dsn: str, schema: str) -> None:
    migs = migrate.migrations()
    versions = [m.version for m in migs]
    assert versions == list(range(1, len(migs) + 1)), "versions are numbered 1..N, no gaps"
    names = {m.version: m.name for m in migs}
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert migrate.applied(conn, schema) == []

        # up one version at a time: each step applies exactly that version and records it
        dumps: dict[int, Any] = {}
        for v in versions:
            assert [m.version for m in migrate.up(conn, schema, target=v)] == [v]
            assert recorded(conn, schema) == [(x, names[x]) for x in versions if x <= v]
            dumps[v] = dump(conn, schema)
            assert v == 1 or dumps[v] != dumps[v - 1], f"migration {v} changed nothing"
        full = dumps[versions[-1]]
        assert migrate.up(conn, schema) == []  # nothing pending: a no-op
        assert dump(conn, schema) == full

        tables = {r[0] for r in full["relations"] if r[1] == "r"}
        assert tables == {
            "schema_migrations",
            "import_jobs",
            "wave_coordination",
            "wave_batches",
            "staging_records",
            "customers",
            "transactions",
            "transaction_lines",
        }
        assert {r[1] for r in full["triggers"]} == {
            "wave_batches_count_insert",
            "wave_batches_count_update",
            "wave_batches_count_delete",
        }
        assert any(
            r[1] == "wave_batches_job_id_batch_id_key" and "UNIQUE (job_id, batch_id)" in r[3]
            for r in full["constraints"]
        )
        assert [r[0] for r in full["sequences"]] == ["wave_batches_id_seq"]

        # down one version at a time: each step returns exactly the schema before that version
        for v in reversed(versions[1:]):
            assert [m.version for m in migrate.down(conn, schema, target=v - 1)] == [v]
            assert recorded(conn, schema) == [(x, names[x]) for x in versions if x < v]
            assert dump(conn, schema) == dumps[v - 1]

        # all the way down: nothing of ours is left, the bookkeeping table included
        assert [m.version for m in migrate.down(conn, schema)] == [1]
        assert migrate.applied(conn, schema) == []
        empty = dump(conn, schema)
        assert all(rows == [] for rows in empty.values()), empty
        assert migrate.down(conn, schema) == []  # idempotent

        # and up again: the very same schema
        assert [m.version for m in migrate.up(conn, schema)] == versions
        assert dump(conn, schema) == full
        assert recorded(conn, schema) == [(x, names[x]) for x in versions]


def test_down_with_data_in_the_tables(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.up(conn, schema)
    with connect(dsn, schema, autocommit=True) as conn:
        conn.execute("INSERT INTO import_jobs (job_id, spec) VALUES ('j', '{}')")
        conn.execute(
            "INSERT INTO wave_coordination (job_id, wave_number, record_type_id, "
            "record_type_name, dependency_level) VALUES ('j', 1, -2, 'Customer', -1)"
        )
        conn.execute(
            "INSERT INTO wave_batches (job_id, batch_id, wave_number, record_type_id, "
            "chunk_ids_json) VALUES ('j', 'b', 1, -2, '[1]')"
        )
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert len(migrate.down(conn, schema)) == len(migrate.migrations())
        assert all(rows == [] for rows in dump(conn, schema).values())


def test_concurrent_migrators_apply_each_version_once(dsn: str, schema: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait(10)
                results.append([m.version for m in migrate.up(conn, schema)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    every = [m.version for m in migrate.migrations()]
    assert sorted(v for r in results for v in r) == every
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert migrate.applied(conn, schema) == every


def test_every_named_query_is_valid_sql(dsn: str, tenant: str) -> None:
    """PREPARE (parse, analyse, type-check) each statement of queries.sql in a tenant schema."""
    with connect(dsn, tenant, autocommit=True) as conn:
        for name, stmt in all_queries().items():
            params: list[str] = []

            def number(m: re.Match[str], params: list[str] = params) -> str:
                if m.group(1) not in params:
                    params.append(m.group(1))
                return f"${params.index(m.group(1)) + 1}"

            text = re.sub(r"%\(([a-z_]+)\)s", number, stmt).replace("%%", "%")
            try:
                conn.execute(f"PREPARE q_{name} AS {text}".encode())
            except psycopg.Error as exc:
                pytest.fail(f"{name}: {exc}")
            conn.execute(f"DEALLOCATE q_{name}".encode())
