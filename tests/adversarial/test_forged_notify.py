"""A forged completion NOTIFY from another tenant of the same database.

PostgreSQL checks no privilege on NOTIFY: any role that can connect to the database can
`pg_notify` any channel. Another tenant's role (its own schema, no rights on ours) sends the
payload of a running batch of ours, with its real batch id and dispatch sequence, to our
tenant's channel and to the old database-wide channel. The notification reaches our engine (it is
a prompt), but the batch is not completed by it, and the import then completes with every row.
"""

from __future__ import annotations

import queue
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from helpers import assert_verified, job_status, make_engine, setup_job, wait_until
from importwaves.engine.notify import LEGACY_CHANNEL, Completion, CompletionListener, channel_for
from importwaves.launch.local import LocalLauncher
from importwaves.runner import LocalRunner
from importwaves.worker import WorkItem, completion_payload

pytestmark = pytest.mark.integration


@pytest.fixture
def other_tenant_role(dsn: str) -> Iterator[str]:
    """A DSN for another tenant's role: LOGIN, its own schema, no rights on ours."""
    name = f"evil_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
        admin.execute(
            sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                sql.Identifier(name), sql.Identifier(name)
            )
        )
    yield make_conninfo(dsn, user=name, password=password)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_forged_notify_completes_nothing(dsn: str, tenant: str, other_tenant_role: str) -> None:
    engine = make_engine(dsn, tenant, None)
    try:
        ds, spec = setup_job(engine, "forged", orders=120)
        dispatched = engine.check("forged").dispatched
        assert dispatched, "nothing dispatched"
        target = dispatched[0]

        # Our engine's LISTEN path, exactly as the local runner wires it: every notification
        # on our channel goes to the batch-completed listener. `seen` tells the test when it ran.
        seen: queue.Queue[Completion] = queue.Queue()

        def prompted(c: Completion) -> None:
            engine.listener.on_completions(c.job_id, [c.batch_id])
            seen.put(c)

        listener = CompletionListener(dsn, tenant, prompted, poll=0.1).start()
        assert listener.listening
        try:
            forged = completion_payload(
                WorkItem(dsn, tenant, "forged", target.batch_id, target.dispatch_seq)
            )
            with psycopg.connect(other_tenant_role, autocommit=True) as evil:
                me = evil.execute("SELECT current_user").fetchone()
                assert me is not None and me[0].startswith("evil_")
                # the other role cannot read our tables ...
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    evil.execute(
                        sql.SQL("SELECT 1 FROM {}.wave_batches").format(sql.Identifier(tenant))
                    )
                # ... but may NOTIFY any channel
                evil.execute("SELECT pg_notify(%s, %s)", (channel_for(tenant), forged))
                evil.execute("SELECT pg_notify(%s, %s)", (LEGACY_CHANNEL, forged))
            got = seen.get(timeout=10)  # the forged prompt reached the engine and was handled
            assert (got.batch_id, got.dispatch_seq) == (target.batch_id, target.dispatch_seq)
        finally:
            listener.stop()

        with psycopg.connect(dsn, autocommit=True) as admin:
            row = admin.execute(
                sql.SQL(
                    "SELECT status, completed_at FROM {}.wave_batches "
                    "WHERE job_id = 'forged' AND batch_id = %s"
                ).format(sql.Identifier(tenant)),
                (target.batch_id,),
            ).fetchone()
        assert row is not None
        print(f"\nforged NOTIFY for batch {target.batch_id}: batch status now {row[0]!r}")
        assert row[0] != "completed" and row[1] is None, (
            f"a forged NOTIFY completed batch {target.batch_id}"
        )

        # The real workers then import everything.
        runner_engine = make_engine(dsn, tenant, None, launcher=LocalLauncher(dsn))
        try:
            stats = LocalRunner(runner_engine, tick=0.2).run("forged", timeout=180)
        finally:
            runner_engine.close()
        assert stats.status == "completed", stats
        wait_until(lambda: job_status(dsn, tenant, "forged") == "completed", timeout=5)
        assert_verified(dsn, tenant, "forged", spec)
        with psycopg.connect(dsn, autocommit=True) as admin:
            counts = admin.execute(
                sql.SQL(
                    "SELECT (SELECT count(*) FROM {t}.customers WHERE imported_job = 'forged'),"
                    " (SELECT count(*) FROM {t}.transactions WHERE imported_job = 'forged')"
                ).format(t=sql.Identifier(tenant))
            ).fetchone()
        assert counts is not None
        print(f"imported customers={counts[0]}/{ds.customers} orders={counts[1]}/{ds.orders}")
        assert (counts[0], counts[1]) == (ds.customers, ds.orders)
    finally:
        engine.close()
