"""A worker stopped (SIGSTOP) inside its completion transaction.

The worker holds its batch row (`FOR UPDATE`) in an open transaction and then stops answering:
not dead (its socket stays open, so no end-of-file and no TCP error ever reach the server), just
silent. Without timeouts its session would hold the row until someone killed the process. With
`idle_in_transaction_session_timeout` (set on every worker connection from the IMPORTWAVES_*
settings) the server ends the session, the transaction rolls back and the row is free; recovery
requeues the batch after `staleAfterSeconds` without a heartbeat, and another attempt completes
it, once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from psycopg import sql

from helpers import assert_verified, make_engine, setup_job, wait_until
from importwaves.launch.local import LocalLauncher
from importwaves.runner import LocalRunner
from importwaves.worker import ENV

pytestmark = pytest.mark.integration

IDLE_TIMEOUT_MS = 2000
STALE_AFTER = 5


def test_stopped_worker_releases_its_batch_and_another_attempt_completes_it(
    dsn: str, tenant: str
) -> None:
    engine = make_engine(dsn, tenant, None)
    admin = psycopg.connect(dsn, autocommit=True)
    worker: subprocess.Popen[bytes] | None = None
    try:
        ds, spec = setup_job(engine, "stop", orders=60, staleAfterSeconds=STALE_AFTER)
        first = engine.check("stop").dispatched[0]
        assert first.record_type_id == -2  # a Customer batch: it writes `customers`

        # Hold the worker inside its transaction: a table lock its upsert must wait for.
        admin.execute("BEGIN")
        admin.execute(
            sql.SQL("LOCK TABLE {}.customers IN EXCLUSIVE MODE").format(sql.Identifier(tenant))
        )
        admin_pid = admin.info.backend_pid
        env = {
            **os.environ,
            ENV["dsn"]: dsn,
            ENV["tenant"]: tenant,
            ENV["job_id"]: "stop",
            ENV["batch_id"]: first.batch_id,
            ENV["dispatch_seq"]: str(first.dispatch_seq),
            "IMPORTWAVES_IDLE_IN_TRANSACTION_TIMEOUT_MS": str(IDLE_TIMEOUT_MS),
            "IMPORTWAVES_LOCK_TIMEOUT_MS": "60000",
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "importwaves.worker"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        with psycopg.connect(dsn, autocommit=True) as watch:

            def blocked_backend() -> int | None:
                row = watch.execute(
                    "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                    (admin_pid,),
                ).fetchone()
                return int(row[0]) if row else None

            backend = wait_until(blocked_backend, timeout=30, what="the worker's blocked upsert")
            # It holds the batch row: a NOWAIT lock on it fails.
            with pytest.raises(psycopg.errors.LockNotAvailable), watch.transaction():
                watch.execute(
                    sql.SQL(
                        "SELECT 1 FROM {}.wave_batches WHERE job_id = 'stop' "
                        "AND batch_id = %s FOR UPDATE NOWAIT"
                    ).format(sql.Identifier(tenant)),
                    (first.batch_id,),
                )
            os.kill(worker.pid, signal.SIGSTOP)
            admin.execute("COMMIT")  # the upsert finishes; the stopped client never answers
            t0 = time.monotonic()

            def session_gone() -> bool:
                row = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)
                ).fetchone()
                return row is not None and row[0] == 0

            wait_until(session_gone, timeout=IDLE_TIMEOUT_MS / 1000 + 10, every=0.1)
            released = time.monotonic() - t0
            with watch.transaction():
                row = watch.execute(
                    sql.SQL(
                        "SELECT status, attempts FROM {}.wave_batches WHERE job_id = 'stop' "
                        "AND batch_id = %s FOR UPDATE NOWAIT"
                    ).format(sql.Identifier(tenant)),
                    (first.batch_id,),
                ).fetchone()
            print(
                f"\nstopped worker: batch {first.batch_id} released {released:.2f}s after its "
                f"transaction went idle (idle_in_transaction_session_timeout "
                f"{IDLE_TIMEOUT_MS} ms); row now {row}"
            )
            assert released <= IDLE_TIMEOUT_MS / 1000 + 3
            assert row is not None and row[0] == "processing"  # rolled back: not completed
            imported = watch.execute(
                sql.SQL("SELECT count(*) FROM {}.customers").format(sql.Identifier(tenant))
            ).fetchone()
            assert imported is not None and imported[0] == 0

        # Recovery requeues it once its heartbeat is staleAfterSeconds old (the heartbeat
        # thread is stopped too); the local runner then completes the whole import.
        t1 = time.monotonic()
        wait_until(
            lambda: engine.recovery.reconcile("stop", cause="test").demoted,
            timeout=STALE_AFTER + 15,
            every=0.5,
            what="recovery to requeue the stopped worker's batch",
        )
        print(f"requeued {time.monotonic() - t1:.2f}s later (staleAfterSeconds={STALE_AFTER})")
        runner_engine = make_engine(dsn, tenant, None, launcher=LocalLauncher(dsn))
        try:
            stats = LocalRunner(runner_engine, tick=0.2).run("stop", timeout=180)
        finally:
            runner_engine.close()
        assert stats.status == "completed", stats
        assert_verified(dsn, tenant, "stop", spec)
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                sql.SQL(
                    "SELECT status, attempts, dispatch_seq FROM {}.wave_batches "
                    "WHERE job_id = 'stop' AND batch_id = %s"
                ).format(sql.Identifier(tenant)),
                (first.batch_id,),
            ).fetchone()
            customers = conn.execute(
                sql.SQL("SELECT count(*), count(DISTINCT id) FROM {}.customers").format(
                    sql.Identifier(tenant)
                )
            ).fetchone()
        print(f"batch {first.batch_id}: {row}; customers {customers} of {ds.customers}")
        assert row is not None and row[0] == "completed"
        assert row[1] == 2 and row[2] > first.dispatch_seq  # the stopped attempt + the one
        assert customers == (ds.customers, ds.customers)
    finally:
        if worker is not None:
            with_pid = worker.pid
            os.kill(with_pid, signal.SIGKILL)
            os.kill(with_pid, signal.SIGCONT)
            worker.wait(timeout=10)
        if not admin.closed:
            admin.close()
        engine.close()
