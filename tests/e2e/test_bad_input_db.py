"""The operator facing a bad tenant database: conditions with clear messages, back-off, and the
import resuming once the problem is fixed, with nothing lost.

1. One ImportJob walks through the database problems: a Secret with wrong credentials
   (DatabaseReady=False, DatabaseAuthFailed, naming the role), then the right credentials but a
   tenant schema whose next migration cannot apply (MigrationFailed, naming the object), then the
   schema fixed: the import runs to Completed and verifies.
2. The tenant database stopped in the middle of an import and started again: it completes,
   verified, one Job per dispatch.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from importwaves.db import migrate
from importwaves.localdev import LocalPostgres

from .harness.cluster import Cluster
from .harness.operatorkit import (
    Harness,
    OperatorProcess,
    Tenant,
    apply,
    conditions,
    create_secret,
    importjob,
    is_true,
    status_history,
    watch_importjobs,
    watch_jobs,
)
from .test_chaos import assert_imported, assert_one_job_per_wave_at_a_time, chaos_spec


def db_ready(st: dict[str, Any]) -> dict[str, Any]:
    return conditions(st).get("DatabaseReady", {})


def set_secret(cluster: Cluster, ns: str, name: str, dsn: str) -> None:
    patch = {"stringData": {"dsn": dsn}}
    cluster.kubectl("-n", ns, "patch", "secret", name, "--type=merge", "-p", json.dumps(patch))


def test_database_problems_are_conditions_and_clear_once_fixed(
    k8s_cluster: Cluster,
    namespace: str,
    pg: LocalPostgres,
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    ns, name = namespace, "bad-db"
    job_id = f"{ns}.{name}"
    t = Tenant(pg.dsn(), f"baddb_{uuid.uuid4().hex[:8]}")
    t.drop()
    # The tenant is at migration 2 with its staging data; migration 3 adds a column that is
    # already there (a hand-made change), so it cannot apply.
    with psycopg.connect(t.dsn, autocommit=True) as conn:
        migrate.up(conn, t.name, target=2)
    data = t.generate(job_id, orders=300)
    with t.connect() as conn:
        conn.execute("ALTER TABLE staging_records ADD COLUMN parent_record_type_id integer")
    wrong = f"postgresql://nobody@127.0.0.1:{pg.port}/postgres"
    create_secret(k8s_cluster, ns, "tenant-db", wrong)
    # the defaults: the claim timeout is staleAfterSeconds (5 s); pods slower to start than that
    # cost no attempt (engine/workers.py plan_unclaimed)
    body = importjob(name, ns, t.name, **chaos_spec(hold=0.0, derived_size=500))
    op = operator(ns)
    h = harness(ns, [op], [t])
    try:
        apply(k8s_cluster, body)
        st = h.wait(name, lambda s: db_ready(s).get("status") == "False", "DatabaseReady=False")
        with h.explained():
            c = db_ready(st)
            assert c["reason"] == "DatabaseAuthFailed", c
            assert 'role "nobody" does not exist' in c["message"], c
            assert "Secret" in c["message"] and "tenant-db" in c["message"], c
            assert "retrying with back-off" in c["message"], c
            assert not is_true(st, "Completed")
        # it keeps retrying, with back-off (not a busy loop), and says so at warning level once
        # per problem (not at error level on every retry)
        t0 = time.monotonic()
        h.wait_for(
            lambda: len(op.log_events("importjob_blocked_retry")) >= 2, "the operator to retry", 30
        )
        time.sleep(3)
        retries = op.log_events("importjob_blocked_retry")
        rate = len(retries) / (time.monotonic() - t0)
        assert rate < 20, f"{rate:.0f} attempts a second: no back-off"
        delays = [r["next_try_in"] for r in retries]
        assert delays == sorted(delays), delays  # growing up to IMPORTWAVES_MAX_BACKOFF
        warned = op.log_events("importjob_blocked")
        assert len(warned) == 1, warned
        assert warned[0]["level"] == "warning"
        assert 'role "nobody" does not exist' in warned[0]["problem"]
        assert "failed temporarily" not in op.log()  # kopf's error-level retry line

        set_secret(k8s_cluster, ns, "tenant-db", t.dsn)
        st = h.wait(
            name,
            lambda s: db_ready(s).get("reason") == "MigrationFailed",
            "DatabaseReady=False, MigrationFailed",
            60,
        )
        with h.explained():
            c = db_ready(st)
            assert c["status"] == "False"
            assert f"migrating tenant {t.name!r} failed" in c["message"], c
            assert "parent_record_type_id" in c["message"] and "already exists" in c["message"]
            assert not is_true(st, "Completed")
            assert t.scalar("SELECT count(*) FROM import_jobs") == 0  # nothing ran meanwhile

        with t.connect() as conn:
            conn.execute("ALTER TABLE staging_records DROP COLUMN parent_record_type_id")
        st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed once fixed", 120)
        with h.explained():
            assert db_ready(st).get("status") == "True", db_ready(st)
            # (a Warning Event is posted when the summary changes: the first problem's)
            reasons = {e.get("reason") for e in h.events(name)}
            assert "DatabaseAuthFailed" in reasons, reasons
            assert migrate.applied(psycopg.connect(t.dsn, autocommit=True), t.name) == [
                m.version for m in migrate.migrations()
            ]
            assert_imported(t, job_id, body["spec"], data)
    finally:
        if op.running:
            k8s_cluster.kubectl("-n", ns, "delete", "importjobs", "--all", "--timeout=30s")
        with psycopg.connect(t.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(t.name)))


def test_database_stopped_mid_import_and_started_again(
    k8s_cluster: Cluster,
    namespace: str,
    pg: LocalPostgres,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    ns, name = namespace, "db-down"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"dbdown_{uuid.uuid4().hex[:8]}")
    data = t.generate(job_id, orders=500)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    # Pooled workers that lost their database exit 1; the Job controller starts their
    # replacements after its pod back-off (10 s, 20 s, ...). A dispatch nobody claims within
    # chaos_spec's 5 s claim timeout while its wave has no live worker is released without
    # costing an attempt, and waits without one while the replacements start (engine/workers.py
    # plan_unclaimed): the defaults outlast the outage.
    body = importjob(name, ns, t.name, **chaos_spec(hold=0.3))
    op = operator(ns)
    h = harness(ns, [op], [t])

    def completed_batches() -> int:
        return int(
            t.scalar(
                "SELECT count(*) FROM wave_batches WHERE job_id = %s AND status = 'completed'",
                (job_id,),
            )
            or 0
        )

    with k8s_cluster.api_client() as api:
        jobs = watch_jobs(api, ns)
        ijs = watch_importjobs(api, ns)
        try:
            apply(k8s_cluster, body)
            h.wait_for(lambda: completed_batches() >= 4, "4 completed batches", 90, 0.1)
            pg.stop()
            down = time.monotonic()
            time.sleep(16)  # longer than the pool's 10 s wait for a connection
            assert op.running, "the operator died with its database"
            pg.start()
            st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed after the outage", 240)
        finally:
            if not pg.running():
                pg.start()
            jobs.stop()
            ijs.stop()
    with h.explained():
        assert st["summary"] == "Completed"
        history = status_history(ijs, name)
        unreachable = [
            db_ready(s) for s in history if db_ready(s).get("reason") == "DatabaseUnreachable"
        ]
        assert unreachable, "the outage never showed as DatabaseReady=False"
        assert all("unreachable" in c["message"] for c in unreachable)
        assert db_ready(st).get("status") == "True"
        assert time.monotonic() - down < 300
        assert_one_job_per_wave_at_a_time(jobs, t, job_id)
        assert_imported(t, job_id, body["spec"], data)
