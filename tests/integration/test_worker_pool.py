"""Pooled workers on the real database (worker_pool.py, launch/local.py, Engine.sync_workers):
two workers never run the same batch; a killed worker's batch is failed after the grace and
finished by another; a custom worker command runs per batch under the per-batch contract (exit
0 recorded, exit 0 unrecorded, exit 1, exit 3); a worker exits 0 once its job is over; a
dispatch NOTIFY wakes an idle worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    CUSTOMER,
    assert_verified,
    batches,
    job_status,
    setup_job,
    small_spec,
    stage,
    tenant_conn,
    wait_until,
)
from importwaves.engine.app import Engine
from importwaves.engine.model import Outcome
from importwaves.engine.notify import channel_for, prompt_payload
from importwaves.launch.local import LocalLauncher
from importwaves.worker import ENV
from importwaves.worker_pool import EXIT_WITHOUT_COMPLETION, PooledWorker, PoolSettings

pytestmark = pytest.mark.integration


def _sizes(customer: int, order: int, line: int) -> dict[str, Any]:
    return {
        "recordTypes": [
            {"name": "Customer", "recordTypeId": CUSTOMER, "batchSize": customer},
            {
                "name": "SalesOrder",
                "recordTypeId": -30,
                "batchSize": order,
                "parentTypes": ["Customer"],
            },
        ],
        "derivedTypes": [
            {
                "name": "TransactionLine",
                "recordTypeId": -13,
                "batchSize": line,
                "parentTypes": ["SalesOrder"],
            }
        ],
    }


class Pool:
    """Pooled workers run in threads of this process (each its own connections)."""

    def __init__(self, dsn: str, tenant: str, job: str, n: int, **kw: Any) -> None:
        self.workers = [
            PooledWorker(PoolSettings(dsn, tenant, job, f"test:{i}", **kw)) for i in range(n)
        ]
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in self.workers]

    def _run(self, w: PooledWorker) -> None:
        try:
            w.run()
        except BaseException as exc:  # surfaced by join()
            self.errors.append(exc)

    def start(self) -> Pool:
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout: float = 30) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a pooled worker did not exit"
        assert not self.errors, self.errors

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.join()


def _coordinate(engine: Engine, job: str, timeout: float = 90) -> Outcome:
    """The host's part, by hand: look at the job until it is over (workers claim on NOTIFY)."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (
            (o := engine.check(job, "timer").outcome) in (Outcome.COMPLETED, Outcome.FAILED) and o
        ),
        timeout=timeout,
        every=0.02,
        what=f"job {job} to end",
    )


def test_two_pooled_workers_never_run_the_same_batch(engine, dsn, tenant) -> None:
    ds, spec = setup_job(engine, "job", orders=600, parallelism=4, **_sizes(10, 50, 200))
    pool = Pool(dsn, tenant, "job", 2, idle_seconds=20, poll=0.5).start()
    try:
        assert _coordinate(engine, "job") == Outcome.COMPLETED
    finally:
        pool.join()  # they exit by themselves: the job completed
    assert [w.stats.reason for w in pool.workers] == ["job completed", "job completed"]
    ran = [b for w in pool.workers for b in w.stats.batches]
    rows = batches(dsn, tenant, "job")
    assert len(rows) > 20
    assert not [b for b, n in Counter(ran).items() if n > 1], "a batch ran twice"
    assert sorted(ran) == sorted(r["batch_id"] for r in rows)
    assert all(w.stats.completed > 0 for w in pool.workers), "one worker did all the work"
    assert {(r["status"], r["attempts"], r["dispatch_seq"]) for r in rows} == {("completed", 1, 1)}
    assert_verified(dsn, tenant, "job", spec)
    assert sum(r["record_count"] for r in _counts(dsn, tenant)) == ds.customers + ds.orders + (
        ds.lines
    )


