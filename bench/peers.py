"""Issue 16 rows "peers" and "fairness" (the importwaves side; the peers run in their own
virtualenvs: bench/dbos_peer.py, bench/pgqueuer_peer.py).

peers: the row 1 fan-in lag of importwaves (bench/lag.py, listener path) interleaved, round by
round, with DBOS Transact queues (default polling, and its shortest) and PgQueuer; then the
reference demo import (20,000 orders, 100,004 lines) through importwaves (local runner, pooled
worker processes, parallelism 4, as `importwaves demo`) and through DBOS queues (one workflow
with one step per batch, worker_concurrency 4, the same SQL), one after the other.

fairness: two tenants under one CapacityKeeper(Budget(total=8)), each run by the local runner
with its own pooled LocalLauncher (parallelism 8 each, so each alone fills the budget). The big
import has ~100x the small one's batches. Solo runs of each, then the big one with the small
one started 1 s later. Small slowdown = small's import time shared / solo; big throughput ratio
= (batches / import time) shared / solo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import BENCH_DIR, new_tenant, tenant_conn
from importwaves.datagen import generate, reference_spec
from importwaves.db.queries import Q
from importwaves.engine.app import Engine
from importwaves.engine.budget import Budget
from importwaves.engine.capacity import CapacityKeeper
from importwaves.launch.local import LocalLauncher
from importwaves.launch.port import LaunchTarget
from importwaves.runner import LocalRunner
from importwaves.spec import ImportSpec
from importwaves.verify import verify_import

REPO = BENCH_DIR.parent
PEER_REQS = {
    "dbos": "dbos==3.4.0",
    "pgqueuer": "pgqueuer==1.6.0 psycopg[binary]>=3.2 asyncpg>=0.30",
}
DEMO_QUERIES = (
    "invalid_staging_rows",
    "import_customers",
    "import_transactions",
    "import_transaction_lines",
)


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peer_python(name: str) -> Path:
    """bench/.venv-<name>/bin/python, created on first use (peers stay out of .venv)."""
    venv = BENCH_DIR / f".venv-{name}"
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    req = PEER_REQS[name]
    if not stamp.exists() or stamp.read_text().strip() != req:
        say(f"creating {venv.relative_to(REPO)} ({req})")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *req.split()],
            check=True,
        )
        stamp.write_text(req + "\n")
    return py


def run_peer(name: str, args: list[str], log: Path, timeout: float = 1800) -> dict[str, Any]:
    py = peer_python(name)
    with log.open("a") as err:
        out = subprocess.run(
            [str(py), "-m", f"bench.{name}_peer", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=timeout,
            check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"{name} peer failed (exit {out.returncode}); log: {log}")
    return dict(json.loads(out.stdout))


# -- demo import ---------------------------------------------------------------------------------
def importwaves_demo(dsn: str, redis_url: str, tenant: str, job_id: str) -> dict[str, Any]:
    """The `importwaves demo` import (reference spec, parallelism 4, pooled local workers)."""
    spec = reference_spec(tenant, parallelism=4)
    with (
        LocalLauncher(dsn) as launcher,
        Engine(dsn, tenant, redis_url=redis_url, launcher=launcher) as engine,
    ):
        engine.submit(job_id, spec, target=LaunchTarget("local"))
        stats = LocalRunner(engine, tick=0.5, sweep_every=15).run(job_id, timeout=1800)
        with engine.pool.connection() as conn:
            ok = verify_import(conn, job_id, spec).ok
    return {"wall_s": stats.seconds, "status": stats.status, "verified": ok}


def stage_demo(dsn: str, tenant: str, job_id: str, orders: int) -> int:
    with tenant_conn(dsn, tenant) as conn:
        return generate(conn, job_id, orders=orders).lines


def target_rows(dsn: str, tenant: str) -> dict[str, int]:
    with tenant_conn(dsn, tenant) as conn:
        return {
            t: int(next(iter(conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone().values())))  # type: ignore[union-attr]
            for t in ("customers", "transactions", "transaction_lines")
        }


def demo_side_by_side(
    dsn: str, redis_url: str, workdir: Path, orders: int, dbos_poll: float
) -> dict[str, Any]:
    qfile = workdir / "demo-queries.json"
    qfile.write_text(json.dumps({n: Q(n) for n in DEMO_QUERIES}))
    out: dict[str, Any] = {"orders": orders}
    iw_t = new_tenant(dsn, "bench_demo_iw")
    out["lines"] = stage_demo(dsn, iw_t, "demo-import", orders)
    say(f"peers: importwaves demo import ({orders:,} orders, {out['lines']:,} lines)")
    out["importwaves"] = importwaves_demo(dsn, redis_url, iw_t, "demo-import")
    out["importwaves"]["rows"] = target_rows(dsn, iw_t)
    for key, poll in (("dbos_shortest", dbos_poll), ("dbos_default", 1.0)):
        db_t = new_tenant(dsn, f"bench_demo_{key}")
        stage_demo(dsn, db_t, "demo-import", orders)
        say(f"peers: the same import through DBOS queues (polling {poll:g} s)")
        out[key] = run_peer(
            "dbos",
            [
                "demo",
                f"--dsn={dsn}",
                f"--label=demo_{key}",
                f"--tenant={db_t}",
                "--job=demo-import",
                f"--queries={qfile}",
                f"--poll={poll}",
                "--concurrency=4",
            ],
            workdir / f"dbos-demo-{key}.log",
        )
        out[key]["rows"] = target_rows(dsn, db_t)
    return out


# -- fairness ------------------------------------------------------------------------------------
def fair_spec(tenant: str) -> ImportSpec:
    return reference_spec(
        tenant,
        recordTypes=[
            {"name": "Customer", "recordTypeId": -2, "batchSize": 100},
            {
                "name": "SalesOrder",
                "recordTypeId": -30,
                "batchSize": 10,
                "parentTypes": ["Customer"],
            },
        ],
        derivedTypes=[
            {
                "name": "TransactionLine",
                "recordTypeId": -13,
                "batchSize": 250,
                "parentTypes": ["SalesOrder"],
            }
        ],
        parallelism=8,
    )


def _batches(dsn: str, tenant: str, job_id: str) -> dict[str, Any]:
    """Completed batches, and per batch (means, ms): dispatch -> worker start, start -> done."""
    with tenant_conn(dsn, tenant) as conn:
        row = conn.execute(
            "SELECT count(*) AS n, "
            "1000 * avg(extract(epoch FROM started_at - dispatched_at)) AS wait_ms, "
            "1000 * avg(extract(epoch FROM completed_at - started_at)) AS run_ms "
            "FROM wave_batches WHERE job_id = %s AND status = 'completed'",
            (job_id,),
        ).fetchone()
    if not row:
        return {"batches": 0}
    return {
        "batches": int(row["n"]),
        "mean_dispatch_to_start_ms": round(float(row["wait_ms"] or 0), 1),
        "mean_start_to_done_ms": round(float(row["run_ms"] or 0), 1),
    }


def _run_import(
    dsn: str, tenant: str, job_id: str, keeper: CapacityKeeper, out: dict[str, Any]
) -> None:
    try:
        with (
            LocalLauncher(dsn) as launcher,
            Engine(dsn, tenant, launcher=launcher, capacity=keeper) as engine,
        ):
            engine.submit(job_id, fair_spec(tenant), target=LaunchTarget("local"))
            t0 = time.monotonic()
            stats = LocalRunner(engine, tick=0.2).run(job_id, timeout=1800)
            out["seconds"] = time.monotonic() - t0
            out["runner_seconds"] = stats.seconds
            out["status"] = stats.status
    except BaseException as exc:  # reported by the caller
        out["error"] = f"{type(exc).__name__}: {exc}"
    out.update(_batches(dsn, tenant, job_id))


def fairness(dsn: str, small_orders: int, budget: int = 8) -> dict[str, Any]:
    big_orders = small_orders * 100
    runs: dict[str, dict[str, Any]] = {}

    def fresh(name: str, orders: int) -> str:
        t = new_tenant(dsn, name)
        with tenant_conn(dsn, t) as conn:
            generate(conn, "imp", orders=orders)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CHECKPOINT")
        return t

    for label, orders in (("small_solo", small_orders), ("big_solo", big_orders)):
        t = fresh(f"bench_fair_{label}", orders)
        keeper = CapacityKeeper(Budget(total=budget))
        say(f"fairness: {label} ({orders:,} orders), budget {budget}")
        runs[label] = {}
        try:
            _run_import(dsn, t, "imp", keeper, runs[label])
        finally:
            keeper.close()
    big_t = fresh("bench_fair_big", big_orders)
    small_t = fresh("bench_fair_small", small_orders)
    keeper = CapacityKeeper(Budget(total=budget))
    runs["big_shared"], runs["small_shared"] = {}, {}
    say("fairness: big first, small 1 s after the big one holds the whole budget")
    samples: list[dict[str, int]] = []
    stop = threading.Event()

    def sample() -> None:  # slots held per tenant, every 20 ms, while the small one runs
        while not stop.wait(0.02):
            samples.append(keeper.holding())

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        tb = threading.Thread(
            target=_run_import, args=(dsn, big_t, "imp", keeper, runs["big_shared"])
        )
        tb.start()
        deadline = time.monotonic() + 120
        while keeper.holding().get(big_t, 0) < budget and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # the arrival gap
        runs["small_shared"]["big_held_at_small_start"] = keeper.holding().get(big_t, 0)
        sampler.start()
        ts = threading.Thread(
            target=_run_import, args=(dsn, small_t, "imp", keeper, runs["small_shared"])
        )
        ts.start()
        ts.join(1900)
        stop.set()
        tb.join(1900)
    finally:
        stop.set()
        keeper.close()
    busy = [x for x in samples if x.get(small_t, 0) > 0 or x.get(big_t, 0) > 0]
    held_while_small_ran = {
        "samples": len(busy),
        "small_mean": round(sum(x.get(small_t, 0) for x in busy) / max(1, len(busy)), 2),
        "big_mean": round(sum(x.get(big_t, 0) for x in busy) / max(1, len(busy)), 2),
        "total_max": max((x.get(small_t, 0) + x.get(big_t, 0) for x in busy), default=0),
    }
    errors = {k: v["error"] for k, v in runs.items() if "error" in v}
    if errors:
        raise RuntimeError(f"fairness imports failed: {errors}")
    tput = {k: v["batches"] / v["seconds"] for k, v in runs.items()}
    return {
        "budget": budget,
        "spec": "Customer 100, SalesOrder 10, TransactionLine 250 per batch; parallelism 8 each",
        "orders": {"small": small_orders, "big": big_orders},
        "runs": {
            k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()}
            for k, v in runs.items()
        },
        "small_slowdown": round(runs["small_shared"]["seconds"] / runs["small_solo"]["seconds"], 2),
        "big_throughput_ratio": round(tput["big_shared"] / tput["big_solo"], 3),
        "throughput_batches_per_s": {k: round(v, 1) for k, v in tput.items()},
        "slots_held_while_small_ran": held_while_small_ran,
    }
