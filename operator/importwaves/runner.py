"""Run one import locally: the engine's loop, on one thread, through its public API only.

At start a sweep (recovery) and a worker sync: batches whose workers died with a killed runner
are requeued (a processing batch whose `local:<pid>` worker is no longer alive on this machine
is gone once its grace has passed), dispatched batches get pooled workers. Then: a worker's
completion NOTIFY (delivered at its commit, engine/notify.py) makes the engine look at the
database (`on_completions`; a notice records nothing); a timer tick nudges `check` and
`sync_workers` (lost workers, dead ones replaced, launch problems retried); a periodic sweep
runs recovery. The pooled workers (launch/local.py, worker_pool.py) claim and record their own
batches; the coordinator's dispatch NOTIFY wakes them. The run ends when the job is terminal
and its workers have exited (they do so on the job's status change).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from importwaves import redact
from importwaves.engine.app import Engine
from importwaves.engine.model import Outcome
from importwaves.engine.notify import Completion, CompletionListener
from importwaves.log import event

log = logging.getLogger("importwaves.runner")

TERMINAL = {Outcome.COMPLETED, Outcome.FAILED, Outcome.NOT_FOUND, Outcome.INVALID}


@dataclass
class RunStats:
    status: str
    seconds: float
    #: batch attempts the job's workers made (from the batch rows)
    worker_runs: int
    #: of those, attempts that did not complete their batch
    worker_failures: int
    #: completions that reached the engine by NOTIFY (at commit)
    notified: int = 0


class LocalRunner:
    def __init__(
        self,
        engine: Engine,
        *,
        tick: float = 1.0,
        sweep_every: float | None = None,
        poll: float = 0.05,
        notify: bool = True,
        max_backoff: float = 5.0,
    ) -> None:
        self.engine = engine
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
        listener = (
            CompletionListener(
                self.engine.dsn, self.engine.tenant, notified.put, poll=0.2, opts=self.engine.opts
            ).start()
            if self.notify
            else None
        )
        try:
            return self._loop(job_id, t0, notified, timeout, on_progress, progress_every)
        finally:
            if listener is not None:
                listener.stop()

    def _loop(
        self,
        job_id: str,
        t0: float,
        notified: queue.Queue[Completion],
        timeout: float | None,
        on_progress: Callable[[], None] | None,
        progress_every: float,
    ) -> RunStats:
        engine = self.engine
        by_notify = 0
        outcome = Outcome.IN_PROGRESS
        started = False
        handled: set[tuple[str, int]] = set()
        #: completions taken from NOTIFYs and not delivered yet: the database was away
        undelivered: list[Completion] = []
        outage = 0
        live = 0
        last_tick = last_sweep = last_progress = time.monotonic()
        while True:
            try:
                if not started:
                    # issue 13: requeue what died with an earlier runner now, not at the first
                    # periodic sweep; then workers for whatever is dispatched.
                    swept = engine.sweep(job_id, cause="startup").result
                    outcome = swept.outcome if swept else engine.check(job_id, "start").outcome
                    live = engine.sync_workers(job_id).live
                    started = True
                while not notified.empty():  # completions, the moment they commit
                    undelivered.append(notified.get_nowait())
                fresh = [
                    c
                    for c in undelivered
                    if c.job_id == job_id and (c.batch_id, c.dispatch_seq) not in handled
                ]
                if fresh:
                    # all the completions queued now, in ONE look (level-based): none waits
                    # behind the runs of the others
                    outcome = engine.on_completions(job_id, [c.batch_id for c in fresh]).outcome
                    handled.update((c.batch_id, c.dispatch_seq) for c in fresh)
                    by_notify += len({(c.batch_id, c.dispatch_seq) for c in fresh})
                undelivered.clear()
                now = time.monotonic()
                # Once the job is over, look at its workers often: they exit on its status
                # change, and the run ends when they have.
                every = 0.05 if outcome in TERMINAL else self.tick
                if now - last_tick >= every:
                    last_tick = now
                    outcome = engine.check(job_id, cause="timer").outcome
                    live = engine.sync_workers(job_id).live
                    engine.update_gauges()
                if self.sweep_every is not None and now - last_sweep >= self.sweep_every:
                    last_sweep = now
                    swept = engine.sweep(job_id).result
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
            if outcome in TERMINAL and live == 0:
                break
            self._check_timeout(job_id, t0, timeout, outcome)
            # Sleep until the next completion NOTIFY (at once: the derived dispatch lag is
            # measured from the parent's commit) or the next timer step.
            with contextlib.suppress(queue.Empty):
                undelivered.append(notified.get(timeout=self.poll))
        if on_progress is not None:
            on_progress()
        runs, completed = engine.attempts(job_id)
        return RunStats(
            outcome.value, time.monotonic() - t0, runs, max(0, runs - completed), by_notify
        )

    @staticmethod
    def _check_timeout(job_id: str, t0: float, timeout: float | None, outcome: Outcome) -> None:
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise TimeoutError(
                f"import {job_id} did not finish within {timeout}s (last outcome {outcome.value})"
            )