def _counts(dsn: str, tenant: str) -> list[dict[str, Any]]:
    with tenant_conn(dsn, tenant) as conn:
        return conn.execute(
            "SELECT count(*) AS record_count FROM customers UNION ALL "
            "SELECT count(*) FROM transactions UNION ALL SELECT count(*) FROM transaction_lines"
        ).fetchall()


def test_killed_pooled_worker_batch_is_failed_after_the_grace_and_finished_by_another(
    engines, dsn, tenant
) -> None:
    launcher = LocalLauncher(
        dsn, extra_env={"IMPORTWAVES_WORKER_HOLD_SECONDS": "1.5"}, idle_seconds=10
    )
    engine = engines(launcher=launcher, worker_grace=1.0)
    try:
        setup_job(engine, "job", orders=300, parallelism=2, **_sizes(10, 100, 500))
        assert engine.check("job", "start").dispatched  # the run's sync starts 2 workers
        assert launcher.live("job") == 2
        victim = wait_until(
            lambda: next((r for r in _held(dsn, tenant) if r["status"] == "processing"), None),
            timeout=30,
            what="a batch claimed by a pooled worker",
        )
        wid = victim["worker_id"]
        assert wid.startswith("local:") and wid in launcher.pids("job")
        os.kill(int(wid.split(":")[1]), signal.SIGKILL)

        lost: list[Any] = []

        def finished_by_another() -> bool:
            sync = engine.sync_workers("job")
            lost.extend(sync.lost)
            engine.check("job", "timer")
            row = next(
                r for r in batches(dsn, tenant, "job") if r["batch_id"] == victim["batch_id"]
            )
            return row["status"] == "completed"

        wait_until(finished_by_another, timeout=60, every=0.1, what="the lost batch to complete")
        assert [(x.batch_id, x.worker_id) for x in lost] == [(victim["batch_id"], wid)]
        assert lost[0].error == f"worker {wid} exited -9"
        with tenant_conn(dsn, tenant) as conn:
            row = conn.execute(
                "SELECT attempts, dispatch_seq, worker_id FROM wave_batches WHERE batch_id = %s",
                (victim["batch_id"],),
            ).fetchone()
        assert row is not None
        assert row["attempts"] == 2 and row["dispatch_seq"] == 2 and row["worker_id"] != wid
    finally:
        launcher.stop_all()


def _held(dsn: str, tenant: str) -> list[dict[str, Any]]:
    with tenant_conn(dsn, tenant) as conn:
        return conn.execute(
            "SELECT batch_id, status, worker_id FROM wave_batches "
            "WHERE status IN ('dispatched', 'processing') ORDER BY id"
        ).fetchall()


# -- a custom worker command, per batch ----------------------------------------------------------
SCRIPT = """
import os, sys
mode = sys.argv[1]
with open(sys.argv[2], "a") as f:
    f.write(" ".join([os.environ["IMPORTWAVES_BATCH_ID"], os.environ["IMPORTWAVES_DISPATCH_SEQ"],
                      os.environ["IMPORTWAVES_WORKER_ID"]]) + "\\n")
if mode == "real":
    os.execv(sys.executable, [sys.executable, "-m", "importwaves.worker"])
if mode == "one":
    print("cannot parse row 7 (dsn " + os.environ["IMPORTWAVES_DSN"] + ")", file=sys.stderr)
sys.exit({"zero": 0, "one": 1, "fenced": 3}[mode])
"""


@pytest.fixture
def command(tmp_path: Path) -> Any:
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    log = tmp_path / "runs.log"

    def make(mode: str) -> tuple[list[str], Path]:
        return [sys.executable, str(script), mode, str(log)], log

    return make


def _one_batch_job(engine: Engine) -> str:
    """A job whose first check dispatches exactly one Customer batch."""
    setup_job(engine, "job", orders=100, parallelism=1, retries=1, **_sizes(50, 100, 500))
    (b,) = engine.check("job", "start").dispatched
    return b.batch_id


