"""`importwaves` with bad input: one line on stderr, a non-zero exit code, nothing changed.

A table of bad inputs (issue 13's list and their neighbours), each run as a user runs it: the
installed `importwaves` script in a subprocess, against the session's real PostgreSQL and Redis.
For every row: exactly one line on stderr (no traceback, no password), nothing on stdout, the
expected exit code (1 for a problem found at run time, 2 for a bad command line), and a
fingerprint of the database (every schema and relation name, every row of every user table) and
of Redis (every key, value and whether it has a TTL) equal before and after.

The table (input, line printed, exit code) is printed to the test output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib
import yaml
from psycopg import sql

from helpers import make_engine, small_spec, stage
from importwaves.db import migrate
from importwaves.localdev import free_port

pytestmark = pytest.mark.integration

IMPORTWAVES = Path(sys.executable).parent / "importwaves"
PASSWORD = "hunter2-Secret"


# -- fingerprints ----------------------------------------------------------------------------------
_RELATIONS = """
SELECT n.nspname, c.relname, c.relkind::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg_temp%%' AND n.nspname NOT LIKE 'pg_toast_temp%%'
ORDER BY 1, 2
"""


def db_fingerprint(dsn: str) -> dict[str, Any]:
    """Schema names, relation names and kinds, and the rows of every user table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        schemas = [r[0] for r in conn.execute("SELECT nspname FROM pg_namespace ORDER BY 1")]
        relations = [tuple(r) for r in conn.execute(_RELATIONS)]
        rows: dict[str, list[str]] = {}
        for schema, name, kind in relations:
            if kind != "r":
                continue
            q = sql.SQL("SELECT t::text FROM {}.{} AS t ORDER BY 1").format(
                sql.Identifier(schema), sql.Identifier(name)
            )
            rows[f"{schema}.{name}"] = [r[0] for r in conn.execute(q)]
    return {"schemas": schemas, "relations": relations, "rows": rows}


def redis_fingerprint(url: str) -> dict[str, Any]:
    client = redis_lib.Redis.from_url(url, decode_responses=True)
    try:
        out = {}
        for k in sorted(client.scan_iter("*")):
            kind = client.type(k)
            out[k] = (kind, client.get(k) if kind == "string" else None, client.ttl(k) > 0)
        return out
    finally:
        client.close()


def digest(fp: Any) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    exit_code: int
    says: str  # a fragment of the one line it must print
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class World:
    dsn: str
    redis_url: str
    tenant: str  # migrated, with a submitted job "job", its batches and Redis flags
    broken: str  # migrated, then staging_records dropped
    bare: str  # an empty schema: never migrated
    spec_broken: Path  # a spec for `broken`
    spec_yaml_error: Path
    spec_bad_tenant: Path


