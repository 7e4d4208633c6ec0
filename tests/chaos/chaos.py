"""Process-level chaos: a demo-size import whose runner process is SIGKILLed at random moments.

    python tests/chaos/chaos.py [--orders 20000] [--kills 20] [--seed N]     (`make chaos`)

The demo's data (`importwaves.datagen.generate(orders=...)`) and the demo's spec (with
staleAfterSeconds=5) are imported by a runner process: the real `LocalRunner` with the real
`LocalLauncher` (pooled worker subprocesses running `python -m importwaves.worker_pool`), one
runner process per incarnation. While it runs, this driver

- SIGKILLs the runner at random moments (at least --kills times), either alone (its workers live
  on, orphaned, and finish their batches) or together with its workers (their claimed batches
  are left `processing`; the new runner's worker sync fails their attempt once their `local:<pid>`
  worker is gone and the grace has passed), and starts a new runner each time, which resumes
  from the database (the orphaned pooled workers still alive are counted as its own; dispatched
  batches get workers);
- flushes Redis and restarts it;
- SIGKILLs workers in the middle of their batch.

It ends with the demo's verification (`importwaves.verify.verify_import`), the guard rules of
`tests/audit.py` over every recorded transition, and a table. Definitions:

    duplicate dispatches  a dispatch (batch, dispatch_seq) claimed twice, or a batch completed
                          twice (the transition record); a re-dispatch under a new
                          dispatch_seq is legal (fencing)
    completed unclaimed   a batch completed under a dispatch no worker claimed (never expected)
    lost rows             staged rows missing from their target table at the end
    recovered             a restarted runner read the database, adopted what was orphaned and
                          entered its loop before the next kill
    time to recover       from the SIGKILL to that moment (and to the first new dispatch)

`tests/chaos/test_chaos_short.py` runs a short version (5 kills, a small import) in `make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the audit module

import psycopg  # noqa: E402

import audit  # noqa: E402
from importwaves.datagen import generate, reference_spec  # noqa: E402
from importwaves.db import migrate  # noqa: E402
from importwaves.db.connect import connect  # noqa: E402
from importwaves.launch.local import LocalLauncher  # noqa: E402
from importwaves.launch.port import LaunchProblem, LaunchTarget, WorkerGroup  # noqa: E402
from importwaves.localdev import LocalPostgres, LocalRedis  # noqa: E402
from importwaves.spec import ImportSpec  # noqa: E402
from importwaves.verify import verify_import  # noqa: E402

JOB_ID = "chaos-import"


@dataclass
class ChaosConfig:
    orders: int = 20_000
    kills: int = 20
    seed: int | None = None
    parallelism: int = 4
    #: seconds each worker holds its batch (workers have work in progress when kills land)
    hold: float = 0.3
    #: a kill lands this long (uniform) after the (re)started runner resumed (its loop began,
    #: so every kill interrupts a runner at work, however slowly a loaded machine starts it)...
    kill_after: tuple[float, float] = (0.2, 2.5)
    #: ...or this long after its start if it has not resumed by then (killed while starting)
    resume_wait: float = 15.0
    redis_every: tuple[float, float] = (2.0, 5.0)
    worker_kill_every: tuple[float, float] = (1.5, 4.0)
    timeout: float = 900.0
    #: (Customer, SalesOrder, TransactionLine) batch sizes; None keeps the demo's
    batch_sizes: tuple[int, int, int] | None = None


@dataclass
class KillRecord:
    at: float
    mode: str  # "runner" | "runner+workers"
    resumed_after: float | None = None  # seconds from the kill to the new runner's loop
    dispatch_after: float | None = None  # seconds from the kill to its first new dispatch


@dataclass
class ChaosResult:
    orders: int
    seconds: float
    kills: list[KillRecord] = field(default_factory=list)
    redis_flushes: int = 0
    redis_restarts: int = 0
    workers_killed: int = 0
    orphans_adopted: int = 0
    stale_demoted: int = 0
    unexpected_runner_exits: list[str] = field(default_factory=list)
    duplicate_claims: int = 0
    duplicate_completions: int = 0
    launches: int = 0
    batches: int = 0
    dispatches: int = 0
    completed_unclaimed: list[str] = field(default_factory=list)
    staged: dict[str, int] = field(default_factory=dict)
    imported: dict[str, int] = field(default_factory=dict)
    verification: list[tuple[str, bool, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    job_status: str = ""

    @property
    def recoveries(self) -> int:
        return sum(1 for k in self.kills if k.resumed_after is not None)

    @property
    def duplicate_dispatches(self) -> int:
        return self.duplicate_claims + self.duplicate_completions

    @property
    def lost_rows(self) -> int:
        return sum(max(0, n - self.imported.get(t, 0)) for t, n in self.staged.items())

    @property
    def ok(self) -> bool:
        return (
            self.job_status == "completed"
            and self.duplicate_dispatches == 0
            and self.lost_rows == 0
            and all(ok for _, ok, _ in self.verification)
            and not self.violations
            and not self.unexpected_runner_exits
            and not self.completed_unclaimed
        )

    def table(self) -> str:
        def secs(values: Sequence[float | None]) -> str:
            got = sorted(v for v in values if v is not None)
            if not got:
                return "-"
            return (
                f"median {statistics.median(got):.2f}s, max {got[-1]:.2f}s "
                f"(min {got[0]:.2f}s, n={len(got)})"
            )

        modes = Counter(k.mode for k in self.kills)
        rows = [
            ("import", f"{self.orders:,} orders; job {self.job_status} in {self.seconds:.1f}s"),
            (
                "runner kills (SIGKILL)",
                f"{len(self.kills)} ({modes['runner']} runner alone, "
                f"{modes['runner+workers']} with its workers)",
            ),
            ("recoveries", f"{self.recoveries} (restart resumed from the DB before next kill)"),
            ("time to recover", secs([k.resumed_after for k in self.kills])),
            ("kill -> first new dispatch", secs([k.dispatch_after for k in self.kills])),
            ("Redis flushes / restarts", f"{self.redis_flushes} / {self.redis_restarts}"),
            ("workers killed mid-batch", str(self.workers_killed)),
            ("orphaned dispatches adopted", str(self.orphans_adopted)),
            ("stale batches demoted", str(self.stale_demoted)),
            (
                "batches / dispatches / launches",
                f"{self.batches} / {self.dispatches} fencing tokens issued / {self.launches} "
                "pooled worker processes started",
            ),
            (
                "completed by an unclaimed dispatch",
                str(len(self.completed_unclaimed))
                + (f": {self.completed_unclaimed[:5]}" if self.completed_unclaimed else ""),
            ),
            (
                "duplicate dispatches",
                f"{self.duplicate_dispatches} (same (batch, seq) claimed twice: "
                f"{self.duplicate_claims}, "
                f"batch completed twice: {self.duplicate_completions})",
            ),
            (
                "lost rows",
                f"{self.lost_rows} ("
                + ", ".join(
                    f"{t} {self.imported.get(t, 0):,}/{n:,}" for t, n in self.staged.items()
                )
                + ")",
            ),
            (
                "verification",
                "ok"
                if all(ok for _, ok, _ in self.verification)
                else "FAILED: "
                + "; ".join(f"{n}: {d}" for n, ok, d in self.verification if not ok),
            ),
            ("guard rules (audit)", "ok" if not self.violations else "; ".join(self.violations)),
            (
                "unexpected runner exits",
                str(len(self.unexpected_runner_exits))
                + (
                    ": " + " | ".join(self.unexpected_runner_exits)
                    if self.unexpected_runner_exits
                    else ""
                ),
            ),
        ]
        width = max(len(k) for k, _ in rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * 72
        out = [line, f"| {'chaos':<{width}} | {'result'}", line]
        out += [f"| {k:<{width}} | {v}" for k, v in rows]
        out += [line, "RESULT: " + ("PASS" if self.ok else "FAIL")]
        return "\n".join(out)


# -- the runner process ----------------------------------------------------------------------------
class LoggingLauncher(LocalLauncher):
    """The local launcher, logging each pooled worker it starts to a shared file."""

    def __init__(self, dsn: str, path: Path) -> None:
        super().__init__(dsn)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        before = set(self.pids())
        problems = super().ensure(target, tenant, groups)
        for wid in sorted(set(self.pids()) - before):
            os.write(self._fd, f"{os.getpid()} {wid}\n".encode())
        return problems


def runner_main(args: argparse.Namespace) -> int:
    """One runner incarnation: submit (idempotent), then the LocalRunner loop to the end."""
    from importwaves import log as iwlog
    from importwaves.engine.app import Engine
    from importwaves.runner import LocalRunner

    iwlog.setup("INFO")
    spec = ImportSpec.model_validate_json(Path(args.spec).read_text())
    launcher = LoggingLauncher(args.dsn, Path(args.launches))
    marker = Path(args.resumed)
    with Engine(args.dsn, spec.tenant, redis_url=args.redis_url, launcher=launcher) as engine:
        engine.submit(JOB_ID, spec, target=LaunchTarget("local"))
        runner = LocalRunner(engine, tick=0.5, sweep_every=2.5)

        def resumed() -> None:
            if not marker.exists():
                marker.write_text(f"{time.time()}\n")

        stats = runner.run(JOB_ID, timeout=args.timeout, on_progress=resumed, progress_every=0)
    print(f"runner: {stats.status} in {stats.seconds:.1f}s ({stats.worker_runs} worker runs)")
    return 0 if stats.status == "completed" else 1


# -- the driver ------------------------------------------------------------------------------------
class Chaos:
    def __init__(
        self, cfg: ChaosConfig, dsn: str, tenant: str, redis: LocalRedis, workdir: Path
    ) -> None:
        self.cfg = cfg
        self.dsn = dsn
        self.tenant = tenant
        self.redis = redis
        self.workdir = workdir
        self.rng = random.Random(cfg.seed)
        self.launches = workdir / "launches.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self._mode_offset = 0
        self.result = ChaosResult(cfg.orders, 0.0)
        overrides: dict[str, Any] = {}
        if cfg.batch_sizes is not None:
            base = reference_spec(tenant)
            c, o, lines = cfg.batch_sizes
            overrides = {
                "recordTypes": [
                    base.recordTypes[0].model_copy(update={"batchSize": c}).model_dump(),
                    base.recordTypes[1].model_copy(update={"batchSize": o}).model_dump(),
                ],
                "derivedTypes": [
                    base.derivedTypes[0].model_copy(update={"batchSize": lines}).model_dump()
                ],
            }
        self.spec = reference_spec(
            tenant, parallelism=cfg.parallelism, staleAfterSeconds=5, retries=10, **overrides
        )

    # -- setup -------------------------------------------------------------------------------
    def prepare(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            migrate.up(admin, self.tenant)
        with connect(self.dsn, self.tenant, autocommit=True) as conn:
            audit.install(conn)
            data = generate(conn, JOB_ID, orders=self.cfg.orders)
        self.result.staged = {
            "customers": data.customers,
            "transactions": data.orders,
            "transaction_lines": data.lines,
        }
        (self.workdir / "spec.json").write_text(self.spec.model_dump_json())
        self.launches.write_text("")

    def start_runner(self) -> float:
        self.incarnation += 1
        marker = self.workdir / f"resumed-{self.incarnation}"
        log = (self.workdir / f"runner-{self.incarnation}.log").open("wb")
        env = {**os.environ, "IMPORTWAVES_WORKER_HOLD_SECONDS": str(self.cfg.hold)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "runner",
                "--dsn",
                self.dsn,
                "--redis-url",
                self.redis.url,
                "--spec",
                str(self.workdir / "spec.json"),
                "--launches",
                str(self.launches),
                "--resumed",
                str(marker),
                "--timeout",
                str(self.cfg.timeout),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return time.time()

    def _kill_time(self, started: float, now: float) -> float | None:
        """When to kill the current runner: kill_after past its resume (its marker), or at
        once when it has not resumed within resume_wait; None while it is still starting."""
        marker = self.workdir / f"resumed-{self.incarnation}"
        if marker.exists():
            with contextlib.suppress(ValueError):
                return float(marker.read_text().strip()) + self.rng.uniform(*self.cfg.kill_after)
        return now if now - started > self.cfg.resume_wait else None

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> ChaosResult:
        t0 = time.monotonic()
        self.prepare()
        _subreaper(True)
        started = self.start_runner()
        next_kill: float | None = None  # set once the runner has resumed (see _kill_time)
        next_redis = time.time() + self.rng.uniform(*self.cfg.redis_every)
        next_worker = time.time() + self.rng.uniform(*self.cfg.worker_kill_every)
        deadline = time.monotonic() + self.cfg.timeout
        try:
            while True:
                _reap()
                assert self.proc is not None
                rc = self.proc.poll()
                if rc is not None:
                    if rc == 0:
                        break
                    self.result.unexpected_runner_exits.append(
                        f"runner #{self.incarnation} exited {rc}: {self._log_tail()}"
                    )
                    started = self.start_runner()
                    next_kill = None
                now = time.time()
                if next_kill is None:
                    next_kill = self._kill_time(started, now)
                if (
                    len(self.result.kills) < self.cfg.kills
                    and next_kill is not None
                    and now >= next_kill
                ):
                    if not self.kill_runner():
                        continue  # it had just finished: its exit code is looked at first
                    started = self.start_runner()
                    next_kill = None
                if now >= next_redis:
                    self.hit_redis()
                    next_redis = time.time() + self.rng.uniform(*self.cfg.redis_every)
                if now >= next_worker:
                    self.kill_a_worker()
                    next_worker = time.time() + self.rng.uniform(*self.cfg.worker_kill_every)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the import did not finish in {self.cfg.timeout}s")
                time.sleep(0.02)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            self._wait_for_workers(15)
            _subreaper(False)
            _reap()
        self.result.seconds = time.monotonic() - t0
        self.measure()
        return self.result

    def kill_runner(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return False
        # alternate (from a random start): the runner alone, then with its workers
        if not self.result.kills:
            self._mode_offset = self.rng.randrange(2)
        mode = ("runner", "runner+workers")[(len(self.result.kills) + self._mode_offset) % 2]
        at = time.time()
        if mode == "runner":
            self.proc.kill()
        else:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.result.kills.append(KillRecord(at, mode))
        return True

    def hit_redis(self) -> None:
        if self.rng.random() < 0.6:
            import redis as redis_lib

            with contextlib.suppress(redis_lib.RedisError):
                client = redis_lib.Redis.from_url(self.redis.url, socket_timeout=2)
                client.flushall()
                client.close()
                self.result.redis_flushes += 1
        else:
            self.redis.restart()
            self.result.redis_restarts += 1

    def kill_a_worker(self) -> None:
        """SIGKILL the worker process of a batch that is `processing` (mid-batch)."""
        with connect(self.dsn, self.tenant, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT worker_id FROM wave_batches WHERE job_id = %s AND status = 'processing'",
                (JOB_ID,),
            ).fetchall()
        pids = []
        for r in rows:
            with contextlib.suppress(ValueError, IndexError, TypeError, OSError):
                pid = int(str(r["worker_id"]).split(":")[1])
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"importwaves.worker" in cmd:
                    pids.append(pid)
        if pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.rng.choice(pids), signal.SIGKILL)
                self.result.workers_killed += 1

    # -- results -----------------------------------------------------------------------------
    def measure(self) -> None:
        res = self.result
        res.launches = len(self.launches.read_text().splitlines())
        with connect(self.dsn, self.tenant, autocommit=True) as conn:
            rows = audit.audit_rows(conn, JOB_ID)
            res.duplicate_claims = sum(
                1
                for n in Counter(
                    (a["batch_id"], a["dispatch_seq"])
                    for a in rows
                    if a["new_status"] == "processing"
                ).values()
                if n > 1
            )
            res.duplicate_completions = sum(
                1
                for n in Counter(
                    a["batch_id"] for a in rows if a["new_status"] == "completed"
                ).values()
                if n > 1
            )
            res.stale_demoted = sum(
                1 for a in rows if a["old_status"] == "processing" and a["new_status"] == "pending"
            )
            res.orphans_adopted = sum(
                1
                for a in rows
                if a["old_status"] == "dispatched" and a["new_status"] == "dispatched"
            )
            final = conn.execute(
                "SELECT batch_id, dispatch_seq FROM wave_batches WHERE job_id = %s "
                "AND status = 'completed'",
                (JOB_ID,),
            ).fetchall()
            res.batches = len(final)
            res.dispatches = sum(r["dispatch_seq"] for r in final)
            claimed = {
                (a["batch_id"], a["dispatch_seq"]) for a in rows if a["new_status"] == "processing"
            }
            res.completed_unclaimed = [
                r["batch_id"] for r in final if (r["batch_id"], r["dispatch_seq"]) not in claimed
            ]
            dispatches = sorted(
                a["at"].timestamp() for a in rows if a["new_status"] == "dispatched"
            )
            v = verify_import(conn, JOB_ID, self.spec)
            res.verification = v.checks
            res.violations = audit.violations(conn, JOB_ID, self.spec)
            res.imported = {
                r["target"]: r["n"]
                for r in conn.execute(
                    "SELECT 'customers' AS target, count(*) AS n FROM customers "
                    "WHERE imported_job = %(j)s UNION ALL SELECT 'transactions', count(*) "
                    "FROM transactions WHERE imported_job = %(j)s UNION ALL "
                    "SELECT 'transaction_lines', count(*) FROM transaction_lines "
                    "WHERE imported_job = %(j)s",
                    {"j": JOB_ID},
                ).fetchall()
            }
            job = conn.execute("SELECT status FROM import_jobs WHERE job_id = %s", (JOB_ID,))
            row = job.fetchone()
            res.job_status = row["status"] if row else "missing"
        # recovery: the new runner's loop began (its marker), and its first dispatch
        for i, k in enumerate(res.kills):
            until = res.kills[i + 1].at if i + 1 < len(res.kills) else float("inf")
            marker = self.workdir / f"resumed-{i + 2}"
            if marker.exists():
                t = float(marker.read_text().strip())
                if t < until:
                    k.resumed_after = t - k.at
            first = next((d for d in dispatches if d > k.at), None)
            if first is not None and first < until:
                k.dispatch_after = first - k.at

    def _log_tail(self) -> str:
        path = self.workdir / f"runner-{self.incarnation}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return " / ".join(lines[-3:])

    def _wait_for_workers(self, timeout: float) -> None:
        """Orphaned workers finish (or are fenced out) before the final checks."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _worker_pids(self.tenant):
            _reap()
            time.sleep(0.05)
        for pid in _worker_pids(self.tenant):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap()


