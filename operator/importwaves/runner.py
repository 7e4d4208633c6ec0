"""Run one import locally: the engine, a local launcher and a timer, in one event loop.

The same stimuli as in the operator, on one thread: a worker's completion NOTIFY (delivered at
its commit, engine/notify.py) or, as the backstop, its process exit makes the batch-completed
listener look at the database (a notice records nothing; an exit 0 whose dispatch recorded no
completion counts a failed attempt); a timer tick nudges `check_and_trigger_next_wave`; a
periodic sweep runs recovery. An `invalid` import (planning refused: no staging rows, or rows no
batch can cover) ends the local run at once with that status.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from importwaves import redact
from importwaves.db.queries import Q
from importwaves.engine.app import Engine
from importwaves.engine.jobrow import load_job
from importwaves.engine.model import Outcome
from importwaves.engine.notify import Completion, CompletionListener
from importwaves.launch.base import BatchDispatch
from importwaves.launch.local import Finished, LocalLauncher
from importwaves.log import event
from importwaves.worker import EXIT_FENCED, EXIT_OK

log = logging.getLogger("importwaves.runner")

TERMINAL = {Outcome.COMPLETED, Outcome.FAILED, Outcome.NOT_FOUND, Outcome.INVALID}


@dataclass
class RunStats:
    status: str
    seconds: float
    worker_runs: int
    worker_failures: int
    #: completions that reached the listener by NOTIFY (at commit) rather than by process exit
    notified: int = 0


class LocalRunner:
    def __init__(
        self,
        engine: Engine,
        launcher: LocalLauncher,
        *,
        tick: float = 1.0,
        sweep_every: float | None = None,
        poll: float = 0.005,
        notify: bool = True,
        max_backoff: float = 5.0,
    ) -> None:
        self.engine = engine
        self.launcher = launcher
        self.tick = tick
        self.sweep_every = sweep_every
        self.poll = poll
        self.notify = notify
        self.max_backoff = max_backoff

    def run(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[], None] | None = None,
        progress_every: float = 0.25,
    ) -> RunStats:
        t0 = time.monotonic()
        notified: queue.Queue[Completion] = queue.Queue()
        handled: set[tuple[str, int]] = set()
        listener = (
            CompletionListener(
                self.engine.dsn, self.engine.tenant, notified.put, poll=0.2, opts=self.engine.opts
            ).start()
            if self.notify
            else None
        )
        try:
            return self._loop(job_id, t0, notified, handled, timeout, on_progress, progress_every)
        finally:
            if listener is not None:
                listener.stop()

    def _loop(
        self,
        job_id: str,
        t0: float,
        notified: queue.Queue[Completion],
        handled: set[tuple[str, int]],
        timeout: float | None,
        on_progress: Callable[[], None] | None,
        progress_every: float,
    ) -> RunStats:
        runs = failures = by_notify = 0
        outcome = Outcome.IN_PROGRESS
        started = False
        #: results taken from workers (or NOTIFYs) and not recorded yet: the database was away
        undelivered: list[Completion | Finished] = []
        outage = 0
        last_tick = last_sweep = last_progress = time.monotonic()
        while True:
            try:
                if not started:
                    outcome = self.engine.check(job_id, cause="start").outcome
                    self.adopt_dispatched(job_id)
                    started = True
                while not notified.empty():  # completions, the moment they commit
                    undelivered.append(notified.get_nowait())
                undelivered += self.launcher.poll()
                while undelivered:
                    got, ran, failed, by_note = self._deliver(job_id, undelivered[0], handled)
                    undelivered.pop(0)
                    outcome = got or outcome
                    runs, failures, by_notify = runs + ran, failures + failed, by_notify + by_note
                now = time.monotonic()
                if now - last_tick >= self.tick:
                    last_tick = now
                    outcome = self.engine.check(job_id, cause="timer").outcome
                    self.adopt_dispatched(job_id)
                    self.engine.update_gauges()
                if self.sweep_every is not None and now - last_sweep >= self.sweep_every:
                    last_sweep = now
                    swept = self.engine.recovery.reconcile(job_id, cause="sweep").result
                    outcome = swept.outcome if swept else outcome
                if on_progress is not None and now - last_progress >= progress_every:
                    last_progress = now
                    on_progress()
                if outage:
                    event(log, "database_available_again", job_id=job_id, retries=outage)
                    outage = 0
            except psycopg.OperationalError as exc:
                # The tenant database is away (restarting, failing over, unreachable): nothing
                # was lost (every step is a transaction, every delivery idempotent); retry the
                # same steps with back-off until it is back or the timeout ends the run.
                outage += 1
                delay = min(self.max_backoff, 0.25 * 2 ** min(outage, 8))
                event(
                    log,
                    "database_unavailable",
                    logging.WARNING,
                    job_id=job_id,
                    attempt=outage,
                    retry_in=delay,
                    error=redact.describe(exc, "the tenant database").message,
                )
                self._check_timeout(job_id, t0, timeout, outcome)
                time.sleep(delay)
                continue
            if outcome in TERMINAL and not self.launcher.running(job_id):
                break
            self._check_timeout(job_id, t0, timeout, outcome)
            time.sleep(self.poll)
        if on_progress is not None:
            on_progress()
        return RunStats(outcome.value, time.monotonic() - t0, runs, failures, by_notify)

    def _check_timeout(
        self, job_id: str, t0: float, timeout: float | None, outcome: Outcome
    ) -> None:
        if timeout is not None and time.monotonic() - t0 > timeout:
            self.launcher.stop_all()
            raise TimeoutError(
                f"import {job_id} did not finish within {timeout}s (last outcome {outcome.value})"
            )

    def _deliver(
        self, job_id: str, item: Completion | Finished, handled: set[tuple[str, int]]
    ) -> tuple[Outcome | None, int, int, int]:
        """Record one NOTIFY or one finished worker with the listener (idempotent: it may be
        delivered again after a database error). Returns (outcome or None, worker runs,
        failures, completions by NOTIFY)."""
        if isinstance(item, Completion):
            key = (item.batch_id, item.dispatch_seq)
            if item.job_id != job_id or key in handled:
                return None, 0, 0, 0
            outcome = self.engine.listener.on_completed(job_id, *key).outcome
            handled.add(key)
            return outcome, 0, 0, 1
        b = item.batch
        key = (b.batch_id, b.dispatch_seq)
        if item.exit_code == EXIT_OK:
            # An exit 0 proves nothing: the completion must be in the database, recorded by the
            # worker's own transaction; if this dispatch has none, that is a failed attempt.
            if self.engine.listener.record_exit_without_completion(job_id, *key):
                run = self.engine.check(job_id, cause="worker_exited_without_completion")
                return run.outcome, 1, 1, 0
            if key in handled:
                return None, 1, 0, 0  # its NOTIFY already made the coordinator look
            outcome = self.engine.listener.on_completed(job_id, *key).outcome
            handled.add(key)
            return outcome, 1, 0, 0
        if item.exit_code == EXIT_FENCED:
            event(log, "worker_fenced_out", job_id=job_id, batch_id=b.batch_id, output=item.output)
            return None, 1, 0, 0
        outcome = self.engine.listener.on_failed(
            job_id, *key, item.output or f"worker exited with code {item.exit_code}"
        ).outcome
        return outcome, 1, 1, 0

    def adopt_dispatched(self, job_id: str) -> int:
        """Launch workers for batches marked dispatched that no local worker runs (dispatched
        by a `reconcile` command, or by a runner that died between its commit and the launch).
        Each is first dispatched again under a new fencing token, so a late worker of the lost
        launch (if one ever starts) is fenced out and no (batch, dispatch_seq) is launched twice;
        a batch claimed meanwhile is left to its worker."""
        mine = {b.batch_id for b in self.launcher.running(job_id)}
        orphans: list[BatchDispatch] = []
        with self.engine.pool.connection() as conn, conn.transaction():
            rows = conn.execute(Q("batches_dispatched_list"), {"job_id": job_id}).fetchall()
            loaded = load_job(conn, job_id)
            for r in rows:
                if r["status"] != "dispatched" or r["batch_id"] in mine:
                    continue
                row = conn.execute(
                    Q("batch_redispatch"),
                    {
                        "job_id": job_id,
                        "batch_id": r["batch_id"],
                        "dispatch_seq": r["dispatch_seq"],
                    },
                ).fetchone()
                if row is not None:
                    orphans.append(
                        BatchDispatch(
                            job_id,
                            row["batch_id"],
                            row["wave_number"],
                            row["record_type_id"],
                            row["dispatch_seq"],
                            row["attempts"] + 1,
                        )
                    )
        if orphans and loaded is not None:
            for f in self.launcher.launch(self.engine.tenant, job_id, loaded.spec, orphans):
                self.engine.listener.on_launch_failure(f)
            event(log, "dispatched_batches_adopted", job_id=job_id, count=len(orphans))
        return len(orphans)
