"""Connections scale with databases and active work, not with tenants (db/pools.py, issue 16):
many tenant engines on one database share one pool; idle tenants hold no connection; closing
the engines leaves none; each tenant's statements run in its own schema. Through the operator's
engine cache: new tenants are migrated through that pool, so a database never has more than
its LISTEN connection plus the pool's size (counted in pg_stat_activity), and its LISTEN
connection is handed over without a second one."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from kubernetes import client
from psycopg import sql
from psycopg.conninfo import make_conninfo

from helpers import setup_job, wait_until
from importwaves.db import migrate
from importwaves.db.pools import APPLICATION_NAME, POOLS
from importwaves.engine.app import Engine
from importwaves.engine.notify import (
    HUBS,
    LINGER_S,
    Completion,
    CompletionListener,
    Hubs,
    channel_for,
)
from importwaves.k8s import operator as k8s_operator
from importwaves.k8s.crd import DatabaseRef
from importwaves.k8s.operator import ImportJobOperator, ProblemError
from importwaves.k8s.status import ProblemKind
from importwaves.settings import Settings
from importwaves.worker import WorkItem, completion_payload

pytestmark = pytest.mark.integration

TENANTS = 24


@pytest.fixture
def many_tenants(dsn: str, tenant: str) -> Iterator[list[str]]:
    names = [f"{tenant}_{i}" for i in range(TENANTS)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in names:
            migrate.up(conn, n)
    yield names
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(n)))


def engine_connections(dsn: str) -> int:
    """The engines' pooled connections the server has (pg_stat_activity)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (APPLICATION_NAME,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_many_tenants_share_one_pool_and_idle_ones_hold_nothing(engines, dsn, many_tenants) -> None:
    assert engine_connections(dsn) == 0
    made = [engines(schema=t, pool_size=4) for t in many_tenants]
    # engines exist, nothing runs: no connection at all (an idle tenant holds none)
    assert engine_connections(dsn) == 0
    busy = made[:6]
    for i, e in enumerate(busy):
        setup_job(e, f"job{i}", orders=100)
    errors: list[BaseException] = []

    def work(e, job: str) -> None:
        try:
            for _ in range(5):
                e.check(job)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(e, f"job{i}")) for i, e in enumerate(busy)]
    for t in threads:
        t.start()
    peak = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, engine_connections(dsn))
    for t in threads:
        t.join()
    assert not errors
    # six busy tenants and 18 idle ones of one database: at most the one pool's size
    assert 1 <= peak <= 4
    assert POOLS.count() == 1
    # each tenant's runs saw its own schema through the shared connections
    for e in busy:
        with e.pool.connection() as conn:
            row = conn.execute("SELECT current_schema() AS s").fetchone()
            assert row is not None and row["s"] == e.tenant
            assert conn.execute("SELECT count(*) AS n FROM import_jobs").fetchone() == {"n": 1}
    for e in made:
        e.close()
    assert POOLS.count() == 0

    # the server drops a closed connection's backend a moment after the client hangs up
    wait_until(lambda: engine_connections(dsn) == 0, timeout=10)


# -- the operator's connections per database (issue 16) ------------------------------------------
#: marks the operator's connections that are not pooled (its LISTEN connections; before the
#: migration went through the pool, one migration connection per new engine)
TEST_APP = f"iw-conn-{os.getpid()}"
DATABASES = 2
TENANTS_PER_DB = 10
POOL_SIZE = 4


@dataclass
class Peaks:
    """Per database: the most pooled connections, other operator connections, and both at one
    instant, seen in pg_stat_activity; and the LISTEN backends seen."""

    pooled: Counter[str] = field(default_factory=Counter)
    other: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    #: every database's together at one instant, with those not showing their database yet
    all_at_once: int = 0
    samples: int = 0
    listen_pids: dict[str, set[int]] = field(default_factory=dict)


def operator_connections(admin: psycopg.Connection[Any]) -> dict[str, tuple[int, int, set[int]]]:
    """Per database: (pooled connections, other operator connections, pids of those whose
    last statement was LISTEN/UNLISTEN), client backends only."""
    rows = admin.execute(
        "SELECT coalesce(datname, '') AS db, "
        "count(*) FILTER (WHERE application_name = %s) AS pooled, "
        "count(*) FILTER (WHERE application_name = %s) AS other, "
        "coalesce(array_agg(pid) FILTER (WHERE application_name = %s "
        "  AND (query LIKE 'LISTEN %%' OR query LIKE 'UNLISTEN %%')), '{}') AS listen "
        "FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND application_name IN (%s, %s) GROUP BY 1",
        (APPLICATION_NAME, TEST_APP, TEST_APP, APPLICATION_NAME, TEST_APP),
    ).fetchall()
    return {r[0]: (int(r[1]), int(r[2]), set(r[3])) for r in rows}


