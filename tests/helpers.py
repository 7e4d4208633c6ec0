"""Shared helpers for the unit and integration tests.

`drive()` runs an import to its end in-process: every batch the engine dispatches (recorded by a
`RecordingLauncher`, which sees each run's dispatched batches) is run by the real reference
worker (`run_batch`), and its outcome is fed to the real listener (`on_worker_exited_ok` /
`on_failed`), as a per-batch host does (an exit 0 only makes the engine look: the worker recorded
its completion itself).
Options let a test run workers concurrently in threads, deliver every completion twice, deliver
completions out of order, hold back some batches, or inject a fault between steps.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis as redis_lib

from importwaves import flags as flagmod
from importwaves.datagen import DataSet, generate, reference_spec
from importwaves.db.connect import Conn, connect
from importwaves.db.queries import Q
from importwaves.engine.app import Engine
from importwaves.engine.coordinator import RunResult
from importwaves.engine.model import Outcome
from importwaves.launch.base import BatchDispatch, RecordingLauncher
from importwaves.spec import ImportSpec
from importwaves.verify import verify_import
from importwaves.worker import EXIT_FAILED, EXIT_OK, WorkerResult, WorkItem, run_batch

TERMINAL = {Outcome.COMPLETED, Outcome.FAILED, Outcome.NOT_FOUND}
SALES_ORDER = -30
CUSTOMER = -2
LINE = -13


# -- launcher -----------------------------------------------------------------------------------
class TrackingLauncher(RecordingLauncher):
    """A RecordingLauncher (thread-safe) that also samples, at every dispatch, how many of the
    job's batches are handed to workers in the database: that number may never exceed the
    spec's parallelism, whenever it is looked at."""

    def __init__(self, dsn: str, tenant: str) -> None:
        super().__init__()
        self.dsn, self.tenant = dsn, tenant
        self.max_active = 0
        self._lock = threading.Lock()

    def on_dispatched(self, job_id: str, batches: Sequence[BatchDispatch]) -> None:
        with connect(self.dsn, self.tenant, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM wave_batches WHERE job_id = %s "
                "AND status IN ('dispatched', 'processing')",
                (job_id,),
            ).fetchone()
        with self._lock:
            self.max_active = max(self.max_active, int(row["n"]) if row else 0)
            self.launched.extend(batches)

    def snapshot(self) -> list[BatchDispatch]:
        with self._lock:
            return list(self.launched)


# -- setup --------------------------------------------------------------------------------------
def make_engine(dsn: str, tenant: str, redis_url: str | None, **kwargs: Any) -> Engine:
    kwargs.setdefault("launcher", TrackingLauncher(dsn, tenant))
    return Engine(dsn, tenant, redis_url=redis_url, **kwargs)


def stage(dsn: str, tenant: str, job_id: str, orders: int, **kwargs: Any) -> DataSet:
    with connect(dsn, tenant, autocommit=True) as conn:
        return generate(conn, job_id, orders=orders, **kwargs)


def small_spec(tenant: str, **overrides: Any) -> ImportSpec:
    """The reference spec with small batches (a few dozen batches for a few hundred orders)."""
    base: dict[str, Any] = {
        "recordTypes": [
            {"name": "Customer", "recordTypeId": CUSTOMER, "batchSize": 50},
            {
                "name": "SalesOrder",
                "recordTypeId": SALES_ORDER,
                "batchSize": 100,
                "parentTypes": ["Customer"],
            },
        ],
        "derivedTypes": [
            {
                "name": "TransactionLine",
                "recordTypeId": LINE,
                "batchSize": 250,
                "parentTypes": ["SalesOrder"],
            },
        ],
        "parallelism": 4,
        # No back-off between a failed attempt and the next dispatch: `drive` runs batches
        # step by step and stops when nothing can move at once. The back-off has its own tests
        # (tests/integration/test_retry_backoff.py), which set it.
        "retryBackoff": {"baseSeconds": 0.0, "capSeconds": 0.0},
    }
    base.update(overrides)
    return reference_spec(tenant, **base)


def setup_job(
    engine: Engine, job_id: str, orders: int = 300, **spec_overrides: Any
) -> tuple[DataSet, ImportSpec]:
    """Stage datagen rows for `job_id` and submit it with `small_spec`."""
    ds = stage(engine.dsn, engine.tenant, job_id, orders)
    spec = small_spec(engine.tenant, **spec_overrides)
    assert engine.submit(job_id, spec)
    return ds, spec


def launched(engine: Engine, record_type_id: int | None = None) -> list[BatchDispatch]:
    out = list(engine.launcher.launched)  # type: ignore[attr-defined]
    return [b for b in out if record_type_id is None or b.record_type_id == record_type_id]