def _subreaper(on: bool) -> None:
    """While a run lasts, orphaned workers (their runner was killed) are re-parented to this
    process and reaped here. Cleared afterwards: any daemon started later (a test server's
    postmaster) would otherwise become this process's child and stay a zombie once killed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _worker_pids(tenant: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if b"importwaves.worker" not in (entry / "cmdline").read_bytes():
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
            if f"IMPORTWAVES_TENANT={tenant}".encode() in env:
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(entry.name))
    return out


def run_chaos(
    cfg: ChaosConfig, *, dsn: str, tenant: str, redis: LocalRedis, workdir: Path
) -> ChaosResult:
    workdir.mkdir(parents=True, exist_ok=True)
    return Chaos(cfg, dsn, tenant, redis, workdir).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    r = sub.add_parser("runner")
    for opt in ("--dsn", "--redis-url", "--spec", "--launches", "--resumed"):
        r.add_argument(opt, required=True)
    r.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--parallelism", type=int, default=4)
    parser.add_argument("--hold", type=float, default=0.3)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards if given")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.cmd == "runner":
        return runner_main(args)

    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    cfg = ChaosConfig(
        orders=args.orders,
        kills=args.kills,
        seed=seed,
        parallelism=args.parallelism,
        hold=args.hold,
    )
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="importwaves-chaos-"))).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    keep = args.workdir is not None
    print(f"chaos: seed {seed}, {cfg.orders:,} orders, >= {cfg.kills} kills; workdir {workdir}")
    pg = LocalPostgres(workdir / "pg", fsync=False).start()
    redis = LocalRedis(workdir / "redis").start()
    try:
        result = run_chaos(cfg, dsn=pg.dsn(), tenant="chaos", redis=redis, workdir=workdir)
    finally:
        redis.stop()
        pg.destroy()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(result.table())
    if len(result.kills) < cfg.kills:
        print(f"only {len(result.kills)} kills landed before the import finished")
    if args.json:
        args.json.write_text(json.dumps(_as_json(result), indent=2, default=str))
    return 0 if result.ok and len(result.kills) >= cfg.kills else 1


def _as_json(r: ChaosResult) -> dict[str, Any]:
    return {
        "orders": r.orders,
        "seconds": r.seconds,
        "kills": len(r.kills),
        "recoveries": r.recoveries,
        "duplicate_dispatches": r.duplicate_dispatches,
        "lost_rows": r.lost_rows,
        "time_to_recover": [k.resumed_after for k in r.kills],
        "ok": r.ok,
    }


if __name__ == "__main__":
    sys.exit(main())
