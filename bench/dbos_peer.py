"""Issue 16 row "peers": DBOS Transact queues on the bench's PostgreSQL. Runs ONLY in
bench/.venv-dbos (created by run.py on first use; DBOS is not a project dependency).

    python -m bench.dbos_peer fanin --dsn DSN --poll 1.0 --n 20 --warmup 2     JSON out
    python -m bench.dbos_peer demo --dsn DSN --tenant T --job J --poll 0.001 --queries F

Its system database is a database of its own on the same server (`dbos_<label>`).

fanin: N fan-ins one after another. A fan-in workflow enqueues 20 parent workflows on the
"parents" queue, waits on their handles (get_result), then enqueues 20 derived workflows on the
"derived" queue. A parent returns time.time() as its last act; a derived workflow returns
time.time() as its first. lag = first derived start - last parent return. --poll sets both the
queues' polling_interval_sec and the handles' get_result polling interval (DBOS defaults: 1.0 s
and 1.0 s; the documented minimum for polling intervals is 0.001 s).

demo: the reference import (Customer -> SalesOrder -> TransactionLine) through a DBOS queue with
worker_concurrency 4 (importwaves' demo parallelism): one workflow per batch whose one step runs
the reference worker's SQL (invalid_staging_rows, then import_customers / import_transactions /
import_transaction_lines, in one transaction on the tenant schema; the texts come from
operator/importwaves/db/queries.sql via --queries). Waves run parents first: every Customer
batch, then every SalesOrder batch, then one TransactionLine batch per SalesOrder batch (its
orders' lines). Batches are the importwaves demo's: 500 customers, 500 orders. Prints the wall
time and the rows written per type.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from typing import Any

import psycopg
from dbos import DBOS, DBOSConfig, WorkflowHandle
from psycopg import sql

PARENTS = 20
STATE: dict[str, Any] = {"poll": 1.0, "dsn": "", "tenant": "", "queries": {}, "job": ""}


def _sys_db_url(dsn: str, label: str) -> str:
    base, _, _db = dsn.rpartition("/")
    return f"{base}/dbos_{label}"


# -- fan-in --------------------------------------------------------------------------------------
@DBOS.workflow()
def parent_task(k: int, i: int) -> float:
    _ = k * i
    return time.time()


@DBOS.workflow()
def derived_task(k: int, i: int) -> float:
    return time.time()


@DBOS.workflow()
def fanin(k: int) -> dict[str, float]:
    poll = float(STATE["poll"])
    parents = DBOS.retrieve_queue("parents")
    derived = DBOS.retrieve_queue("derived")
    handles: list[WorkflowHandle[float]] = [
        parents.enqueue(parent_task, k, i) for i in range(PARENTS)
    ]
    returns = [h.get_result(polling_interval_sec=poll) for h in handles]
    resumed = time.time()
    dh: list[WorkflowHandle[float]] = [derived.enqueue(derived_task, k, i) for i in range(PARENTS)]
    starts = [h.get_result(polling_interval_sec=poll) for h in dh]
    return {"last_parent": max(returns), "resumed": resumed, "first_derived": min(starts)}


# -- demo import ---------------------------------------------------------------------------------
def _tenant_conn() -> psycopg.Connection[Any]:
    conn = psycopg.connect(STATE["dsn"], autocommit=True)
    conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(STATE["tenant"])))
    return conn


_KIND = {
    -2: ("import_customers", {"needs_name": True, "parent_table": "", "by_parent": False}),
    -30: (
        "import_transactions",
        {"needs_name": False, "parent_table": "customers", "by_parent": False},
    ),
    -13: (
        "import_transaction_lines",
        {"needs_name": False, "parent_table": "transactions", "by_parent": True},
    ),
}


@DBOS.step()
def import_step(record_type_id: int, ids: list[int]) -> int:
    query, params = _KIND[record_type_id]
    base = {
        "job_id": STATE["job"],
        "record_type_id": record_type_id,
        "ids": ids,
        "parent_record_type_id": -30 if record_type_id == -13 else None,
    }
    q = STATE["queries"]
    with _tenant_conn() as conn, conn.transaction():
        bad = [r for r in conn.execute(q["invalid_staging_rows"], {**base, **params}) if r[1]]
        if bad:
            raise RuntimeError(f"{len(bad)} invalid staging rows")
        return int(conn.execute(q[query], base).rowcount)


@DBOS.workflow()
def batch_workflow(record_type_id: int, ids: list[int]) -> int:
    return import_step(record_type_id, ids)


def run_demo(batch: int) -> dict[str, Any]:
    poll = float(STATE["poll"])
    queue = DBOS.retrieve_queue("import")
    with _tenant_conn() as conn:
        ids = {
            t: [
                int(r[0])
                for r in conn.execute(
                    "SELECT record_id FROM staging_records WHERE job_id = %s "
                    "AND record_type_id = %s ORDER BY record_id",
                    (STATE["job"], t),
                )
            ]
            for t in (-2, -30)
        }
    t0 = time.perf_counter()
    written: dict[str, int] = {}
    waves = [(-2, ids[-2]), (-30, ids[-30]), (-13, ids[-30])]
    batches = 0
    for rt, all_ids in waves:
        chunks = [all_ids[i : i + batch] for i in range(0, len(all_ids), batch)]
        handles = [queue.enqueue(batch_workflow, rt, c) for c in chunks]
        written[str(rt)] = sum(h.get_result(polling_interval_sec=poll) for h in handles)
        batches += len(chunks)
    return {"wall_s": time.perf_counter() - t0, "rows_written": written, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dbos_peer")
    ap.add_argument("mode", choices=["fanin", "demo"])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--label", default="bench")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tenant", default="")
    ap.add_argument("--job", default="")
    ap.add_argument("--queries", default="")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)
    STATE.update(poll=args.poll, dsn=args.dsn, tenant=args.tenant, job=args.job)
    if args.queries:
        with open(args.queries, encoding="utf-8") as f:
            STATE["queries"] = json.load(f)
    config: DBOSConfig = {
        "name": f"bench-{args.label}",
        "system_database_url": _sys_db_url(args.dsn, args.label),
        "notification_listener_polling_interval_sec": min(args.poll, 1.0),
    }
    DBOS(config=config)
    DBOS.launch()
    settings: dict[str, Any] = {"poll_s": args.poll}
    try:
        if args.mode == "fanin":
            DBOS.register_queue(
                "parents", polling_interval_sec=args.poll, on_conflict="always_update"
            )
            DBOS.register_queue(
                "derived", polling_interval_sec=args.poll, on_conflict="always_update"
            )
            lags, resumes = [], []
            for k in range(args.n + args.warmup):
                out = fanin(k)
                if k >= args.warmup:
                    lags.append(out["first_derived"] - out["last_parent"])
                    resumes.append(out["resumed"] - out["last_parent"])
            res: dict[str, Any] = {"lags_s": lags, "resume_lags_s": resumes}
            settings["queues"] = "parents, derived: no concurrency limits"
        else:
            DBOS.register_queue(
                "import",
                polling_interval_sec=args.poll,
                worker_concurrency=args.concurrency,
                on_conflict="always_update",
            )
            res = run_demo(args.batch)
            settings["queues"] = f"import: worker_concurrency {args.concurrency}"
    finally:
        DBOS.destroy()
    settings["version"] = version("dbos")
    res["settings"] = settings
    json.dump(res, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