def lines_of(order: int) -> int:
    """Lines datagen stages for order `order`."""
    return 1 + (7 * order) % 9


def expected_batches(ds: DataSet, spec: ImportSpec) -> dict[int, int]:
    """Batch rows per record type the engine must create for a datagen data set (computed here
    from the data generator's formula, independently of the engine's SQL)."""
    sizes = {rt.recordTypeId: rt.batchSize for rt in spec.recordTypes}
    counts = {
        CUSTOMER: -(-ds.customers // sizes[CUSTOMER]),
        SALES_ORDER: -(-ds.orders // sizes[SALES_ORDER]),
    }
    derived = 0
    size = spec.derivedTypes[0].batchSize
    per = sizes[SALES_ORDER]
    for start in range(1, ds.orders + 1, per):
        before, groups = 0, set()
        for order in range(start, min(start + per, ds.orders + 1)):
            groups.add(before // size)
            before += lines_of(order)
        derived += len(groups)
    counts[LINE] = derived
    return counts


# -- driving ------------------------------------------------------------------------------------
@dataclass
class Run:
    """One batch a worker ran, with what the listener answered."""

    batch: BatchDispatch
    worker: WorkerResult | None
    results: list[RunResult] = field(default_factory=list)


@dataclass
class DriveResult:
    outcome: Outcome
    reason: str
    runs: list[Run]
    held: list[BatchDispatch]
    ticks: int
    seconds: float
    stalled: bool

    @property
    def ran(self) -> list[str]:
        return [r.batch.batch_id for r in self.runs]


Hook = Callable[[BatchDispatch], bool]


def drive(
    engine: Engine,
    dsn: str,
    tenant: str,
    job_id: str,
    *,
    max_steps: int = 2000,
    threads: int = 1,
    deliver_twice: bool = False,
    order: str = "fifo",
    seed: int = 0,
    run_if: Hook | None = None,
    after_step: Callable[[int, Run], None] | None = None,
    notify: bool = True,
    include: Sequence[BatchDispatch] = (),
    timeout: float = 60.0,
) -> DriveResult:
    """Run dispatched batches with the real worker and feed the listener until the job is
    terminal or nothing more can move.

    threads        > 1 runs each dispatched batch (worker + listener call) in a thread pool of
                   that size, as soon as it is dispatched;
    deliver_twice  delivers every completion/failure to the listener twice;
    order          "fifo", "reverse" or "shuffle": with threads == 1, every batch dispatched so
                   far is run first, then the completions are delivered in this order;
    run_if(b)      False holds batch b back (left dispatched; returned in `held`);
    after_step     called after each batch's notifications (fault injection);
    notify         False runs the workers but tells the listener nothing;
    include        batches to run first (e.g. ones an earlier drive() held back).
    """
    launcher = engine.launcher
    assert isinstance(launcher, RecordingLauncher)
    t0 = time.monotonic()
    deadline = t0 + timeout
    # Batches an earlier drive() of this launcher took (ran or held) are not taken again,
    # except those passed back in `include`.
    cursor: int = getattr(launcher, "drive_cursor", 0)
    seen: set[tuple[str, int]] = getattr(launcher, "drive_seen", set())
    launcher.drive_seen = seen  # type: ignore[attr-defined]
    seen -= {(b.batch_id, b.dispatch_seq) for b in include}
    runs: list[Run] = []
    held: list[BatchDispatch] = []
    rng = random.Random(seed)
    ticks = 0
    step_lock = threading.Lock()
    last: RunResult | None = None

    queue = list(include)

    def new_dispatches() -> list[BatchDispatch]:
        nonlocal cursor, queue
        fresh = launcher.launched[cursor:]
        cursor += len(fresh)
        items, queue = [*queue, *fresh], []
        launcher.drive_cursor = cursor  # type: ignore[attr-defined]
        out = []
        for b in items:
            if (b.batch_id, b.dispatch_seq) in seen:
                continue
            seen.add((b.batch_id, b.dispatch_seq))
            if run_if is not None and not run_if(b):
                held.append(b)
                continue
            out.append(b)
        return out

    def in_flight_elsewhere() -> bool:
        """Batches dispatched in the DB that no drive() has run or held yet."""
        with connect(dsn, tenant, autocommit=True) as conn:
            rows = conn.execute(Q("batches_dispatched_list"), {"job_id": job_id}).fetchall()
        return any(
            r["status"] == "dispatched" and (r["batch_id"], r["dispatch_seq"]) not in seen
            for r in rows
        )

    def work(b: BatchDispatch) -> Run:
        wr = run_batch(WorkItem(dsn, tenant, job_id, b.batch_id, b.dispatch_seq))
        return Run(b, wr)

    def deliver(run: Run) -> None:
        if not notify or run.worker is None:
            return
        for _ in range(2 if deliver_twice else 1):
            if run.worker.exit_code == EXIT_OK:
                run.results.append(
                    engine.listener.on_worker_exited_ok(
                        job_id, run.batch.batch_id, run.batch.dispatch_seq
                    )
                )
            elif run.worker.exit_code == EXIT_FAILED:
                run.results.append(
                    engine.listener.on_failed(
                        job_id, run.batch.batch_id, run.batch.dispatch_seq, run.worker.message
                    )
                )

    def finish(run: Run) -> None:
        with step_lock:
            runs.append(run)
            n = len(runs)
        if after_step is not None:
            after_step(n, run)

    def work_and_deliver(b: BatchDispatch) -> Run:
        run = work(b)
        deliver(run)
        finish(run)
        return run

    stalled = False
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    futures: set[Future[Run]] = set()
    try:
        while len(runs) < max_steps:
            if time.monotonic() > deadline:
                raise TimeoutError(f"drive({job_id}) did not finish in {timeout}s")
            batch = new_dispatches()
            if pool is not None:
                futures |= {pool.submit(work_and_deliver, b) for b in batch}
                if futures:
                    done, futures = wait(
                        futures, timeout=deadline - time.monotonic(), return_when=FIRST_COMPLETED
                    )
                    for f in done:
                        f.result()  # re-raise a thread's failure here
                    continue
            elif batch:
                if order == "reverse":
                    batch.reverse()
                elif order == "shuffle":
                    rng.shuffle(batch)
                if order == "fifo":
                    for b in batch:
                        work_and_deliver(b)
                else:
                    done_runs = [work(b) for b in batch]
                    if order == "shuffle":
                        rng.shuffle(done_runs)
                    for run in done_runs:
                        deliver(run)
                        finish(run)
                continue
            # Nothing in flight: a timer tick decides whether we are done.
            last = engine.check(job_id, "tick")
            ticks += 1
            if last.outcome in TERMINAL:
                break
            if len(launcher.launched) == cursor and in_flight_elsewhere():
                # Another thread (a timer, a reconcile) committed a dispatch and is about to
                # launch it: wait for the launch rather than calling the job stalled.
                wait_until(
                    lambda: len(launcher.launched) > cursor,
                    timeout=10,
                    what="a dispatch committed elsewhere to be launched",
                )
                continue
            if len(launcher.launched) == cursor:
                # Nothing new to run: nothing can move.
                stalled = True
                break
    finally:
        if pool is not None:
            for f in futures:
                with contextlib.suppress(Exception):
                    f.result(timeout=max(0.0, deadline - time.monotonic()))
            pool.shutdown(wait=True)
    outcome = last.outcome if last else Outcome.IN_PROGRESS
    return DriveResult(
        outcome, last.reason if last else "", runs, held, ticks, time.monotonic() - t0, stalled
    )


def run_and_notify(
    engine: Engine, dsn: str, tenant: str, job_id: str, b: BatchDispatch
) -> tuple[WorkerResult, RunResult | None]:
    """Run one batch with the real worker and tell the listener how it went."""
    wr = run_batch(WorkItem(dsn, tenant, job_id, b.batch_id, b.dispatch_seq))
    if wr.exit_code == EXIT_OK:
        return wr, engine.listener.on_worker_exited_ok(job_id, b.batch_id, b.dispatch_seq)
    if wr.exit_code == EXIT_FAILED:
        return wr, engine.listener.on_failed(job_id, b.batch_id, b.dispatch_seq, wr.message)
    return wr, None


# -- database facts -----------------------------------------------------------------------------
@contextlib.contextmanager
def tenant_conn(dsn: str, tenant: str) -> Iterator[Conn]:
    with connect(dsn, tenant, autocommit=True) as conn:
        yield conn


def job_status(dsn: str, tenant: str, job_id: str) -> str | None:
    with tenant_conn(dsn, tenant) as conn:
        row = conn.execute(Q("job_get"), {"job_id": job_id}).fetchone()
        return row["status"] if row else None


def batch_counts(dsn: str, tenant: str, job_id: str) -> dict[tuple[int, str], int]:
    """{(record_type_id, status): n} straight from the batch rows."""
    with tenant_conn(dsn, tenant) as conn:
        return {
            (r["record_type_id"], r["status"]): r["n"]
            for r in conn.execute(Q("batches_by_type_status"), {"job_id": job_id}).fetchall()
        }


def rows_by_type(dsn: str, tenant: str, job_id: str) -> Counter[int]:
    out: Counter[int] = Counter()
    for (rid, _), n in batch_counts(dsn, tenant, job_id).items():
        out[rid] += n
    return out


def counters_mismatch(dsn: str, tenant: str, job_id: str) -> list[dict[str, Any]]:
    with tenant_conn(dsn, tenant) as conn:
        return conn.execute(Q("counters_mismatch"), {"job_id": job_id}).fetchall()


def waves(dsn: str, tenant: str, job_id: str) -> dict[int, dict[str, Any]]:
    """Wave rows keyed by record type id."""
    with tenant_conn(dsn, tenant) as conn:
        return {
            r["record_type_id"]: r
            for r in conn.execute(Q("waves_snapshot"), {"job_id": job_id}).fetchall()
        }


def batches(dsn: str, tenant: str, job_id: str) -> list[dict[str, Any]]:
    with tenant_conn(dsn, tenant) as conn:
        return conn.execute(
            "SELECT batch_id, record_type_id, status, dispatch_seq, attempts, last_error, "
            "dispatched_at, completed_at, parent_batch_id, needs_derivation, derived_created_at "
            "FROM wave_batches WHERE job_id = %s ORDER BY id",
            (job_id,),
        ).fetchall()


def last_batch_id(dsn: str, tenant: str, job_id: str, record_type_id: int) -> str:
    """The highest batch id of a record type (the last one its wave dispatches)."""
    ids = [
        b["batch_id"] for b in batches(dsn, tenant, job_id) if b["record_type_id"] == record_type_id
    ]
    return max(ids)


def assert_verified(dsn: str, tenant: str, job_id: str, spec: ImportSpec) -> None:
    with tenant_conn(dsn, tenant) as conn:
        v = verify_import(conn, job_id, spec)
    assert v.ok, v.failures()


def assert_complete(engine: Engine, job_id: str, ds: DataSet, spec: ImportSpec) -> None:
    """The import finished with every row, the exact batch rows, exact counters, each batch
    dispatched once per attempt, and the parallelism cap held."""
    dsn, tenant = engine.dsn, engine.tenant
    assert_verified(dsn, tenant, job_id, spec)
    assert dict(rows_by_type(dsn, tenant, job_id)) == expected_batches(ds, spec)
    assert counters_mismatch(dsn, tenant, job_id) == []
    assert_no_duplicate_dispatch(engine.launcher, dsn, tenant, job_id)  # type: ignore[arg-type]
    launcher = engine.launcher
    if isinstance(launcher, TrackingLauncher):
        assert 0 < launcher.max_active <= spec.parallelism


def assert_no_duplicate_dispatch(
    launcher: RecordingLauncher, dsn: str, tenant: str, job_id: str
) -> None:
    """Every (batch, dispatch_seq) was launched exactly once, and a batch's launches are exactly
    its dispatch sequence numbers 1..dispatch_seq in the database."""
    launched = [(b.batch_id, b.dispatch_seq) for b in launcher.launched if b.job_id == job_id]
    dupes = [k for k, n in Counter(launched).items() if n > 1]
    assert not dupes, f"dispatched twice: {dupes[:5]}"
    seqs: dict[str, list[int]] = {}
    for bid, seq in launched:
        seqs.setdefault(bid, []).append(seq)
    rows = {r["batch_id"]: r for r in batches(dsn, tenant, job_id)}
    for bid, got in seqs.items():
        assert sorted(got) == list(range(1, rows[bid]["dispatch_seq"] + 1)), (bid, got)
    never = [b for b, r in rows.items() if r["dispatch_seq"] and b not in seqs]
    assert not never, f"dispatched in the DB but never launched: {never[:5]}"


# -- redis facts --------------------------------------------------------------------------------
def redis_client(url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(url, decode_responses=True, socket_timeout=2)


def flag_ttl(url: str, tenant: str, job_id: str, name: str) -> int:
    """Redis TTL of a flag: > 0 set with expiry, -2 missing."""
    client = redis_client(url)
    try:
        return int(client.ttl(flagmod.key(tenant, job_id, name)))
    finally:
        client.close()


MONITORING = flagmod.MONITORING
DERIVED_READY = flagmod.DERIVED_READY


# -- waiting ------------------------------------------------------------------------------------
def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    every: float = 0.02,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def lock_waiters(dsn: str, objid: int) -> int:
    """Backends waiting for advisory lock `objid` (to know a paused transaction reached it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND objid = %s",
            (objid,),
        ).fetchone()
        return int(row[0]) if row else 0