def cases(w: World) -> list[Case]:
    db = ("--dsn", w.dsn)
    t = ("--tenant", w.tenant)
    r = ("--redis-url", w.redis_url)
    closed = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/postgres"
    malformed = f"postgresql://postgres:{PASSWORD}%zz@127.0.0.1/postgres"
    out = [
        # missing tenant schema
        *(
            Case(
                f"{cmd} --tenant nosuch",
                (cmd, "job", "--tenant", "nosuch", *db, *r),
                1,
                "no tenant schema 'nosuch'",
            )
            for cmd in ("status", "reconcile", "retry-failed")
        ),
        # a schema that exists but was never migrated
        Case(
            "reconcile: schema not migrated",
            ("reconcile", "job", "--tenant", w.bare, *db, *r),
            1,
            "has 0 of",
        ),
        Case(
            "status: schema not migrated",
            ("status", "job", "--tenant", w.bare, *db, *r),
            1,
            "was never migrated (no table import_jobs",
        ),
        # unknown job
        *(
            Case(f"{cmd} unknown job", (cmd, "nojob", *t, *db, *r), 1, "no job 'nojob'")
            for cmd in ("status", "reconcile", "retry-failed")
        ),
        # --tenant by the spec's rule, refused before anything is created
        Case(
            "migrate up: injection-shaped tenant",
            ("migrate", "up", "--tenant", 't"; drop table x; --', *db),
            2,
            "is not a tenant name",
        ),
        Case("migrate up: empty tenant", ("migrate", "up", "--tenant", "", *db), 2, "''"),
        Case(
            "migrate up: tenant of 49 chars",
            ("migrate", "up", "--tenant", "a" * 49, *db),
            2,
            "is not a tenant name",
        ),
        Case(
            "migrate up: uppercase tenant",
            ("migrate", "up", "--tenant", "Acme", *db),
            2,
            "is not a tenant name",
        ),
        *(
            Case(
                f"migrate up: reserved tenant {name}",
                ("migrate", "up", "--tenant", name, *db),
                2,
                "reserved schema name",
            )
            for name in ("public", "information_schema", "pg_catalog", "pg_mine")
        ),
        Case("status: bad tenant", ("status", "job", "--tenant", "a-b", *db), 2, "'a-b'"),
        Case("reconcile: bad tenant", ("reconcile", "job", "--tenant", "A", *db), 2, "'A'"),
        Case(
            "retry-failed: reserved tenant",
            ("retry-failed", "job", "--tenant", "pg_x", *db),
            2,
            "reserved schema name",
        ),
        Case(
            "migrate status: bad tenant from IMPORTWAVES_TENANT",
            ("migrate", "status", *db),
            2,
            "is not a tenant name",
            env=(("IMPORTWAVES_TENANT", "Bad Name"),),
        ),
        # DSN: malformed, closed port
        Case(
            "status: DSN is not a DSN",
            ("status", "job", *t, "--dsn", "this is not a dsn"),
            1,
            "not a valid PostgreSQL connection string",
        ),
        Case(
            "migrate up: DSN with a bad percent-escape in its password",
            ("migrate", "up", *t, "--dsn", malformed),
            1,
            "not a valid PostgreSQL connection string",
        ),
        Case(
            "run-local: DSN is not a DSN",
            ("run-local", "job", "-f", str(w.spec_broken), "--dsn", "host=x bogus=1"),
            1,
            "not a valid PostgreSQL connection string",
        ),
        *(
            Case(
                f"{cmd[0]}: DSN at a closed port",
                (*cmd, *t, "--dsn", closed),
                1,
                "connection was refused",
            )
            for cmd in (
                ("status", "job"),
                ("reconcile", "job"),
                ("retry-failed", "job"),
                ("migrate", "up"),
            )
        ),
        # run-local
        Case(
            "run-local: staging_records missing",
            ("run-local", "job", "-f", str(w.spec_broken), *db, *r),
            1,
            "has no table staging_records",
        ),
        Case(
            "run-local: spec is not YAML",
            ("run-local", "job", "-f", str(w.spec_yaml_error), *db),
            1,
            "not valid YAML",
        ),
        Case(
            "run-local: spec with a bad tenant",
            ("run-local", "job", "-f", str(w.spec_bad_tenant), *db),
            1,
            "tenant:",
        ),
        Case(
            "run-local: no such spec file",
            ("run-local", "job", "-f", "/nonexistent/spec.yaml", *db),
            2,
            "does not exist",
        ),
        # the command line itself
        Case("migrate sideways", ("migrate", "sideways", *t, *db), 2, "'sideways'"),
        Case("migrate up --bogus", ("migrate", "up", "--bogus", *t, *db), 2, "--bogus"),
        Case("status without JOB_ID", ("status", *t, *db), 2, "JOB_ID"),
        Case("status without --tenant", ("status", "job", *db), 2, "--tenant"),
        Case("reconcile without --dsn", ("reconcile", "job", *t), 2, "--dsn"),
        Case("unknown command", ("frobnicate",), 2, "frobnicate"),
        Case(
            "reconcile --importjob without a kubeconfig",
            ("reconcile", "--importjob", "default/demo"),
            1,
            "cannot load a kubeconfig",
            env=(("KUBECONFIG", "/nonexistent/kubeconfig"),),
        ),
        Case(
            "reconcile --importjob without a namespace",
            ("reconcile", "--importjob", "demo"),
            2,
            "--importjob takes NAMESPACE/NAME",
        ),
        Case(
            "status: --redis-url not a URL",
            ("status", "job", *t, *db, "--redis-url", f"nope:{PASSWORD}"),
            2,
            "not a Redis URL",
        ),
    ]
    return out


