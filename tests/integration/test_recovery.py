"""Recovery: a worker killed mid-batch, a dispatch nobody claimed, failed batches and retries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from helpers import (
    CUSTOMER,
    LINE,
    MONITORING,
    SALES_ORDER,
    TrackingLauncher,
    assert_complete,
    assert_verified,
    batches,
    counters_mismatch,
    drive,
    expected_batches,
    flag_ttl,
    job_status,
    launched,
    rows_by_type,
    setup_job,
    tenant_conn,
    wait_until,
    waves,
)
from importwaves.db.queries import Q
from importwaves.engine.model import Outcome
from importwaves.launch.port import LaunchProblem, LaunchTarget, WorkerGroup
from importwaves.worker import ENV, EXIT_FENCED, EXIT_OK, WorkItem, run_batch

pytestmark = pytest.mark.integration


def batch_row(dsn: str, tenant: str, batch_id: str) -> dict[str, Any]:
    return next(b for b in batches(dsn, tenant, "job") if b["batch_id"] == batch_id)


def start_worker(dsn: str, tenant: str, b: Any, hold: float) -> subprocess.Popen[bytes]:
    """The real worker process (`python -m importwaves.worker`), holding its claim `hold` s."""
    env = {
        **os.environ,
        ENV["dsn"]: dsn,
        ENV["tenant"]: tenant,
        ENV["job_id"]: "job",
        ENV["batch_id"]: b.batch_id,
        ENV["dispatch_seq"]: str(b.dispatch_seq),
        "IMPORTWAVES_WORKER_HOLD_SECONDS": str(hold),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "importwaves.worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_killed_worker_is_requeued_by_reconcile_and_the_import_completes(
    engine, dsn, tenant, redis_url
) -> None:
    """Three Customer batches run. One worker is SIGKILLed mid-batch, one is frozen (SIGSTOP)
    mid-batch, and one (started first) stays alive, heartbeating for longer than
    staleAfterSeconds. Reconcile requeues exactly the dead and the frozen one; the frozen one,
    thawed, is fenced out; the import completes."""
    ds, spec = setup_job(engine, "job", orders=1500, staleAfterSeconds=5)
    alive_b, killed_b, frozen_b = engine.check("job", "start").dispatched
    assert {alive_b.record_type_id, killed_b.record_type_id, frozen_b.record_type_id} == {CUSTOMER}
    engine.launcher.drive_cursor = 3  # these first dispatches are run by hand below
    alive: dict[str, Any] = {}
    alive_thread = threading.Thread(
        target=lambda: alive.update(
            result=run_batch(
                WorkItem(dsn, tenant, "job", alive_b.batch_id, alive_b.dispatch_seq),
                hold_seconds=7.5,
                heartbeat_every=0.5,
            )
        )
    )
    alive_thread.start()
    killed = start_worker(dsn, tenant, killed_b, hold=30)
    frozen = start_worker(dsn, tenant, frozen_b, hold=4)
    try:
        for b in (killed_b, frozen_b):
            wait_until(
                lambda b=b: batch_row(dsn, tenant, b.batch_id)["status"] == "processing",
                timeout=20,
                what="the workers to claim their batches",
            )
        frozen.send_signal(signal.SIGSTOP)
    finally:
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(10) == -signal.SIGKILL
    try:
        for b in (killed_b, frozen_b):
            claimed = batch_row(dsn, tenant, b.batch_id)
            assert (claimed["status"], claimed["attempts"], claimed["dispatch_seq"]) == (
                "processing",
                1,
                1,
            )

        # Heartbeats still fresh: reconcile touches nothing.
        early = engine.recovery.reconcile("job")
        assert early.demoted == early.requeued == early.failed == 0
        assert early.result is not None and early.result.dispatched == []

        # Once their heartbeat is older than staleAfterSeconds the two show as stuck ...
        def stuck() -> list[str]:
            with tenant_conn(dsn, tenant) as conn:
                rows = conn.execute(
                    Q("batches_stuck"), {"job_id": "job", "stale_after": 5, "claim_timeout": 5}
                ).fetchall()
            return sorted(r["batch_id"] for r in rows)

        both = sorted([killed_b.batch_id, frozen_b.batch_id])
        wait_until(lambda: stuck() == both, timeout=15, every=0.1, what="two stale batches")
        # (the live worker claimed first but keeps its heartbeat fresh: it is not stuck)
        # ... and reconcile demotes them, says so, and dispatches them again at once.
        report = engine.recovery.reconcile("job")
        assert report.demoted == 2 and report.failed == 0
        for b in (killed_b, frozen_b):
            assert any(
                a.startswith(f"demoted batch {b.batch_id} processing -> pending")
                for a in report.actions
            ), report.actions
            assert "stale: no heartbeat" in (batch_row(dsn, tenant, b.batch_id)["last_error"])
        assert "catch-up dispatch of 2 batch(es)" in report.actions
        assert "refreshed the wave_monitoring_active flag" in report.actions
        assert report.result is not None
        assert sorted((x.batch_id, x.dispatch_seq) for x in report.result.dispatched) == [
            (both[0], 2),
            (both[1], 2),
        ]
    finally:
        frozen.send_signal(signal.SIGCONT)
    # The thawed worker finds its dispatch superseded: fenced out, nothing done.
    assert frozen.wait(20) == EXIT_FENCED
    # So would the killed one, if it ever came back.
    late = run_batch(WorkItem(dsn, tenant, "job", killed_b.batch_id, killed_b.dispatch_seq))
    assert late.exit_code == EXIT_FENCED

    alive_thread.join(20)
    assert alive["result"].exit_code == EXIT_OK
    assert engine.listener.on_completions("job", [alive_b.batch_id])
    assert batch_row(dsn, tenant, alive_b.batch_id)["attempts"] == 1  # never requeued

    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    for b in (killed_b, frozen_b):
        final = batch_row(dsn, tenant, b.batch_id)
        assert (final["status"], final["attempts"], final["dispatch_seq"]) == ("completed", 2, 2)
    assert_complete(engine, "job", ds, spec)


def test_stale_claim_on_last_attempt_fails_and_retry_failed_resumes(
    engine, dsn, tenant, redis_url
) -> None:
    ds, spec = setup_job(engine, "job", staleAfterSeconds=5, retries=0)
    (b,) = engine.check("job", "start").dispatched
    with tenant_conn(dsn, tenant) as conn:
        claimed = conn.execute(
            Q("batch_claim"),
            {
                "job_id": "job",
                "batch_id": b.batch_id,
                "dispatch_seq": b.dispatch_seq,
                "worker_id": "lost-pod",
            },
        ).fetchone()
        assert claimed is not None and claimed["attempts"] == 1
        # the worker died 10 s ago (heartbeats change no status: counters are untouched)
        conn.execute(
            "UPDATE wave_batches SET heartbeat_at = heartbeat_at - interval '10 s', "
            "started_at = started_at - interval '10 s' WHERE batch_id = %s",
            (b.batch_id,),
        )
    report = engine.recovery.reconcile("job")
    assert report.failed == 1 and report.demoted == 0
    assert any("no attempts left (1/1)" in a for a in report.actions), report.actions
    assert report.result is not None and report.result.outcome == Outcome.FAILED
    assert job_status(dsn, tenant, "job") == "failed"
    assert flag_ttl(redis_url, tenant, "job", MONITORING) == -2
    row = batch_row(dsn, tenant, b.batch_id)
    assert row["status"] == "failed" and "worker lost-pod" in row["last_error"]

    retry = engine.recovery.retry_failed("job")
    assert retry.requeued == 1
    assert retry.actions == [f"requeued failed batch {b.batch_id}"]
    assert retry.result is not None and retry.result.outcome == Outcome.WAVE_TRIGGERED
    assert job_status(dsn, tenant, "job") == "running"
    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    assert_complete(engine, "job", ds, spec)


def test_dispatch_nobody_claimed_is_requeued(engine, dsn, tenant, redis_url) -> None:
    ds, spec = setup_job(engine, "job", staleAfterSeconds=5)
    (b,) = engine.check("job", "start").dispatched
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "UPDATE wave_batches SET dispatched_at = dispatched_at - interval '10 s' "
            "WHERE batch_id = %s",
            (b.batch_id,),
        )
    report = engine.recovery.reconcile("job")
    assert report.requeued == 1
    assert any(
        a.startswith(f"requeued batch {b.batch_id} dispatched -> pending") for a in report.actions
    )
    assert report.result is not None
    assert [(x.batch_id, x.dispatch_seq) for x in report.result.dispatched] == [(b.batch_id, 2)]
    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    # the lost launch counted an attempt (so lost launches cannot loop forever), then the
    # worker's claim counted the second
    assert batch_row(dsn, tenant, b.batch_id)["attempts"] == 2
    assert_complete(engine, "job", ds, spec)


BAD_DATA = {
    # name: (record type, record id, breaking SQL, fixing SQL, expected problem)
    "order_without_amount": (
        SALES_ORDER,
        150,
        "UPDATE staging_records SET payload = payload - 'amount' WHERE record_type_id = -30 "
        "AND record_id = 150",
        'UPDATE staging_records SET payload = payload || \'{"amount": "1.00"}\' '
        "WHERE record_type_id = -30 AND record_id = 150",
        "record 150: missing amount",
    ),
    "order_of_unknown_customer": (
        SALES_ORDER,
        250,
        "UPDATE staging_records SET parent_id = 999999 WHERE record_type_id = -30 "
        "AND record_id = 250",
        "UPDATE staging_records SET parent_id = 1 WHERE record_type_id = -30 AND record_id = 250",
        "record 250: parent customer 999999 not imported",
    ),
    "line_with_bad_amount": (
        LINE,
        42,
        'UPDATE staging_records SET payload = payload || \'{"amount": "lots"}\' '
        "WHERE record_type_id = -13 AND record_id = 42",
        'UPDATE staging_records SET payload = payload || \'{"amount": "2.50"}\' '
        "WHERE record_type_id = -13 AND record_id = 42",
        "record 42: amount is not a number",
    ),
    # The parents were imported, then order 5's transaction disappeared before its lines ran
    # (breaking SQL applied once every SalesOrder batch completed; lines 21..29 are order 5's).
    "line_whose_parent_transaction_is_missing": (
        LINE,
        21,
        "DELETE FROM transactions WHERE id = 5",
        "INSERT INTO transactions (id, record_type_id, customer_id, amount, payload, "
        "imported_job) SELECT record_id, record_type_id, parent_id, "
        "(payload ->> 'amount')::numeric, payload, job_id FROM staging_records "
        "WHERE record_type_id = -30 AND record_id = 5",
        "record 21: parent transaction 5 not imported",
    ),
}
AFTER_PARENTS = {"line_whose_parent_transaction_is_missing"}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_row_fails_its_batch_at_once_then_the_job_and_retry_failed_completes_it(
    engine, dsn, tenant, redis_url, case: str
) -> None:
    rid, record_id, breaking, fixing, problem = BAD_DATA[case]
    ds, spec = setup_job(engine, "job", retries=2)
    broken = []

    def break_data(_n: int = 0, _run: Any = None) -> None:
        if broken:
            return
        if case in AFTER_PARENTS:
            so = waves(dsn, tenant, "job").get(SALES_ORDER)
            if not so or so["completed_batches"] < so["total_batches"]:
                return
        with tenant_conn(dsn, tenant) as conn:
            assert conn.execute(breaking).rowcount == 1
        broken.append(True)

    if case not in AFTER_PARENTS:
        break_data()
    r = drive(engine, dsn, tenant, "job", after_step=break_data)
    assert broken
    assert r.outcome == Outcome.FAILED
    assert job_status(dsn, tenant, "job") == "failed"
    assert flag_ttl(redis_url, tenant, "job", MONITORING) == -2

    failed = [b for b in batches(dsn, tenant, "job") if b["status"] == "failed"]
    assert len(failed) == 1
    bad = failed[0]
    assert bad["record_type_id"] == rid
    # bad staging data fails every attempt alike: failed at the first (retries=2 unused)
    assert bad["attempts"] == 1 < spec.max_attempts == 3
    assert bad["dispatch_seq"] == 1
    assert bad["last_error"].startswith("non-retryable: BatchDataError")
    assert f"record {record_id}:" in bad["last_error"]  # the error names the record
    assert problem in bad["last_error"]
    attempts = [x.dispatch_seq for x in launched(engine) if x.batch_id == bad["batch_id"]]
    assert attempts == [1]  # not retried
    failing_runs = [run for run in r.runs if run.batch.batch_id == bad["batch_id"]]
    assert [run.worker.exit_code for run in failing_runs if run.worker] == [1]
    with tenant_conn(dsn, tenant) as conn:
        assert conn.execute(Q("orphan_lines"), {"job_id": "job"}).fetchone()["n"] == 0
        if rid == SALES_ORDER:  # parent-first: no line of any order before the parents finish
            lines = conn.execute(Q("target_counts"), {"job_id": "job"}).fetchall()
            assert {x["target"]: x["n"] for x in lines}["transaction_lines"] == 0

    with tenant_conn(dsn, tenant) as conn:
        assert conn.execute(fixing).rowcount == 1
    retry = engine.recovery.retry_failed("job")
    assert retry.requeued == 1
    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    row = batch_row(dsn, tenant, bad["batch_id"])
    assert (row["status"], row["attempts"], row["dispatch_seq"]) == ("completed", 1, 2)
    assert_complete(engine, "job", ds, spec)


class FirstEnsureFails(TrackingLauncher):
    """A worker launcher (one group per wave) whose first start of every wave's workers is
    refused for good: the engine fails the attempt of that wave's dispatched batches."""

    per_wave = True

    def __init__(self, dsn: str, tenant: str) -> None:
        super().__init__(dsn, tenant)
        self.refused: set[int] = set()

    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        out = []
        for g in groups:
            assert g.wave_number is not None and g.size > 0
            if g.wave_number not in self.refused:
                self.refused.add(g.wave_number)
                out.append(LaunchProblem(g, "no capacity", permanent=True))
        return out