def _run_custom(dsn: str, tenant: str, cmd: list[str]) -> PooledWorker:
    w = PooledWorker(
        PoolSettings(dsn, tenant, "job", "pool:9", idle_seconds=0.3, command=tuple(cmd))
    )
    w.run()
    return w


def _row(dsn: str, tenant: str, batch_id: str) -> dict[str, Any]:
    return next(r for r in batches(dsn, tenant, "job") if r["batch_id"] == batch_id)


def _worker_id(dsn: str, tenant: str, batch_id: str) -> str | None:
    with tenant_conn(dsn, tenant) as conn:
        row = conn.execute(
            "SELECT worker_id FROM wave_batches WHERE batch_id = %s", (batch_id,)
        ).fetchone()
    return None if row is None else row["worker_id"]


def test_custom_command_exit_0_with_its_completion_recorded(engine, dsn, tenant, command) -> None:
    bid = _one_batch_job(engine)
    cmd, log = command("real")
    w = _run_custom(dsn, tenant, cmd)
    assert (w.stats.completed, w.stats.failed, w.stats.fenced) == (1, 0, 0)
    assert log.read_text().split() == [bid, "1", "pool:9"]  # the per-batch env
    row = _row(dsn, tenant, bid)
    assert (row["status"], row["attempts"], row["dispatch_seq"]) == ("completed", 1, 1)
    # the command's claim kept the reservation's worker id: the engine watches the pooled worker
    assert _worker_id(dsn, tenant, bid) == "pool:9"


def test_custom_command_exit_0_without_a_completion_is_a_failed_attempt(
    engine, dsn, tenant, command
) -> None:
    bid = _one_batch_job(engine)
    w = _run_custom(dsn, tenant, command("zero")[0])
    assert (w.stats.completed, w.stats.failed) == (0, 1)
    row = _row(dsn, tenant, bid)
    assert (row["status"], row["attempts"], row["last_error"]) == (
        "pending",
        1,
        EXIT_WITHOUT_COMPLETION,
    )


def test_custom_command_exit_1_records_its_stderr_redacted(engine, dsn, tenant, command) -> None:
    bid = _one_batch_job(engine)
    w = _run_custom(dsn, tenant, command("one")[0])
    assert w.stats.failed == 1
    row = _row(dsn, tenant, bid)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert row["last_error"].startswith("worker command exited 1: cannot parse row 7 (dsn ")
    assert dsn not in row["last_error"]


def test_custom_command_exit_3_is_fenced_and_records_nothing(engine, dsn, tenant, command) -> None:
    bid = _one_batch_job(engine)
    w = _run_custom(dsn, tenant, command("fenced")[0])
    assert (w.stats.fenced, w.stats.failed, w.stats.completed) == (1, 0, 0)
    row = _row(dsn, tenant, bid)
    # still this dispatch, reserved by the pooled worker (no other pooled worker takes it); the
    # engine fails it once that worker is gone (or recovery requeues it)
    assert (row["status"], row["attempts"], row["last_error"]) == ("dispatched", 0, None)
    assert _worker_id(dsn, tenant, bid) == "pool:9"
    sync = engine.sync_workers("job")  # a recording launcher sees no worker: incomplete
    assert sync.lost == []


