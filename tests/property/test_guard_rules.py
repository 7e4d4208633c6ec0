"""The guard rules under faults: a hypothesis state machine drives the real engine, on the real
PostgreSQL and Redis, through random sequences of stimuli and faults, and checks after EVERY step
that importwaves cannot finish early, dispatches parents first, hands each batch to at most one
worker, keeps its counters exact and keeps the monitoring flag on while the import runs; at the
end of every sequence, with the faults lifted and every worker succeeding, a bounded number of
nudges must complete the import (it cannot get stuck).

Each sequence is a fresh tenant schema (migrated, with the `tests/audit.py` trigger recording
every batch transition) and a tiny data set of random shape, with a random spec (batch sizes,
threshold, parallelism, retries). Stimuli and faults:

  workers       the real reference worker (`run_batch`) on a launched batch, completing it and
                telling the listener once, twice or never; or failing after its claim, failing
                before it (pod never started), or dying after its claim (left `processing`)
  out of order  several workers finish, then their completions arrive in a random order
  concurrent    workers completing from threads while a timer tick and a reconcile run
  redelivery    an old completion or failure (a stale fencing token) delivered again
  tick / reconcile / sweep   the timer, the manual `waves:reconcile`, the periodic sweep
  time passes   every claimed or dispatched batch looks older than staleAfterSeconds
  Redis         FLUSHALL, keys expired, redis-server stopped, started again
  coordinator   a run dies after its commit, before launching; its connection is killed with
                pg_terminate_backend while it holds the job lock (after locking, after
                dispatching, after committing); a forked coordinator process is SIGKILLed at
                the same points; the whole runner restarts (its workers die or survive) and
                adopts the dispatched batches nobody runs

`make test` runs IW_PROPERTY_EXAMPLES=200 sequences (default); `make soak` runs 5,000 and prints
what it checked.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

import audit
from helpers import CUSTOMER, LINE, SALES_ORDER
from importwaves import flags as flagmod
from importwaves.datagen import generate, reference_spec
from importwaves.db import migrate
from importwaves.db.connect import Conn, connect
from importwaves.db.queries import Q
from importwaves.engine.app import Engine
from importwaves.launch.base import BatchDispatch, NoWorkers, RecordingLauncher
from importwaves.localdev import LocalPostgres, LocalRedis
from importwaves.worker import EXIT_FAILED, EXIT_OK, WorkItem, run_batch

from .conftest import REPORT
from .pause import POINTS, Pause, install_pause

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("IW_PROPERTY_EXAMPLES", "200"))
STEPS = int(os.environ.get("IW_PROPERTY_STEPS", "20"))
#: Nudges (drain the launched workers, timer tick, adopt, sweep) allowed to finish a sequence.
LIVENESS_NUDGES = 12

STATS: Counter[str] = Counter()
_ids = itertools.count()


class Crash(Exception):
    """The coordinator process died here (raised where it would have stopped)."""


class ModelLauncher(RecordingLauncher):
    """Remembers every launch (a (batch, dispatch_seq) launched twice is a duplicate dispatch)
    and keeps the launched workers not run yet in `queue`. `crash_next` makes the next launch
    die instead: the dispatch was committed, no worker starts."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[BatchDispatch] = []
        self.crash_next = False
        self.duplicates: list[tuple[str, int]] = []
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def on_dispatched(self, job_id: str, batches: Sequence[BatchDispatch]) -> None:
        with self._lock:
            if self.crash_next:
                self.crash_next = False
                STATS["faults"] += 1
                STATS["fault:coordinator_died_after_commit"] += 1
                raise Crash("coordinator died after its commit, before launching")
            for b in batches:
                key = (b.batch_id, b.dispatch_seq)
                if key in self._seen:
                    self.duplicates.append(key)
                self._seen.add(key)
                self.launched.append(b)
                self.queue.append(b)

    def adopt(self, dispatched: Sequence[BatchDispatch]) -> int:
        """What the pooled workers a restarted runner starts do: claim whatever is dispatched
        (the same dispatch, under its own fencing token; not a second launch of it)."""
        with self._lock:
            queued = {(b.batch_id, b.dispatch_seq) for b in self.queue}
            fresh = [b for b in dispatched if (b.batch_id, b.dispatch_seq) not in queued]
            self.queue += fresh
            return len(fresh)

    def take(self, i: int) -> BatchDispatch | None:
        with self._lock:
            return self.queue.pop(i % len(self.queue)) if self.queue else None

    def running(self, job_id: str | None = None) -> list[BatchDispatch]:
        with self._lock:
            return list(self.queue)