class TransientEnsureFails(TrackingLauncher):
    """A worker launcher whose starts all fail transiently (an API hiccup)."""

    def __init__(self, dsn: str, tenant: str) -> None:
        super().__init__(dsn, tenant)
        self.tries = 0

    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        self.tries += 1
        return [LaunchProblem(g, "503 Service Unavailable", permanent=False) for g in groups]


def test_permanent_launch_problems_count_an_attempt_and_are_dispatched_again(
    engines, dsn, tenant, redis_url
) -> None:
    launcher = FirstEnsureFails(dsn, tenant)
    engine = engines(launcher=launcher)
    ds, spec = setup_job(engine, "job")
    first = engine.check("job", "start").dispatched
    refused = {r["batch_id"]: r for r in batches(dsn, tenant, "job")}
    assert first and {
        (refused[b.batch_id]["status"], refused[b.batch_id]["attempts"]) for b in first
    } == {("pending", 1)}
    assert {refused[b.batch_id]["last_error"] for b in first} == {"launch failed: no capacity"}
    assert drive(engine, dsn, tenant, "job").outcome == Outcome.COMPLETED
    rows = batches(dsn, tenant, "job")
    # every wave's first workers were refused: the batches dispatched then lost an attempt
    assert launcher.refused == {1, 2, 3}
    twice = [r for r in rows if r["attempts"] == 2]
    assert twice, "no batch lost an attempt to a refused launch"
    assert {(r["status"], r["dispatch_seq"]) for r in twice} == {("completed", 2)}
    assert {(r["status"], r["attempts"], r["dispatch_seq"]) for r in rows if r not in twice} == {
        ("completed", 1, 1)
    }
    assert dict(rows_by_type(dsn, tenant, "job")) == expected_batches(ds, spec)
    assert counters_mismatch(dsn, tenant, "job") == []
    assert_verified(dsn, tenant, "job", spec)


def test_transient_launch_problems_leave_batches_dispatched_and_retry_at_the_next_sync(
    engines, dsn, tenant, redis_url
) -> None:
    launcher = TransientEnsureFails(dsn, tenant)
    engine = engines(launcher=launcher)
    setup_job(engine, "job")
    first = engine.check("job", "start").dispatched
    assert first and launcher.tries == 1
    sync = engine.sync_workers("job")
    assert launcher.tries == 2 and [p.permanent for p in sync.problems] == [False]
    assert sync.launch_failed == 0
    rows = {r["batch_id"]: r for r in batches(dsn, tenant, "job")}
    assert {(rows[b.batch_id]["status"], rows[b.batch_id]["attempts"]) for b in first} == {
        ("dispatched", 0)
    }
