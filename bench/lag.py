"""Row 1: derived dispatch lag, side by side.

importwaves (listener path): each small import (1 Customer batch, 20 SalesOrder parent batches,
~20 derived TransactionLine batches) is run with the real reference worker (`run_batch`, its own
connection per batch, as a worker process does) in a thread pool; a worker's exit-0 is handed to
the real listener (`on_worker_exited_ok`: it checks that the worker recorded its completion,
then runs the coordinator), as the local runner and the operator do. The lag of
one import is

    first derived dispatch (launcher.on_dispatched() called with the first TransactionLine
    batch, i.e. after the coordinator's dispatch transaction COMMITTED)
  - return of the last parent batch's worker (after its completion transaction COMMITTED)

on one clock (time.perf_counter in this process). The database's own view,
wave_coordination.dispatch_lag_seconds (clock_timestamp() at the dispatch UPDATE minus the
threshold-crossing parent's completed_at, both written inside their transactions), is reported
beside it.

timer-only: the same imports, but nobody calls the listener: the worker records its own
completion (it does, in its transaction) and a per-job timer calls `check_and_trigger_next_wave`
every `interval` seconds, which is what a plain periodic kopf timer gives. Jobs run concurrently
(each with its own timer, random phase) so 200 samples take a minute, not ten.

Celery: bench/celery_peer.py in its own virtualenv (see run.py).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.common import BQ, tenant_conn
from importwaves.datagen import generate, reference_spec
from importwaves.engine.app import Engine
from importwaves.launch.base import BatchDispatch, NoWorkers
from importwaves.spec import ImportSpec
from importwaves.worker import EXIT_OK, WorkItem, run_batch

PARENT = -30  # SalesOrder: the derived lines' parent type
DERIVED = -13
PARENT_BATCHES = 20
ORDERS_PER_BATCH = 10


def lag_spec(tenant: str, parallelism: int) -> ImportSpec:
    """The reference import, cut small: 1 Customer batch, 20 SalesOrder batches of 10 orders
    (~50 lines each), derived lines in batches of 250 (one per parent batch)."""
    return reference_spec(
        tenant,
        recordTypes=[
            {"name": "Customer", "recordTypeId": -2, "batchSize": 100},
            {
                "name": "SalesOrder",
                "recordTypeId": PARENT,
                "batchSize": ORDERS_PER_BATCH,
                "parentTypes": ["Customer"],
            },
        ],
        derivedTypes=[
            {
                "name": "TransactionLine",
                "recordTypeId": DERIVED,
                "batchSize": 250,
                "parentTypes": ["SalesOrder"],
            }
        ],
        parallelism=parallelism,
    )


@dataclass
class JobTrace:
    job_id: str
    parent_returns: list[float] = field(default_factory=list)
    derived_launches: list[float] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    inflight: int = 0
    finished: bool = False

    @property
    def lag(self) -> float | None:
        if not self.parent_returns or not self.derived_launches:
            return None
        return min(self.derived_launches) - max(self.parent_returns)


class ThreadLauncher(NoWorkers):
    """Runs every dispatched batch with the real reference worker in a thread pool, records
    when parents return and when derived batches are dispatched, and (listener mode) hands each
    exit to the engine's listener. (Sees each run's dispatched batches as the engine's
    recording launcher does: `on_dispatched`, after the dispatch transaction committed.)"""

    def __init__(
        self,
        dsn: str,
        pool: ThreadPoolExecutor,
        traces: dict[str, JobTrace],
        notify: bool,
        tenant: str = "",
    ) -> None:
        self.tenant = tenant
        self.dsn = dsn
        self.pool = pool
        self.traces = traces
        self.notify = notify
        self.engine: Engine | None = None
        self._lock = threading.Lock()

    def on_dispatched(self, job_id: str, batches: Sequence[BatchDispatch]) -> None:
        tenant = self.tenant
        now = time.perf_counter()
        trace = self.traces[job_id]
        with self._lock:
            trace.derived_launches += [now for b in batches if b.record_type_id == DERIVED]
            trace.inflight += len(batches)
        for b in batches:
            self.pool.submit(self._run, tenant, b)

    def _run(self, tenant: str, b: BatchDispatch) -> None:
        trace = self.traces[b.job_id]
        try:
            result = run_batch(WorkItem(self.dsn, tenant, b.job_id, b.batch_id, b.dispatch_seq))
            t_return = time.perf_counter()
            if b.record_type_id == PARENT:
                with self._lock:
                    trace.parent_returns.append(t_return)
            if not self.notify:
                return
            assert self.engine is not None
            if result.exit_code == EXIT_OK:
                out = self.engine.listener.on_worker_exited_ok(b.job_id, b.batch_id, b.dispatch_seq)
            else:
                out = self.engine.listener.on_failed(
                    b.job_id, b.batch_id, b.dispatch_seq, result.message
                )
            if out.outcome.value in ("completed", "failed"):
                trace.finished = True
        except Exception as exc:  # a benchmark must say what broke, not hang
            trace.error = f"{type(exc).__name__}: {exc}"
            trace.done.set()
        finally:
            with self._lock:
                trace.inflight -= 1
                if trace.finished and trace.inflight == 0:
                    trace.done.set()  # the import is over and no worker of it still runs


def stage_jobs(dsn: str, tenant: str, job_ids: Sequence[str]) -> None:
    with tenant_conn(dsn, tenant) as conn:
        for job_id in job_ids:
            generate(conn, job_id, orders=PARENT_BATCHES * ORDERS_PER_BATCH, customers=20)


def _db_lags(dsn: str, tenant: str, job_ids: Sequence[str]) -> dict[str, float | None]:
    with tenant_conn(dsn, tenant) as conn:
        return {j: one_lag(conn, j) for j in job_ids}


def one_lag(conn: Any, job_id: str) -> float | None:
    row = conn.execute(BQ("derived_lag"), {"job_id": job_id}).fetchone()
    return None if row is None else row["dispatch_lag_seconds"]


def run_listener_path(
    dsn: str,
    tenant: str,
    redis_url: str,
    job_ids: Sequence[str],
    *,
    parallelism: int = 20,
    workers: int = 4,
) -> list[dict[str, Any]]:
    """Run the imports one after another through the listener path; one row per import."""
    traces = {j: JobTrace(j) for j in job_ids}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="worker")
    launcher = ThreadLauncher(dsn, pool, traces, notify=True, tenant=tenant)
    engine = Engine(dsn, tenant, redis_url=redis_url, launcher=launcher, pool_size=8)
    launcher.engine = engine
    try:
        for job_id in job_ids:
            engine.submit(job_id, lag_spec(tenant, parallelism))
            engine.check(job_id, cause="start")
            if not traces[job_id].done.wait(120):
                raise TimeoutError(f"import {job_id} did not finish in 120 s")
    finally:
        pool.shutdown(wait=True)
        engine.close()
    return _rows(dsn, tenant, traces)


def run_timer_only(
    dsn: str,
    tenant: str,
    redis_url: str,
    job_ids: Sequence[str],
    *,
    interval: float = 1.0,
    concurrent: int = 12,
    parallelism: int = 20,
    seed: int = 7,
) -> list[dict[str, Any]]:
    """No listener: a per-job timer calls check_and_trigger_next_wave every `interval` s."""
    traces = {j: JobTrace(j) for j in job_ids}
    rng = random.Random(seed)  # noqa: S311 - start jitter, not cryptography
    pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="worker")
    launcher = ThreadLauncher(dsn, pool, traces, notify=False, tenant=tenant)
    engine = Engine(dsn, tenant, redis_url=redis_url, launcher=launcher, pool_size=16)
    launcher.engine = engine

    def timer(job_id: str) -> None:
        trace = traces[job_id]
        engine.submit(job_id, lag_spec(tenant, parallelism))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = engine.check(job_id, cause="timer")
            if out.outcome.value in ("completed", "failed"):
                break
            time.sleep(interval)
        else:
            trace.error = "timed out"
        trace.done.set()

    try:
        with ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix="timer") as timers:
            for job_id in job_ids:
                time.sleep(rng.uniform(0, interval / concurrent * 2))
                timers.submit(timer, job_id)
    finally:
        pool.shutdown(wait=True)
        engine.close()
    return _rows(dsn, tenant, traces)


def _rows(dsn: str, tenant: str, traces: dict[str, JobTrace]) -> list[dict[str, Any]]:
    db = _db_lags(dsn, tenant, list(traces))
    rows = []
    for job_id, t in traces.items():
        if t.error:
            raise RuntimeError(f"import {job_id}: {t.error}")
        with tenant_conn(dsn, tenant) as conn:
            status = conn.execute(BQ("job_status"), {"job_id": job_id}).fetchone()
        if status is None or status["status"] != "completed":
            raise RuntimeError(f"import {job_id} ended {status}")
        rows.append({"job_id": job_id, "wall_lag_s": t.lag, "db_lag_s": db[job_id]})
    return rows
