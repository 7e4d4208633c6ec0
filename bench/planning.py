"""Row 4: planning one million staging records (run in its own process for a clean RSS).

    python -m bench.planning --dsn DSN --tenant T [--customers 100000 --orders 900000]

Stages 100k customers and 900k sales orders (1M main records; planning never reads derived
records), submits the reference spec (batches of 500) and times the engine's first reconcile,
which plans every main batch server-side (one INSERT ... SELECT per record type) and dispatches
the first batches. Memory: this process's peak RSS (getrusage) and, sampled every 10 ms while
the reconcile runs, the PostgreSQL backend's private memory (RssAnon) and peak RSS (VmHWM, which
also counts the shared buffers it touched), plus the temporary files the backend wrote.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time

import psycopg

from bench.common import BQ, one, proc_status_kb, tenant_conn
from importwaves.datagen import reference_spec
from importwaves.engine.app import Engine

JOB = "plan-1m"
APP = "importwaves-bench-planner"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.planning")
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--orders", type=int, default=900_000)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    with tenant_conn(args.dsn, args.tenant) as conn:
        conn.execute(
            BQ("stage_main_records"),
            {"job_id": JOB, "customers": args.customers, "orders": args.orders},
        )
        conn.execute(BQ("vacuum_staging"))
        conn.execute(BQ("checkpoint"))
        staged = int(one(conn, "staging_count", {"job_id": JOB}))
        temp_before = int(one(conn, "temp_bytes") or 0)
    stage_s = time.perf_counter() - t0

    sep = "&" if "?" in args.dsn else "?"
    dsn = f"{args.dsn}{sep}application_name={APP}"
    spec = reference_spec(args.tenant)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Engine(dsn, args.tenant, pool_size=1) as engine:
        engine.submit(JOB, spec)
        with engine.pool.connection() as conn:
            pid = int(one(conn, "backend_pid"))
        peak = {"RssAnon": 0, "VmHWM": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for field, seen in list(peak.items()):
                    v = proc_status_kb(pid, field)
                    if v is not None:
                        peak[field] = max(seen, v)
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t1 = time.perf_counter()
        result = engine.check(JOB, cause="bench")
        plan_s = time.perf_counter() - t1
        done.set()
        sampler.join()
    rss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tenant_conn(args.dsn, args.tenant) as conn:
        batches = int(one(conn, "batch_count", {"job_id": JOB}))
        temp_after = int(one(conn, "temp_bytes") or 0)
    with psycopg.connect(args.dsn) as c:
        ver = c.execute("SHOW server_version").fetchone()
    json.dump(
        {
            "staged_records": staged,
            "stage_s": round(stage_s, 2),
            "batches": batches,
            "batch_size": spec.recordTypes[0].batchSize,
            "outcome": result.outcome.value,
            "dispatched": len(result.dispatched),
            "plan_s": round(plan_s, 3),
            "python_peak_rss_mb": round(rss_after_kb / 1024, 1),
            "python_peak_rss_before_plan_mb": round(rss_before_kb / 1024, 1),
            "pg_backend_peak_private_mb": round(peak["RssAnon"] / 1024, 1),
            "pg_backend_peak_rss_mb": round(peak["VmHWM"] / 1024, 1),
            "pg_temp_file_mb": round((temp_after - temp_before) / 2**20, 1),
            "server_version": ver[0] if ver else "?",
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