@dataclass
class Env:
    pg: LocalPostgres
    redis: LocalRedis


#: The servers of the running test (set by it; the state machine is built by hypothesis).
ENV: dict[str, Env] = {}

WORKER_MODES = ["ok"] * 5 + ["ok_twice", "ok_silent", "fail", "fail_unclaimed", "die"]


class GuardRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.env = ENV["current"]
        self.dsn = self.env.pg.dsn()
        self.engine: Engine | None = None
        self.conn: Conn | None = None
        self.tenant = ""
        self.job = "job"
        self.status = "running"
        self.flags_fresh = True
        self.history: list[tuple[str, str, int, str]] = []
        self.rc = redis_lib.Redis.from_url(
            self.env.redis.url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2
        )

    # -- setup ---------------------------------------------------------------------------------
    @initialize(
        orders=st.integers(0, 12),
        customer_size=st.sampled_from([1, 2, 5]),
        order_size=st.sampled_from([2, 3, 50]),
        line_size=st.sampled_from([3, 8, 50]),
        threshold=st.sampled_from([100, 100, 50, 1]),
        parallelism=st.sampled_from([1, 2, 3, 3]),
        retries=st.integers(1, 3),
    )
    def start(
        self,
        orders: int,
        customer_size: int,
        order_size: int,
        line_size: int,
        threshold: int,
        parallelism: int,
        retries: int,
    ) -> None:
        if not self.env.redis.running():
            self.env.redis.start()
        self.tenant = f"prop{os.getpid()}_{next(_ids)}"
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            migrate.up(admin, self.tenant)
        self.conn = connect(self.dsn, self.tenant, autocommit=True)
        audit.install(self.conn)
        generate(self.conn, self.job, orders=orders, customers=max(1, orders // 3))
        self.spec = reference_spec(
            self.tenant,
            # no retry back-off: the model's liveness check counts nudges, not seconds (the
            # back-off has its own tests: tests/integration/test_retry_backoff.py)
            retryBackoff={"baseSeconds": 0, "capSeconds": 0},
            recordTypes=[
                {"name": "Customer", "recordTypeId": CUSTOMER, "batchSize": customer_size},
                {
                    "name": "SalesOrder",
                    "recordTypeId": SALES_ORDER,
                    "batchSize": order_size,
                    "parentTypes": ["Customer"],
                },
            ],
            derivedTypes=[
                {
                    "name": "TransactionLine",
                    "recordTypeId": LINE,
                    "batchSize": line_size,
                    "parentTypes": ["SalesOrder"],
                }
            ],
            completionThreshold=threshold,
            parallelism=parallelism,
            retries=retries,
            staleAfterSeconds=5,
        )
        self.launcher = ModelLauncher()
        self.engine = self._new_engine()
        assert self.engine.submit(self.job, self.spec)
        STATS["sequences_started"] += 1

    def _new_engine(self) -> Engine:
        return Engine(
            self.dsn, self.tenant, redis_url=self.env.redis.url, launcher=self.launcher, pool_size=6
        )

    @property
    def eng(self) -> Engine:
        assert self.engine is not None
        return self.engine

    def _step(self, name: str) -> None:
        STATS["steps"] += 1
        STATS[f"step:{name}"] += 1

    def _fault(self, name: str) -> None:
        STATS["faults"] += 1
        STATS[f"fault:{name}"] += 1

    # -- stimuli -------------------------------------------------------------------------------
    def _stimulus(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one engine stimulus; a completed run that reached Redis refreshed every flag."""
        flags = self.eng.flags
        usable = self.env.redis.running() and flags._usable()
        down_until = flags._down_until  # moves only when a Redis call fails
        try:
            result = fn(*args)
        except Crash:
            self.flags_fresh = False
            return None
        if usable and flags._down_until == down_until and self.env.redis.running():
            self.flags_fresh = True
        return result

    def _deliver(self, kind: str, batch_id: str, seq: int, message: str = "") -> Any:
        self.history.append((kind, batch_id, seq, message))
        if kind == "completed":
            return self._stimulus(self.eng.listener.on_completions, self.job, [batch_id])
        return self._stimulus(self.eng.listener.on_failed, self.job, batch_id, seq, message)

    def _work(self, b: BatchDispatch) -> tuple[str, str] | None:
        """The real worker on `b`: ("completed" | "failed", message) to deliver, or None when it
        was fenced out (exit 3: nothing to report)."""
        wr = run_batch(WorkItem(self.dsn, self.tenant, self.job, b.batch_id, b.dispatch_seq))
        STATS[f"worker_exit:{wr.exit_code}"] += 1
        if wr.exit_code == EXIT_OK:
            return ("completed", wr.message)
        if wr.exit_code == EXIT_FAILED:
            return ("failed", wr.message)
        return None

    def _claim(self, b: BatchDispatch, worker: str) -> bool:
        key = {"job_id": self.job, "batch_id": b.batch_id, "dispatch_seq": b.dispatch_seq}
        with connect(self.dsn, self.tenant, autocommit=True) as conn:
            return (
                conn.execute(Q("batch_claim"), {**key, "worker_id": worker}).fetchone() is not None
            )

    def _run_worker(self, b: BatchDispatch, mode: str) -> None:
        if mode in ("ok", "ok_twice", "ok_silent"):
            got = self._work(b)
            if got is None:
                return
            if mode == "ok_silent":  # the listener died after the worker's commit
                self._fault("completion_never_delivered")
                self.flags_fresh = False
                return
            for _ in range(2 if mode == "ok_twice" else 1):
                self._deliver(got[0], b.batch_id, b.dispatch_seq, got[1])
        elif mode == "fail":  # claimed, then failed: the worker records it, the runner tells
            if self._claim(b, "model:fail"):
                key = {"job_id": self.job, "batch_id": b.batch_id, "dispatch_seq": b.dispatch_seq}
                with connect(self.dsn, self.tenant, autocommit=True) as conn:
                    conn.execute(
                        Q("batch_fail"),
                        {
                            **key,
                            "max_attempts": self.spec.max_attempts,
                            **self.spec.backoff_params,
                            "error": "model failure",
                        },
                    )
                self._fault("worker_failed")
                self._deliver("failed", b.batch_id, b.dispatch_seq, "model failure")
        elif mode == "fail_unclaimed":  # the pod failed before the worker started
            self._fault("worker_never_started")
            self._deliver("failed", b.batch_id, b.dispatch_seq, "pod failed before starting")
        elif mode == "die" and self._claim(b, "model:dead"):
            # claimed, then SIGKILLed: left processing, its heartbeat stopped
            self._fault("worker_died_mid_batch")

    @precondition(lambda self: self.engine is not None)
    @rule(
        i=st.integers(0, 50), modes=st.lists(st.sampled_from(WORKER_MODES), min_size=1, max_size=4)
    )
    def worker_runs(self, i: int, modes: list[str]) -> None:
        self._step("workers")
        if not self.launcher.queue:
            self._stimulus(self.eng.check, self.job, "timer")
        for mode in modes:
            b = self.launcher.take(i)
            if b is None:
                return
            self._run_worker(b, mode)

    # Preconditions and draws depend only on what hypothesis chose, never on the engine's state
    # (a queue length, a job status): real PostgreSQL and threads are not deterministic, and a
    # rule whose availability or draws varied between replays made hypothesis raise
    # FlakyStrategyDefinition. Rules that find nothing to do are no-ops instead.
    @precondition(lambda self: self.engine is not None)
    @rule(order4=st.permutations(range(4)), twice=st.booleans())
    def completions_out_of_order(self, order4: list[int], twice: bool) -> None:
        if len(self.launcher.queue) < 2:
            return
        self._step("out_of_order")
        n = min(4, len(self.launcher.queue))
        ran = []
        for _ in range(n):
            b = self.launcher.take(0)
            if b is not None:
                ran.append((b, self._work(b)))
        order = [i for i in order4 if i < len(ran)]
        for i in order:
            b, got = ran[i]
            if got is not None:
                for _ in range(2 if twice else 1):
                    self._deliver(got[0], b.batch_id, b.dispatch_seq, got[1])
        STATS["fault:reordered_deliveries"] += 1

    @precondition(lambda self: self.engine is not None)
    @rule(twice=st.booleans())
    def concurrent_completions(self, twice: bool) -> None:
        """Workers completing from threads while a tick and a reconcile run."""
        if not self.launcher.queue:
            return
        self._step("concurrent")
        taken = [b for b in (self.launcher.take(0) for _ in range(3)) if b is not None]
        barrier = threading.Barrier(len(taken) + 2)
        errors: list[BaseException] = []
        crashed: list[bool] = []

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    barrier.wait(10)
                    fn()
                except Crash:
                    crashed.append(True)
                except BaseException as exc:
                    errors.append(exc)

            return run

        def worker(b: BatchDispatch) -> Callable[[], None]:
            def go() -> None:
                got = self._work(b)
                if got is not None:
                    for _ in range(2 if twice else 1):
                        if got[0] == "completed":
                            self.eng.listener.on_completions(self.job, [b.batch_id])
                        else:
                            self.eng.listener.on_failed(
                                self.job, b.batch_id, b.dispatch_seq, got[1]
                            )

            return go

        fns = [worker(b) for b in taken]
        fns.append(lambda: self.eng.check(self.job, "timer") and None)
        fns.append(lambda: self.eng.recovery.reconcile(self.job) and None)
        threads = [threading.Thread(target=guarded(f)) for f in fns]
        flags = self.eng.flags
        usable = self.env.redis.running() and flags._usable()
        down_until = flags._down_until
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a concurrent stimulus hung"
        if errors:
            raise errors[0]
        if crashed:  # that run never reached Redis; the others may have run before it
            self.flags_fresh = False
        elif usable and flags._down_until == down_until:
            self.flags_fresh = True
        STATS["fault:concurrent_stimuli"] += 1

    @precondition(lambda self: self.engine is not None)
    @rule(i=st.integers(0, 1000))
    def redeliver(self, i: int) -> None:
        """An old completion or failure arrives again (its fencing token may be stale)."""
        if not self.history:
            return
        self._step("redeliver")
        kind, batch_id, seq, message = self.history[i % len(self.history)]
        self._fault("duplicate_delivery")
        self._deliver(kind, batch_id, seq, message)

    @precondition(lambda self: self.engine is not None)
    @rule()
    def tick(self) -> None:
        self._step("tick")
        self._stimulus(self.eng.check, self.job, "timer")

    @precondition(lambda self: self.engine is not None)
    @rule(cause=st.sampled_from(["reconcile", "sweep"]))
    def reconcile(self, cause: str) -> None:
        self._step(cause)
        self._stimulus(lambda: self.eng.recovery.reconcile(self.job, cause=cause))

    @precondition(lambda self: self.engine is not None)
    @rule()
    def retry_failed(self) -> None:
        if self.status != "failed":
            return
        self._step("retry_failed")
        self._stimulus(self.eng.recovery.retry_failed, self.job)

    @precondition(lambda self: self.engine is not None)
    @rule(what=st.sampled_from([("processing",), ("dispatched",), ("processing", "dispatched")]))
    def time_passes(self, what: tuple[str, ...]) -> None:
        """Claimed (and/or dispatched) batches look older than staleAfterSeconds."""
        self._step("time_passes")
        self._age(what)

    def _age(self, what: tuple[str, ...]) -> None:
        assert self.conn is not None
        n = self.conn.execute(
            "UPDATE wave_batches SET heartbeat_at = heartbeat_at - interval '1 hour', "
            "started_at = started_at - interval '1 hour', "
            "dispatched_at = dispatched_at - interval '1 hour' "
            "WHERE job_id = %s AND status = ANY(%s)",
            (self.job, list(what)),
        ).rowcount
        if n:
            self._fault("stale_batches")

    # -- coordinator deaths --------------------------------------------------------------------
    @precondition(lambda self: self.engine is not None)
    @rule(
        how=st.sampled_from(
            ["after_commit", "connection", "connection", "process", "process", "runner"]
        ),
        point=st.sampled_from(POINTS),
        listener=st.booleans(),
        workers_survive=st.booleans(),
    )
    def coordinator_dies(self, how: str, point: str, listener: bool, workers_survive: bool) -> None:
        if how == "after_commit":
            self.coordinator_dies_after_commit()
        elif how == "connection":
            self.coordinator_connection_killed(point, listener)
        elif how == "process":
            self.coordinator_process_killed(point, listener)
        else:
            self.runner_restarts(workers_survive)

    def coordinator_dies_after_commit(self) -> None:
        """The next run that dispatches (whatever its stimulus) dies after its commit, before
        launching anything or touching Redis."""
        self._step("crash_after_commit")
        self.launcher.crash_next = True

    def _silent_completion(self) -> tuple[str, int] | None:
        """A worker completes a launched batch; its completion is about to be delivered."""
        b = self.launcher.take(0)
        if b is None:
            return None
        got = self._work(b)
        if got is None or got[0] != "completed":
            if got is not None:
                self._deliver(got[0], b.batch_id, b.dispatch_seq, got[1])
            return None
        return (b.batch_id, b.dispatch_seq)

    def coordinator_connection_killed(self, point: str, listener: bool) -> None:
        """pg_terminate_backend of the coordinator's connection from another session, while the
        run is stopped at `point` (holding the job lock before it commits)."""
        self._step("connection_killed")
        completion = self._silent_completion() if listener else None
        pause = Pause(point, timeout=20)
        uninstall = install_pause(self.eng, pause)
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                if completion is not None:
                    box["result"] = self.eng.listener.on_completions(self.job, [completion[0]])
                else:
                    box["result"] = self.eng.check(self.job, "timer")
            except psycopg.OperationalError as exc:
                box["killed"] = exc
            except Crash:
                box["crashed"] = True
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        try:
            deadline = time.monotonic() + 20
            while not pause.reached.is_set() and t.is_alive():
                assert time.monotonic() < deadline, "the coordinator run never got anywhere"
                time.sleep(0.001)
            if pause.reached.is_set():
                assert pause.backend_pid is not None
                assert self.conn is not None
                self.conn.execute("SELECT pg_terminate_backend(%s)", (pause.backend_pid,))
                self._fault(f"connection_killed_{point}")
                self.flags_fresh = False
        finally:
            pause.release.set()
            t.join(30)
            uninstall()
        assert not t.is_alive(), "the coordinator run hung after its connection was killed"
        if "error" in box:
            raise box["error"]
        if point in ("locked", "decided") and pause.reached.is_set():
            assert "killed" in box, "a killed transaction went on as if nothing happened"

    def coordinator_process_killed(self, point: str, listener: bool) -> None:
        """A coordinator process (forked from this one, with its own engine and connections)
        stopped at `point` and SIGKILLed there."""
        self._step("process_killed")
        completion = self._silent_completion() if listener else None
        url = self.env.redis.url if self.env.redis.running() else None
        pid, said = _fork_paused_coordinator(
            self.dsn, self.tenant, url, self.job, point, completion
        )
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        self._fault(f"process_killed_{point}" if said.startswith("PAUSED") else "process_killed")
        self.flags_fresh = False
        if said.startswith("PAUSED"):
            self._wait_backend_gone(int(said.split()[1]))
        else:
            assert said.startswith("DONE"), said

    def _wait_backend_gone(self, pid: int) -> None:
        assert self.conn is not None
        deadline = time.monotonic() + 15
        while self.conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} of a killed process lingers"
            time.sleep(0.002)

    def runner_restarts(self, workers_survive: bool) -> None:
        """The runner process dies and starts again from the database: a new engine, and the
        dispatched batches no worker of its own runs are adopted."""
        self._step("runner_restart")
        if not workers_survive:
            with self.launcher._lock:
                self.launcher.queue.clear()
        self.eng.close()
        self.engine = self._new_engine()
        with contextlib.suppress(Crash):
            self._adopt_dispatched()
        self._fault("runner_restarted_workers_" + ("survived" if workers_survive else "died"))

    # -- Redis ---------------------------------------------------------------------------------
    @precondition(lambda self: self.engine is not None)
    @rule(
        what=st.sampled_from(["flushall", "expire", "expire", "stop_or_start", "stop_or_start"]),
        which=st.sampled_from(["*", flagmod.MONITORING, flagmod.DERIVED_READY]),
    )
    def redis_fault(self, what: str, which: str) -> None:
        if not self.env.redis.running():
            self.redis_starts()
        elif what == "flushall":
            self.redis_flushall()
        elif what == "expire":
            self.redis_keys_expire(which)
        else:
            self.redis_stops()

    def redis_flushall(self) -> None:
        self._step("flushall")
        self.rc.flushall()
        self._fault("redis_flushall")
        self.flags_fresh = False

    def redis_keys_expire(self, which: str) -> None:
        self._step("expire")
        keys = list(self.rc.scan_iter(match=flagmod.key(self.tenant, self.job, which)))
        for k in keys:
            self.rc.pexpire(k, 1)
        time.sleep(0.003)
        if keys:
            self._fault("redis_keys_expired")
            self.flags_fresh = False

    def redis_stops(self) -> None:
        self._step("redis_stop")
        self.env.redis.stop()
        self._fault("redis_stopped")
        self.flags_fresh = False

    def redis_starts(self) -> None:
        self._step("redis_start")
        self.env.redis.start()
        self.flags_fresh = False  # an empty Redis

    # -- the rules, after every step -----------------------------------------------------------
    @invariant()
    def guard_rules_hold(self) -> None:
        if self.engine is None or self.conn is None:
            return
        STATS["checks"] += 1
        problems = audit.violations(self.conn, self.job, self.spec)
        job = self.conn.execute(Q("job_get"), {"job_id": self.job}).fetchone()
        assert job is not None
        self.status = job["status"]
        active = self.conn.execute(
            "SELECT count(*) AS n FROM wave_batches WHERE job_id = %s "
            "AND status IN ('dispatched', 'processing')",
            (self.job,),
        ).fetchone()
        if active and active["n"] > self.spec.parallelism:
            problems.append(f"{active['n']} batches active, parallelism {self.spec.parallelism}")
        if self.launcher.duplicates:
            problems.append(f"(batch, dispatch_seq) launched twice: {self.launcher.duplicates}")
        problems += self._flag_problems()
        if self.status == "running" and self._derived_unfinished():
            STATS["checks_with_derived_unfinished"] += 1
        assert not problems, "\n".join(problems)

    def _flag_problems(self) -> list[str]:
        """While the import runs, the monitoring flag is on (and the derived-ready flag too once
        a derived gate is open), whenever Redis is up and a run reached it since it lost them."""
        if self.status != "running" or not self.flags_fresh or not self.env.redis.running():
            return []
        STATS["flag_checks"] += 1
        out = []
        if self.rc.ttl(flagmod.key(self.tenant, self.job, flagmod.MONITORING)) <= 0:
            derived = self._derived_unfinished()
            out.append(f"monitoring flag off while running ({derived} derived batches unfinished)")
        if self._gate_open() and (
            self.rc.ttl(flagmod.key(self.tenant, self.job, flagmod.DERIVED_READY)) <= 0
        ):
            out.append("derived-ready flag off while the derived gate is open")
        return out

    def _derived_unfinished(self) -> int:
        assert self.conn is not None
        row = self.conn.execute(
            "SELECT count(*) AS n FROM wave_batches WHERE job_id = %s AND record_type_id = %s "
            "AND status IN ('pending', 'dispatched', 'processing')",
            (self.job, LINE),
        ).fetchone()
        return int(row["n"]) if row else 0

    def _gate_open(self) -> bool:
        assert self.conn is not None
        w = self.conn.execute(
            "SELECT total_batches AS t, completed_batches AS c FROM wave_coordination "
            "WHERE job_id = %s AND record_type_id = %s",
            (self.job, SALES_ORDER),
        ).fetchone()
        # the model's own statement of the gate, independent of engine/model.py parents_needed
        # (tests/unit/test_decide.py checks that function against this same inequality)
        return bool(w) and w["c"] * 100 >= self.spec.completionThreshold * w["t"]

    # -- liveness ------------------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            if self.engine is not None and self.conn is not None:
                self._liveness()
                STATS["sequences"] += 1
        finally:
            if self.engine is not None:
                self.engine.close()
            if self.conn is not None:
                self.conn.close()
            self.rc.close()
            if not self.env.redis.running():
                self.env.redis.start()
            if self.tenant:
                with psycopg.connect(self.dsn, autocommit=True) as admin:
                    admin.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                            sql.Identifier(self.tenant)
                        )
                    )

    def _liveness(self) -> None:
        """Faults lifted, every worker succeeds: a bounded number of nudges completes it."""
        self.launcher.crash_next = False
        if not self.env.redis.running():
            self.env.redis.start()
        status = ""
        for nudge in range(1, LIVENESS_NUDGES + 1):
            status = self._job_status()
            if status == "completed":
                break
            if status == "failed":
                self.eng.recovery.retry_failed(self.job)
            while (b := self.launcher.take(0)) is not None:
                got = self._work(b)
                if got is not None:
                    self._deliver(got[0], b.batch_id, b.dispatch_seq, got[1])
            self.eng.check(self.job, "timer")
            self._adopt_dispatched()
            if not self.launcher.queue:  # only dead workers hold batches: the sweep's turn
                self._age(("processing", "dispatched"))
                self.eng.recovery.reconcile(self.job, cause="sweep")
            STATS["liveness_nudges"] += 1
            STATS["liveness_nudges_max"] = max(STATS["liveness_nudges_max"], nudge)
        else:
            status = self._job_status()
        assert status == "completed", (
            f"not completed after {LIVENESS_NUDGES} nudges with every worker succeeding: "
            f"{status}; batches: {self._batch_summary()}"
        )
        self.guard_rules_hold()
        # Completed: a run that reaches Redis clears the monitoring flag.
        flags = self.eng.flags
        self.eng.check(self.job, "timer")
        if flags._usable() and self.env.redis.running():
            ttl = self.rc.ttl(flagmod.key(self.tenant, self.job, flagmod.MONITORING))
            assert ttl == -2, f"monitoring flag still set on a completed job (ttl {ttl})"

    def _adopt_dispatched(self) -> None:
        """Dispatched batches nobody runs get workers (Engine.sync_workers: a group for the job;
        its pooled workers claim whatever is dispatched)."""
        sync = self.eng.sync_workers(self.job)
        assert self.conn is not None
        rows = self.conn.execute(
            "SELECT batch_id, wave_number, record_type_id, dispatch_seq, attempts "
            "FROM wave_batches WHERE job_id = %s AND status = 'dispatched' ORDER BY id",
            (self.job,),
        ).fetchall()
        if rows and sync.job_status == "running":
            assert sync.groups, f"dispatched batches and no worker group: {sync}"
        self.launcher.adopt([BatchDispatch.from_row(self.job, r) for r in rows])

    def _job_status(self) -> str:
        assert self.conn is not None
        row = self.conn.execute(Q("job_get"), {"job_id": self.job}).fetchone()
        assert row is not None
        return str(row["status"])

    def _batch_summary(self) -> str:
        assert self.conn is not None
        rows = self.conn.execute(
            "SELECT batch_id, status, attempts, dispatch_seq FROM wave_batches WHERE job_id = %s "
            "AND status <> 'completed' ORDER BY id",
            (self.job,),
        ).fetchall()
        return ", ".join(f"{r['batch_id']}={r['status']}/{r['attempts']}" for r in rows) or "-"


def _fork_paused_coordinator(
    dsn: str,
    tenant: str,
    redis_url: str | None,
    job_id: str,
    point: str,
    completion: tuple[str, int] | None,
) -> tuple[int, str]:
    """Fork a coordinator process (its own engine, pool and Redis client) whose run stops at
    `point`; return its pid and what it said ("PAUSED <backend pid>" or "DONE <outcome>")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test, never runs finalizers
        code = 0
        try:
            os.close(r)

            engine = Engine(dsn, tenant, redis_url=redis_url, launcher=NoWorkers(), pool_size=2)
            pause = Pause(point, timeout=600)
            pause.on_reached = lambda p: os.write(w, f"PAUSED {p.backend_pid}\n".encode()) and None
            install_pause(engine, pause)
            if completion is not None:
                res = engine.listener.on_completions(job_id, [completion[0]])
            else:
                res = engine.check(job_id, "timer")
            os.write(w, f"DONE {res.outcome.value}\n".encode())
            time.sleep(600)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(w, f"ERROR {type(exc).__name__}: {exc}\n".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        said = os.read(r, 4096).decode().strip() if ready else "TIMEOUT"
    finally:
        os.close(r)
    if not said.startswith(("PAUSED", "DONE")):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"forked coordinator: {said}")
    return pid, said


def _summary(seconds: float) -> list[str]:
    faults = {k.split(":", 1)[1]: n for k, n in STATS.items() if k.startswith("fault:")}
    steps = {k.split(":", 1)[1]: n for k, n in STATS.items() if k.startswith("step:")}
    return [
        f"guard rules: {STATS['sequences']} sequences, {STATS['steps']} steps, "
        f"{STATS['checks']} invariant checks ({STATS['flag_checks']} with the Redis flags), "
        f"{STATS['faults']} faults injected, in {seconds:.0f}s; "
        f"{STATS['checks_with_derived_unfinished']} checks ran with derived batches unfinished",
        "  faults: " + ", ".join(f"{k}={v}" for k, v in sorted(faults.items())),
        "  steps: " + ", ".join(f"{k}={v}" for k, v in sorted(steps.items())),
        f"  liveness: {STATS['liveness_nudges']} nudges in all, at most "
        f"{STATS['liveness_nudges_max']} per sequence (bound {LIVENESS_NUDGES}); worker exits "
        + ", ".join(
            f"{k.split(':')[1]}={v}"
            for k, v in sorted(STATS.items())
            if k.startswith("worker_exit")
        ),
    ]


def test_guard_rules_hold_under_random_faults(pg: LocalPostgres, redis_server: LocalRedis) -> None:
    if not pg.running():
        pg.start()
    if not redis_server.running():
        redis_server.start()
    ENV["current"] = Env(pg, redis_server)
    STATS.clear()
    t0 = time.monotonic()
    try:
        run_state_machine_as_test(
            GuardRules,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.data_too_large,
                    HealthCheck.filter_too_much,
                ],
            ),
        )
    finally:
        ENV.clear()
        REPORT.extend(_summary(time.monotonic() - t0))
    assert STATS["sequences"] >= EXAMPLES
    # The faults this test is about were all injected, many times over.
    for name in (
        "coordinator_died_after_commit",
        "connection_killed_locked",
        "connection_killed_decided",
        "process_killed_locked",
        "process_killed_decided",
        "redis_flushall",
        "redis_stopped",
        "stale_batches",
        "worker_died_mid_batch",
        "duplicate_delivery",
    ):
        assert STATS[f"fault:{name}"] > 0, f"{name} never injected"