@pytest.fixture
def world(dsn: str, redis_url: str, tenant: str, tmp_path: Path) -> Iterator[World]:
    # A live tenant: staged rows, a submitted job with dispatched batches, Redis flags.
    stage(dsn, tenant, "job", orders=30)
    engine = make_engine(dsn, tenant, redis_url)
    try:
        engine.submit("job", small_spec(tenant))
        engine.check("job")
    finally:
        engine.close()
    broken, bare = f"{tenant}_broken", f"{tenant}_bare"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.up(conn, broken)
        conn.execute(sql.SQL("DROP TABLE {}.staging_records").format(sql.Identifier(broken)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(bare)))
    spec_broken = tmp_path / "broken.yaml"
    spec_broken.write_text(yaml.safe_dump(small_spec(broken).model_dump(mode="json")))
    spec_yaml_error = tmp_path / "notyaml.yaml"
    spec_yaml_error.write_text("tenant: [unclosed\n  recordTypes: {\n")
    spec_bad_tenant = tmp_path / "badtenant.yaml"
    data = small_spec(tenant).model_dump(mode="json")
    data["tenant"] = "Acme; drop"
    spec_bad_tenant.write_text(yaml.safe_dump({"kind": "ImportJob", "spec": data}))
    try:
        yield World(
            dsn, redis_url, tenant, broken, bare, spec_broken, spec_yaml_error, spec_bad_tenant
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for schema in (broken, bare):
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


def run_cli(case: Case) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPORTWAVES_")}
    env.update(case.env)
    return subprocess.run(
        [str(IMPORTWAVES), *case.args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_every_bad_input_prints_one_line_exits_non_zero_and_changes_nothing(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    table = cases(world)
    db_before, redis_before = db_fingerprint(world.dsn), redis_fingerprint(world.redis_url)
    # the fingerprint covers what it must: the job's rows and its Redis flags are there
    assert any(r for k, r in db_before["rows"].items() if k == f"{world.tenant}.import_jobs")
    assert any(r for k, r in db_before["rows"].items() if k == f"{world.tenant}.wave_batches")
    assert redis_before, "the live job set no Redis flag: the Redis fingerprint proves nothing"

    results = []
    problems = []
    for case in table:
        proc = run_cli(case)
        lines = proc.stderr.splitlines()
        line = lines[0] if lines else ""
        results.append((case, line, proc.returncode))
        why = []
        if len(lines) != 1:
            why.append(f"{len(lines)} stderr lines")
        if proc.stdout:
            why.append(f"stdout {proc.stdout[:200]!r}")
        if proc.returncode != case.exit_code:
            why.append(f"exit {proc.returncode}, expected {case.exit_code}")
        if case.says not in line:
            why.append(f"does not say {case.says!r}")
        if "Traceback" in proc.stderr or PASSWORD in proc.stderr:
            why.append("traceback or password on stderr")
        db_after = db_fingerprint(world.dsn)
        redis_after = redis_fingerprint(world.redis_url)
        if db_after != db_before:
            why.append(_db_diff(db_before, db_after))
            db_before = db_after  # report each change once, at the case that made it
        if redis_after != redis_before:
            why.append(f"redis changed: {sorted(set(redis_after) ^ set(redis_before))}")
            redis_before = redis_after
        if why:
            problems.append(f"{case.name}: {'; '.join(why)}\n    stderr: {proc.stderr[:800]!r}")

    with capsys.disabled():
        print(
            f"\n\nimportwaves bad input ({len(results)} cases; db {digest(db_before)}, "
            f"redis {digest(redis_before)} unchanged unless listed below)"
        )
        for case, line, code in results:
            shown = " ".join(_show(a, world) for a in case.args)
            env = " ".join(f"{k}={v!r}" for k, v in case.env)
            print(
                f"\n  $ {env + ' ' if env else ''}importwaves {shown}\n    -> exit {code}: {line}"
            )
        print()
    assert not problems, "\n".join(problems)


def _show(arg: str, w: World) -> str:
    """An argument as the table prints it: the session's DSN and URLs by name."""
    if arg == w.dsn:
        return "$DSN"
    if arg == w.redis_url:
        return "$REDIS_URL"
    if arg in {str(w.spec_broken), str(w.spec_yaml_error), str(w.spec_bad_tenant)}:
        return Path(arg).name
    return repr(arg) if (not arg or any(c in arg for c in " \"';")) else arg


def _db_diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    schemas = sorted(set(before["schemas"]) ^ set(after["schemas"]))
    rels = sorted(set(before["relations"]) ^ set(after["relations"]))
    tables = sorted(
        k
        for k in set(before["rows"]) | set(after["rows"])
        if before["rows"].get(k) != after["rows"].get(k)
    )
    return f"database changed: schemas {schemas}, relations {rels[:10]}, rows of {tables}"


def test_the_fingerprints_see_a_change_and_the_success_paths_still_work(world: World) -> None:
    """The same fingerprints tell a changed database or Redis from an unchanged one (so the
    table's "nothing changed" can fail), and the commands the table calls with bad input still
    work with good input."""
    db, rd = db_fingerprint(world.dsn), redis_fingerprint(world.redis_url)
    t = ("--tenant", world.tenant, "--dsn", world.dsn, "--redis-url", world.redis_url)
    for args in (("status", "job", *t), ("status", "job", "--json", *t)):
        proc = run_cli(Case("ok", args, 0, ""))
        assert proc.returncode == 0, proc.stderr
        assert "job" in proc.stdout
    proc = run_cli(Case("ok", ("reconcile", "job", *t), 0, ""))
    assert proc.returncode == 0, proc.stderr
    assert "- progression check:" in proc.stdout, proc.stdout
    # a read changes nothing; a write is seen
    assert db_fingerprint(world.dsn)["schemas"] == db["schemas"]
    fresh = f"{world.tenant}_new"
    try:
        proc = run_cli(Case("ok", ("migrate", "up", "--tenant", fresh, "--dsn", world.dsn), 0, ""))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"applied {len(migrate.migrations())} migration(s)")
        after = db_fingerprint(world.dsn)
        assert fresh in after["schemas"] and after != db
    finally:
        with psycopg.connect(world.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(fresh)))
    rd = redis_fingerprint(world.redis_url)
    assert rd, "no Redis flag to delete"
    client = redis_lib.Redis.from_url(world.redis_url)
    try:
        client.delete(next(iter(rd)))
    finally:
        client.close()
    assert redis_fingerprint(world.redis_url) != rd