def test_a_hung_custom_command_is_stopped_once_its_dispatch_moves_on(
    engine, dsn, tenant, tmp_path
) -> None:
    """A command that hangs before claiming: once its dispatch is requeued and dispatched again
    (a newer fencing token), the pooled worker's beat stops it as fenced out, and the worker
    goes on with the new dispatch instead of waiting on it."""
    bid = _one_batch_job(engine)
    started = tmp_path / "started"
    hang_first = (
        "import os, sys, time\n"
        f"open({str(started)!r} + os.environ['IMPORTWAVES_DISPATCH_SEQ'], 'w').close()\n"
        "if os.environ['IMPORTWAVES_DISPATCH_SEQ'] == '1':\n"
        "    os.system('sleep 300')  # a child holding stderr open, as a shell's sleep does\n"
        "sys.exit(3)\n"
    )
    w = PooledWorker(
        PoolSettings(
            dsn,
            tenant,
            "job",
            "pool:9",
            idle_seconds=0.3,
            command=(sys.executable, "-c", hang_first),
        )
    )
    t = threading.Thread(target=w.run)
    t.start()
    wait_until((tmp_path / "started1").exists, timeout=30, what="the command to start")
    with tenant_conn(dsn, tenant) as conn:  # recovery's requeue, then the next dispatch
        conn.execute(
            "UPDATE wave_batches SET status = 'dispatched', dispatch_seq = dispatch_seq + 1, "
            "worker_id = NULL WHERE batch_id = %s",
            (bid,),
        )
    t.join(60)
    assert not t.is_alive(), "the worker still waits on its fenced-out command"
    # the hung command was stopped (fenced); the new dispatch ran (and said fenced: exit 3)
    assert (tmp_path / "started2").exists()
    assert (w.stats.fenced, w.stats.failed, w.stats.completed) == (2, 0, 0)
    row = _row(dsn, tenant, bid)
    assert (row["status"], row["dispatch_seq"], row["attempts"]) == ("dispatched", 2, 0)


def test_local_runner_with_a_custom_command_completes_the_import(engines, dsn, tenant) -> None:
    """The custom command is the reference worker itself: run per batch by pooled workers."""
    launcher = LocalLauncher(dsn, command=[sys.executable, "-m", "importwaves.worker"])
    engine = engines(launcher=launcher)
    from importwaves.runner import LocalRunner

    try:
        _, spec = setup_job(engine, "job", orders=300, parallelism=3)
        stats = LocalRunner(engine, tick=0.2).run("job", timeout=120)
        assert stats.status == "completed"
        assert stats.worker_failures == 0
        assert launcher.started <= spec.parallelism + 1
        assert_verified(dsn, tenant, "job", spec)
    finally:
        launcher.stop_all()