class Sampler:
    """Samples the operator's connections in pg_stat_activity on its own connection until
    stopped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="iw-sampler") as admin:
            while not self._stop.is_set():
                p = self.peaks
                seen = operator_connections(admin)
                p.all_at_once = max(p.all_at_once, sum(a + b for a, b, _ in seen.values()))
                # a connection's first instants show no database: counted in all_at_once only
                seen.pop("", None)
                for db, (pooled, other, listen) in seen.items():
                    p.pooled[db] = max(p.pooled[db], pooled)
                    p.other[db] = max(p.other[db], other)
                    p.total[db] = max(p.total[db], pooled + other)
                    p.listen_pids.setdefault(db, set()).update(listen)
                p.samples += 1
                self._stop.wait(0.005)


@pytest.fixture
def two_databases(pg: Any, dsn: str) -> Iterator[dict[str, str]]:
    """Two databases of the session's server, their DSNs marked with TEST_APP (pooled
    connections override it with importwaves-engine); tenants not migrated yet."""
    names = [f"iw_conn_{os.getpid()}_{i}" for i in range(DATABASES)]
    with psycopg.connect(dsn, autocommit=True) as admin:
        for n in names:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(n)))
    yield {n: make_conninfo(pg.dsn(n), application_name=TEST_APP) for n in names}
    with psycopg.connect(dsn, autocommit=True) as admin:
        for n in names:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(n))
            )


def _operator(monkeypatch: pytest.MonkeyPatch, dsns: dict[str, str]) -> ImportJobOperator:
    """The operator's engine cache; `dsns`: the Secrets' DSNs by Secret name (reading a Secret
    from Kubernetes is not what is measured here). Evicted engines close at once."""
    monkeypatch.setattr(k8s_operator, "EVICT_GRACE_S", 0.05)
    op = ImportJobOperator(Settings(pool_size=POOL_SIZE), client.ApiClient())
    monkeypatch.setattr(op, "read_dsn", lambda ns, ref: dsns[ref.secretName])
    return op


def _secret(db: str) -> DatabaseRef:
    return DatabaseRef(secretName=db.replace("_", "-"))


def _use(engine: Engine) -> None:
    """What a reconcile does with an engine, in short: borrow a connection for a moment."""
    with engine.pool.connection() as conn:
        conn.execute("SELECT pg_sleep(0.02)")


def test_operator_connections_per_database_stay_within_listen_plus_pool(
    monkeypatch: pytest.MonkeyPatch, two_databases: dict[str, str], dsn: str
) -> None:
    """20 new tenants of 2 databases created at once from 16 threads through the operator's
    engine cache (each migrated on first use), then evicted and created again while other
    ImportJobs of their databases run: at every sample each database has at most one LISTEN
    connection plus the pool's size, and no other operator connection; once every engine is
    evicted, none at all."""
    dbs = sorted(two_databases)
    tenants = [
        (db, f"c{os.getpid()}_{d}_{i}") for d, db in enumerate(dbs) for i in range(TENANTS_PER_DB)
    ]
    op = _operator(monkeypatch, {_secret(db).secretName: two_databases[db] for db in dbs})
    errors: list[BaseException] = []

    def create(db: str, tenant: str, user: str) -> None:
        try:
            _use(op.engine_for("ns", _secret(db), tenant, user=user))
        except BaseException as exc:
            errors.append(exc)

    try:
        # 1. every tenant's first engine at once (the migration of each)
        with Sampler(dsn) as s1, ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda t: create(t[0], t[1], f"ij-{t[1]}"), tenants))
        assert not errors, errors
        assert op.engine_count() == len(tenants)
        for db in dbs:
            with psycopg.connect(two_databases[db], autocommit=True) as conn:
                for d, t in tenants:
                    if d == db:
                        assert migrate.applied(conn, t) == [m.version for m in migrate.migrations()]
        p = s1.peaks
        assert p.samples >= 10, p
        for db in dbs:
            assert p.pooled[db] >= 1, p  # it did see them
            assert p.pooled[db] <= POOL_SIZE, p
            assert p.other[db] <= 1, p  # the LISTEN connection only: no migration connection
            assert p.total[db] <= 1 + POOL_SIZE, p
            assert len(p.listen_pids.get(db, set())) == 1, p  # one LISTEN connection throughout
        assert p.all_at_once <= DATABASES * (1 + POOL_SIZE), p

        # 2. ImportJobs finish and others of the same tenants come (engines evicted and made
        # again: a version check through the pool, no migration connection), while one
        # ImportJob per database keeps running
        for _, t in tenants[1:TENANTS_PER_DB] + tenants[TENANTS_PER_DB + 1 :]:
            op.release("ns", f"ij-{t}")

        def churn(i: int) -> None:
            db, t = tenants[1 + i % (TENANTS_PER_DB - 1) + (TENANTS_PER_DB if i % 2 else 0)]
            create(db, t, f"ij-{t}-{i}")
            op.release("ns", f"ij-{t}-{i}")

        with Sampler(dsn) as s2, ThreadPoolExecutor(16) as pool:
            list(pool.map(churn, range(120)))
        assert not errors, errors
        p = s2.peaks
        assert p.samples >= 10, p
        for db in dbs:
            assert p.pooled[db] <= POOL_SIZE, p
            assert p.other[db] <= 1, p
            assert p.total[db] <= 1 + POOL_SIZE, p
            assert len(p.listen_pids.get(db, set())) == 1, p
        assert p.all_at_once <= DATABASES * (1 + POOL_SIZE), p

        # 3. every ImportJob finished: every engine evicted, every connection closed (the
        # LISTEN connection a few seconds after its database's last tenant left)
        for _, t in (tenants[0], tenants[TENANTS_PER_DB]):
            op.release("ns", f"ij-{t}")
        assert op.engine_count() == 0
        with psycopg.connect(dsn, autocommit=True) as admin:
            wait_until(
                lambda: operator_connections(admin) == {},
                timeout=LINGER_S + 20,
                what="no operator connection left",
            )
        assert POOLS.count() == 0
        assert HUBS.count() == 0
    finally:
        op.close()


def test_a_database_never_has_two_listen_connections_when_its_tenants_change(
    dsn: str, tenant: str
) -> None:
    """The last tenant of a database leaves and another comes: within the linger the hub's
    connection is reused (one LISTEN backend throughout, and the new tenant's notifications
    arrive on it); without a linger, the newcomer waits until the old connection is closed."""
    app_dsn = make_conninfo(dsn, application_name=TEST_APP)
    got: queue.Queue[Completion] = queue.Queue()
    hubs = Hubs(linger=2.0)
    with Sampler(dsn) as s:
        a = CompletionListener(app_dsn, tenant, got.put, poll=0.1, hubs=hubs).start()
        assert a.listening
        hub = hubs.hub_for(app_dsn)
        with psycopg.connect(dsn, autocommit=True) as admin:
            wait_until(
                lambda: len(operator_connections(admin).get("postgres", (0, 0, set()))[2]) == 1,
                what="the LISTEN connection",
            )
        a.stop()  # the last tenant leaves
        b = CompletionListener(app_dsn, tenant + "_b", got.put, poll=0.1, hubs=hubs).start()
        assert b.listening
        assert hubs.hub_for(app_dsn) is hub  # the same hub, the same connection
        payload = completion_payload(WorkItem(dsn, tenant + "_b", "j", "b1", 1))
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_notify(%s, %s)", (channel_for(tenant + "_b"), payload))
        assert got.get(timeout=5).batch_id == "b1"
        b.stop()
        # its connection closes once the linger ran out with no tenant back
        wait_until(lambda: hubs.hub_for(app_dsn) is None, timeout=10, what="the hub to stop")
        with psycopg.connect(dsn, autocommit=True) as admin:
            wait_until(
                lambda: "postgres" not in operator_connections(admin),
                timeout=10,
                what="the LISTEN connection to close",
            )
    assert len(s.peaks.listen_pids.get("postgres", set())) == 1, s.peaks
    assert s.peaks.other["postgres"] == 1, s.peaks
    assert not hub._thread.is_alive()

    # no linger: the hub stops when its last tenant leaves; a tenant registering meanwhile
    # waits for that stop (its connection closed) before the next hub connects
    hubs = Hubs(linger=0)
    a = CompletionListener(app_dsn, tenant, got.put, poll=0.1, hubs=hubs).start()
    old = hubs.hub_for(app_dsn)
    assert old is not None and a.listening
    leaving = threading.Thread(target=a.stop)
    leaving.start()
    wait_until(old._stop.is_set, what="the hub to start stopping")
    b = CompletionListener(app_dsn, tenant + "_b", got.put, poll=0.1, hubs=hubs).start()
    try:
        assert not old._thread.is_alive()  # the old connection was closed first
        new = hubs.hub_for(app_dsn)
        assert new is not None and new is not old and b.listening
    finally:
        b.stop()
        leaving.join(10)
    assert hubs.hub_for(app_dsn) is None


def test_a_new_tenant_engine_reports_database_problems_as_the_server_said(
    monkeypatch: pytest.MonkeyPatch, dsn: str, pg: Any, tenant: str
) -> None:
    """The migration goes through the pool, whose connection attempts happen in its threads:
    a refused connection is still reported at once by its kind and the server's reason (not as
    the pool's timeout), with no secret; a migration that cannot apply is MigrationFailed
    naming the object; the failed engines leave no pool behind; once fixed, the engine is
    made and its pooled connection is handed back as the pool makes them (not autocommit)."""
    monkeypatch.setattr(k8s_operator, "FAILURE_HOLD_S", 0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    name = f"{tenant}_m"
    op = _operator(
        monkeypatch,
        {
            "nobody": make_conninfo(dsn, user="nobody", password="s3cret-pw"),
            "closed": f"postgresql://postgres@127.0.0.1:{closed_port}/postgres",
            "good": dsn,
        },
    )
    pools_before = POOLS.count()
    try:
        t0 = time.monotonic()
        with pytest.raises(ProblemError) as auth:
            op.engine_for("ns", DatabaseRef(secretName="nobody"), name)
        assert time.monotonic() - t0 < 5  # not the pool's 10 s timeout
        p = auth.value.problem
        assert p.kind is ProblemKind.DATABASE_AUTH_FAILED, p
        assert 'role "nobody" does not exist' in p.message, p
        assert "Secret ns/nobody" in p.message and "retrying with back-off" in p.message, p
        assert "s3cret-pw" not in p.message and "postgresql://" not in p.message, p

        with pytest.raises(ProblemError) as refused:
            op.engine_for("ns", DatabaseRef(secretName="closed"), name)
        p = refused.value.problem
        assert p.kind is ProblemKind.DATABASE_UNREACHABLE, p
        assert "refused" in p.message, p

        # migration 3 adds a column that a hand-made change already added
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate.up(conn, name, target=2)
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {}.staging_records ADD COLUMN parent_record_type_id integer"
                ).format(sql.Identifier(name))
            )
        with pytest.raises(ProblemError) as failed:
            op.engine_for("ns", DatabaseRef(secretName="good"), name)
        p = failed.value.problem
        assert p.kind is ProblemKind.MIGRATION_FAILED, p
        assert p.message.startswith(f"migrating tenant {name!r} failed: "), p
        assert "parent_record_type_id" in p.message and "already exists" in p.message, p
        assert POOLS.count() == pools_before  # the failed engines' pools are closed

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER TABLE {}.staging_records DROP COLUMN parent_record_type_id").format(
                    sql.Identifier(name)
                )
            )
        engine = op.engine_for("ns", DatabaseRef(secretName="good"), name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert migrate.applied(conn, name) == [m.version for m in migrate.migrations()]
        with engine.pool.connection() as conn:
            assert not conn.autocommit
            row = conn.execute("SELECT current_schema() AS s").fetchone()
            assert row is not None and row["s"] == name
    finally:
        op.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def test_a_new_pool_of_a_database_waits_for_the_closing_one(
    engines: Any, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last engine of a database closes its pool while a new engine of that database is
    made: the new pool is opened only once the old one closed its connections."""
    first = engines(schema=tenant, pool_size=2)
    _use(first)
    old = first.pool._pool
    closing = threading.Event()
    real_close = old.close

    def slow_close(timeout: float = 5.0) -> None:
        closing.set()
        time.sleep(0.5)  # a close that takes a while (its workers, its connections)
        real_close(timeout)

    monkeypatch.setattr(old, "close", slow_close)
    closer = threading.Thread(target=first.close)
    closer.start()
    assert closing.wait(5)
    second = engines(schema=tenant, pool_size=2)
    try:
        assert old.closed  # made only after the old pool closed
        assert second.pool._pool is not old
        _use(second)
    finally:
        closer.join(10)
    assert POOLS.count() == 1
