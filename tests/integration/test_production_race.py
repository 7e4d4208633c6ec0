"""The production race: the last parent batch completes while a completion read taken before its
transaction commits says < 100 %. The listener recomputes AFTER the commit, so derived waves are
still created and dispatched.

The completing transaction is paused between its UPDATE and its COMMIT by a test-only trigger
that waits on an advisory lock the test holds; while it is paused, other connections read the
parent completion exactly as the old listener did (and as a concurrent coordinator run does).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
import pytest
from psycopg import sql

from helpers import (
    DERIVED_READY,
    LINE,
    MONITORING,
    SALES_ORDER,
    assert_complete,
    drive,
    expected_batches,
    flag_ttl,
    job_status,
    launched,
    lock_waiters,
    setup_job,
    tenant_conn,
    wait_until,
    waves,
)
from importwaves.db.queries import Q
from importwaves.engine.decide import decide
from importwaves.engine.model import Outcome
from importwaves.engine.notify import channel_for
from importwaves.engine.snapshot import gates, read_snapshot, read_waves
from importwaves.spec import ImportSpec
from importwaves.worker import EXIT_OK, WorkItem, run_batch

pytestmark = pytest.mark.integration

LOCK = 7_340_001
LAST_PARENT = "SalesOrder-000002"


def install_pause(dsn: str, tenant: str, batch_id: str) -> None:
    """Make the transaction that completes `batch_id` wait for advisory lock LOCK before it can
    commit (an AFTER trigger runs inside the completing transaction)."""
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION test_pause() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN PERFORM pg_advisory_xact_lock({lock}); RETURN NULL; END $$"
            ).format(lock=sql.Literal(LOCK))
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER test_pause AFTER UPDATE ON wave_batches FOR EACH ROW "
                "WHEN (NEW.batch_id = {b} AND NEW.status = 'completed' "
                "AND OLD.status <> 'completed') EXECUTE FUNCTION test_pause()"
            ).format(b=sql.Literal(batch_id))
        )


def read_parent_completion(dsn: str, tenant: str, spec: ImportSpec) -> tuple[float, bool, Any]:
    """What a pre-commit reader sees: parent completion percent, gate, and the decision."""
    with tenant_conn(dsn, tenant) as conn:
        gate = gates(spec, read_waves(conn, "job"))[0]
        job = conn.execute(Q("job_get"), {"job_id": "job"}).fetchone()
        decision = decide(read_snapshot(conn, job, spec))  # type: ignore[arg-type]
    return gate.percent, gate.open, decision


@pytest.mark.parametrize("completer", ["worker", "contract_sql"])
def test_last_parent_completion_with_stale_precommit_read_still_dispatches_derived(
    engine, dsn, tenant, redis_url, completer: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="importwaves.listener")
    ds, spec = setup_job(engine, "job")
    r = drive(engine, dsn, tenant, "job", run_if=lambda b: b.batch_id != LAST_PARENT)
    assert [b.batch_id for b in r.held] == [LAST_PARENT]
    last = r.held[0]
    install_pause(dsn, tenant, LAST_PARENT)

    if completer == "contract_sql":
        # A custom worker following the README's worker contract by hand: it claims the batch,
        # then (in complete() below) writes the rows and records its completion with their count
        # in one transaction; its exit 0 then reaches the listener, which only looks.
        with tenant_conn(dsn, tenant) as conn:
            claimed = conn.execute(
                Q("batch_claim"),
                {
                    "job_id": "job",
                    "batch_id": last.batch_id,
                    "dispatch_seq": last.dispatch_seq,
                    "worker_id": "pod-1",
                },
            ).fetchone()
            assert claimed is not None

    control = psycopg.connect(dsn, autocommit=True)
    control.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
    out: dict[str, Any] = {}

    def complete() -> None:
        try:
            if completer == "worker":
                out["worker"] = run_batch(
                    WorkItem(dsn, tenant, "job", last.batch_id, last.dispatch_seq)
                )
            else:
                key = {"job_id": "job", "batch_id": last.batch_id}
                with tenant_conn(dsn, tenant) as conn, conn.transaction():
                    written = conn.execute(
                        Q("import_transactions"),
                        {
                            **key,
                            "record_type_id": SALES_ORDER,
                            "ids": [int(x) for x in claimed["chunk_ids_json"]],
                        },
                    ).rowcount
                    done = conn.execute(
                        Q("batch_complete_notify"),
                        {
                            **key,
                            "dispatch_seq": last.dispatch_seq,
                            "rows_written": written,
                            "channel": channel_for(tenant),
                            "payload": "{}",
                        },
                    ).fetchone()
                    assert done is not None and done["record_count"] == written
        except BaseException as exc:  # pragma: no cover - reported below
            out["error"] = exc

    thread = threading.Thread(target=complete)
    thread.start()
    try:
        wait_until(lambda: lock_waiters(dsn, LOCK) == 1, what="completing transaction paused")
        # The completing transaction has updated the row but not committed. A reader now sees
        # the parents below 100 %, and deciding on that snapshot would dispatch no derived batch:
        # exactly the stale read that made production skip derived creation.
        percent, is_open, stale = read_parent_completion(dsn, tenant, spec)
        assert percent == pytest.approx(200 / 3)
        assert percent < 100 and not is_open
        assert not any(d.derived for d in stale.dispatches)
        assert stale.outcome == Outcome.IN_PROGRESS
        # A coordinator run racing with the commit sees the same and dispatches nothing.
        racing = engine.check("job", "tick")
        assert racing.outcome == Outcome.IN_PROGRESS and racing.dispatched == []
        assert launched(engine, LINE) == []
    finally:
        control.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
        control.close()
        thread.join(30)
    assert not thread.is_alive() and "error" not in out

    if completer == "worker":
        assert out["worker"].exit_code == EXIT_OK
        # The worker committed; now its completion event reaches the listener.
        out["result"] = engine.listener.on_completions("job", [last.batch_id])
    else:
        # The custom worker committed and exited 0: its Job's success reaches the listener.
        out["result"] = engine.listener.on_worker_exited_ok("job", last.batch_id, last.dispatch_seq)

    # After the commit the listener recomputed 100 %: derived batches exist and are dispatched.
    want = expected_batches(ds, spec)[LINE]
    w = waves(dsn, tenant, "job")
    assert w[SALES_ORDER]["completed_batches"] == w[SALES_ORDER]["total_batches"] == 3
    assert w[LINE]["total_batches"] == want
    assert w[LINE]["dispatched_batches"] == min(spec.parallelism, want)
    assert len(launched(engine, LINE)) == min(spec.parallelism, want)
    assert out["result"].outcome in (Outcome.DERIVED_WAVE_TRIGGERED, Outcome.DERIVED_PENDING)
    assert job_status(dsn, tenant, "job") == "running"
    assert flag_ttl(redis_url, tenant, "job", DERIVED_READY) > 0
    assert flag_ttl(redis_url, tenant, "job", MONITORING) > 0
    # ... and it was the listener's post-commit initialization that saw the parents at 100 %.
    inits = [rec.__dict__ for rec in caplog.records if rec.getMessage() == "derived_initialized"]
    assert [(i["parent_batch_id"], i["parent_completion_percent"]) for i in inits] == [
        (LAST_PARENT, 100.0)
    ]

    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)