# -- exit and wake-up rules ----------------------------------------------------------------------
def test_worker_process_exits_0_when_its_job_is_over(engine, dsn, tenant) -> None:
    setup_job(engine, "job", orders=300, parallelism=2)
    pool = Pool(dsn, tenant, "job", 1, idle_seconds=30, poll=5).start()
    try:
        assert _coordinate(engine, "job") == Outcome.COMPLETED
    finally:
        pool.join(timeout=10)  # woken by the completing run's status NOTIFY, not the 30 s idle
    assert pool.workers[0].stats.reason == "job completed"
    env = {
        **os.environ,
        ENV["dsn"]: dsn,
        ENV["tenant"]: tenant,
        ENV["job_id"]: "job",
    }
    done = subprocess.run(
        [sys.executable, "-m", "importwaves.worker_pool"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "job completed" in done.stdout
    gone = subprocess.run(
        [sys.executable, "-m", "importwaves.worker_pool"],
        env={**env, ENV["job_id"]: "no-such-job"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert gone.returncode == 0 and "job gone" in gone.stdout


def test_worker_exits_0_after_its_idle_timeout(engine, dsn, tenant) -> None:
    setup_job(engine, "job", orders=100)
    w = PooledWorker(PoolSettings(dsn, tenant, "job", "idle:1", idle_seconds=0.5, poll=0.1))
    assert w.run().reason == "idle"
    assert job_status(dsn, tenant, "job") == "running"


def test_a_dispatch_notify_wakes_an_idle_worker(engine, dsn, tenant) -> None:
    stage(dsn, tenant, "job", orders=100)
    assert engine.submit("job", small_spec(tenant, parallelism=1))
    # a 60 s poll: only the dispatch NOTIFY can wake it in time
    pool = Pool(dsn, tenant, "job", 1, idle_seconds=120, poll=60).start()
    try:
        wait_until(pool.workers[0].waiting.is_set, timeout=30, what="the worker to be idle")
        (b,) = engine.check("job", "start").dispatched
        wait_until(
            lambda: _row(dsn, tenant, b.batch_id)["status"] == "completed",
            timeout=10,
            what="the idle worker to claim and complete the dispatched batch",
        )
        assert pool.workers[0].stats.batches == [b.batch_id]
    finally:
        pool.stop()


def test_an_idle_worker_wakes_for_its_jobs_prompts_only(engine, dsn, tenant) -> None:
    stage(dsn, tenant, "job", orders=100)
    assert engine.submit("job", small_spec(tenant, parallelism=1))
    # a 60 s poll: in this test every look but the first is a notice's doing
    pool = Pool(dsn, tenant, "job", 1, idle_seconds=120, poll=60).start()
    worker = pool.workers[0]
    channel = channel_for(tenant)
    try:
        wait_until(worker.waiting.is_set, timeout=30, what="the worker to be idle")
        assert worker.stats.looks == 1
        with tenant_conn(dsn, tenant) as conn:
            for i in range(20):  # other workers' completions: the engine's notices
                conn.execute(
                    "SELECT pg_notify(%s, %s)",
                    (
                        channel,
                        json.dumps(
                            {
                                "tenant": tenant,
                                "job_id": "job",
                                "batch_id": f"Customer-{i:06d}",
                                "dispatch_seq": 1,
                            }
                        ),
                    ),
                )
            for kind, job in (("failed", "job"), ("dispatched", "other"), ("status", "other")):
                conn.execute(
                    "SELECT pg_notify(%s, %s)", (channel, prompt_payload(kind, tenant, job))
                )
            # then its job's dispatch prompt: delivered after the others, on one connection
            conn.execute(
                "SELECT pg_notify(%s, %s)", (channel, prompt_payload("dispatched", tenant, "job"))
            )
        wait_until(
            lambda: worker.stats.looks >= 2 and worker.waiting.is_set(),
            timeout=10,
            what="the dispatch prompt to wake the worker, and the worker to wait again",
        )
        assert worker.stats.looks == 2  # the 23 notices before the prompt woke it for nothing
        with tenant_conn(dsn, tenant) as conn:
            conn.execute(
                "SELECT pg_notify(%s, %s)", (channel, prompt_payload("status", tenant, "job"))
            )
        wait_until(lambda: worker.stats.looks == 3, timeout=10, what="a status prompt to wake it")
    finally:
        pool.stop()


def test_restarted_runner_fails_a_dead_local_workers_batch_at_once(engines, dsn, tenant) -> None:
    """issue 13: a runner killed with its workers leaves a batch `processing` under
    `local:<pid>`; the next runner's first worker sync sees that pid is no longer a worker on
    this machine and fails the attempt (not staleAfterSeconds later, 300 s here), and the
    import completes."""
    launcher = LocalLauncher(dsn)
    engine = engines(launcher=launcher)
    from importwaves.runner import LocalRunner

    try:
        _, spec = setup_job(engine, "job", orders=300, parallelism=2, staleAfterSeconds=300)
        engine.check("job", "start")
        dead = subprocess.Popen(["true"])  # a pid that is no more
        dead.wait()
        wid = f"local:{dead.pid}"
        with tenant_conn(dsn, tenant) as conn:
            claimed = conn.execute(
                "UPDATE wave_batches SET status = 'processing', attempts = attempts + 1, "
                "worker_id = %s, started_at = clock_timestamp() - interval '10 seconds', "
                "heartbeat_at = clock_timestamp() - interval '10 seconds' "
                "WHERE id = (SELECT id FROM wave_batches WHERE status = 'dispatched' "
                "ORDER BY id LIMIT 1) RETURNING batch_id",
                (wid,),
            ).fetchone()
        assert claimed is not None
        stats = LocalRunner(engine, tick=0.2).run("job", timeout=120)
        assert stats.status == "completed"
        row = _row(dsn, tenant, claimed["batch_id"])
        assert (row["status"], row["attempts"]) == ("completed", 2)
        assert_verified(dsn, tenant, "job", spec)
    finally:
        launcher.stop_all()


def test_queued_completions_are_looked_at_in_one_run(engine, dsn, tenant) -> None:
    """The runner hands every completion queued at once to one coordinator run: it creates the
    derived batches of all the completed parents and dispatches what they unblock."""
    from importwaves.worker import EXIT_OK, WorkItem, run_batch

    setup_job(engine, "job", orders=400, parallelism=8, **_sizes(100, 100, 1000))
    res = engine.check("job", "start")
    for _ in range(3):  # Customer, then SalesOrder, then the derived lines
        assert res.dispatched
        for b in res.dispatched:
            item = WorkItem(dsn, tenant, "job", b.batch_id, b.dispatch_seq)
            assert run_batch(item).exit_code == EXIT_OK
        res = engine.on_completions("job", [b.batch_id for b in res.dispatched])
        if res.outcome == Outcome.COMPLETED:
            break
    assert res.outcome == Outcome.COMPLETED
    rows = batches(dsn, tenant, "job")
    parents = [r for r in rows if r["record_type_id"] == -30]
    lines = [r for r in rows if r["record_type_id"] == -13]
    assert len(parents) == 4 and lines and not [r for r in parents if r["needs_derivation"]]
    assert {r["status"] for r in rows} == {"completed"}


def test_a_main_waves_worker_exits_0_once_its_wave_is_finished(engine, dsn, tenant) -> None:
    """Issue 12, row 8: a wave's pooled worker (one work-queue Job per wave on Kubernetes) exits
    0 once its main wave has no batch left to run, while the job still runs, instead of waking
    on every NOTIFY of the later waves until its idle timeout; a derived wave's worker (its
    wave grows while the parents complete) waits for the job's end."""
    setup_job(engine, "job", orders=300, parallelism=2, **_sizes(10, 50, 200))
    engine.check("job", "start")  # planned; wave 1 dispatched
    with tenant_conn(dsn, tenant) as conn:
        waves = {
            r["record_type_id"]: r["wave_number"]
            for r in conn.execute(
                "SELECT record_type_id, wave_number FROM wave_coordination WHERE job_id = 'job'"
            ).fetchall()
        }
    first = Pool(dsn, tenant, "job", 2, wave=waves[CUSTOMER], idle_seconds=120, poll=60).start()
    derived = Pool(dsn, tenant, "job", 1, wave=waves[-13], idle_seconds=120, poll=60).start()
    try:
        wait_until(
            lambda: engine.check("job", "timer") and not any(t.is_alive() for t in first.threads),
            timeout=30,
            every=0.05,
            what="the Customer wave's workers to exit (their wave finished, the job running)",
        )
        first.join(timeout=1)
        assert {w.stats.reason for w in first.workers} == {f"wave {waves[CUSTOMER]} finished"}
        assert job_status(dsn, tenant, "job") == "running"
        assert all(t.is_alive() for t in derived.threads), "the derived wave's worker exited"
        second = Pool(dsn, tenant, "job", 2, wave=waves[-30], idle_seconds=120, poll=60).start()
        assert _coordinate(engine, "job") == Outcome.COMPLETED
        second.join(timeout=10)
        derived.join(timeout=10)
        assert {w.stats.reason for w in second.workers} <= {
            f"wave {waves[-30]} finished",
            "job completed",
        }
        assert [w.stats.reason for w in derived.workers] == ["job completed"]
        assert derived.workers[0].stats.completed > 0
    finally:
        for p in (first, derived):
            for w in p.workers:
                w.stop()
