"""Row 2: completion throughput against the database's own limit.

The engine side runs the reference worker's completion transaction exactly as the worker does
(`importwaves.worker._import_and_complete`: batch_lock, the import upsert and
batch_complete_notify in one transaction sent in pipeline mode, the counter triggers firing;
invalid_staging_rows runs only after an upsert that failed or wrote less than planned), for
claimed batches of one record each, for a fixed time, on 1 and 2 connections, one process
each, as the pooled workers run; and, beside it, on 2 connections as 2 threads of one process
(they share its interpreter lock, so the client's CPU per completion, ~0.6 ms in psycopg, is
serialized between them).

The limit: `pgbench` with the same number of clients running a custom script made of the very
same statements (batch_lock, the upsert, and batch_complete_notify: the completion, its NOTIFY
and the durable commit setting), one at a time, as pgbench does, taken from queries.sql at run
time (parameters become pgbench variables, -M prepared as psycopg prepares repeated
statements), on the same server against the same job's remaining batches. Each pgbench
transaction first takes its batch number from a sequence (`SELECT nextval(...) \\gset`, outside
the transaction) so that, like the engine side, every transaction completes a different batch.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import BQ, one, tenant_conn
from importwaves.db.connect import connect
from importwaves.db.queries import Q
from importwaves.engine.app import Engine
from importwaves.engine.notify import channel_for
from importwaves.localdev import LocalPostgres
from importwaves.spec import ImportSpec
from importwaves.worker import WorkItem, _import_and_complete

JOB = "tput"
PREFIX = "SalesOrder"
SALES_ORDER = -30


def tput_spec(tenant: str) -> ImportSpec:
    return ImportSpec.model_validate(
        {
            "tenant": tenant,
            "recordTypes": [{"name": PREFIX, "recordTypeId": SALES_ORDER, "batchSize": 1}],
            "parallelism": 1,
        }
    )


def prepare(dsn: str, tenant: str, batches: int) -> ImportSpec:
    """A job of `batches` one-record batches, all claimed by a worker (status processing)."""
    spec = tput_spec(tenant)
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(BQ("stage_orders_flat"), {"job_id": JOB, "n": batches, "with_lines": False})
    with Engine(dsn, tenant) as engine:
        engine.submit(JOB, spec)
        engine.check(JOB, cause="bench")  # plans: one batch per record
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(BQ("batches_to_processing"), {"job_id": JOB})
        conn.execute(BQ("bench_sequence_create"))
        conn.execute(BQ("vacuum_batches"))
        conn.execute(BQ("vacuum_staging"))
        conn.execute(BQ("checkpoint"))
    return spec


def _complete_until(
    dsn: str, tenant: str, spec_json: dict[str, Any], seconds: float, take: Any, wait: Any
) -> tuple[int, float, float, str | None]:
    """One connection's loop: complete the batch numbered `take()` until `seconds` have passed
    after `wait()` returns; (completions, seconds, this thread's CPU seconds, error)."""
    done = 0
    with connect(dsn, tenant, autocommit=True) as conn:
        wait()
        t0, cpu0 = time.perf_counter(), time.thread_time()
        while time.perf_counter() < t0 + seconds:
            n = take()
            item = WorkItem(dsn, tenant, JOB, f"{PREFIX}-{n:06d}", 1)
            key = {"job_id": JOB, "batch_id": item.batch_id, "dispatch_seq": 1}
            claimed = {"record_type_id": SALES_ORDER, "chunk_ids_json": [n + 1]}
            try:
                _import_and_complete(conn, item, key, spec_json, claimed)
            except Exception as exc:
                err = f"{item.batch_id}: {type(exc).__name__}: {exc}"
                return done, time.perf_counter() - t0, time.thread_time() - cpu0, err
            done += 1
        return done, time.perf_counter() - t0, time.thread_time() - cpu0, None


def _process_main(
    dsn: str,
    tenant: str,
    spec_json: dict[str, Any],
    seconds: float,
    counter: Any,
    barrier: Any,
    results: Any,
) -> None:
    def take() -> int:
        with counter.get_lock():
            n = int(counter.value)
            counter.value = n + 1
        return n

    try:
        results.put(_complete_until(dsn, tenant, spec_json, seconds, take, barrier.wait))
    except Exception as exc:  # reported by the parent, which waits for every result
        results.put((0, 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


def engine_completions(
    dsn: str,
    tenant: str,
    spec: ImportSpec,
    connections: int,
    seconds: float,
    start: int,
    *,
    processes: bool = True,
) -> dict[str, Any]:
    """Completions/s of the worker's completion transaction on `connections` connections,
    batch numbers from `start` on, each taken once. `processes`: one process per connection,
    as the pooled workers run (each its own process, its own connection); else one thread per
    connection in this process (they share its interpreter lock)."""
    spec_json = spec.model_dump(mode="json")
    results: list[tuple[int, float, float, str | None]] = []
    if processes:
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", start)
        barrier = ctx.Barrier(connections)
        queue = ctx.Queue()
        procs = [
            ctx.Process(
                target=_process_main,
                args=(dsn, tenant, spec_json, seconds, counter, barrier, queue),
                daemon=True,
            )
            for _ in range(connections)
        ]
        for p in procs:
            p.start()
        results = [queue.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    else:
        numbers = itertools.count(start)
        lock = threading.Lock()
        tbarrier = threading.Barrier(connections)

        def take() -> int:
            with lock:
                return next(numbers)

        def run() -> None:
            out = _complete_until(dsn, tenant, spec_json, seconds, take, tbarrier.wait)
            with lock:
                results.append(out)

        workers = [threading.Thread(target=run) for _ in range(connections)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    errors = [r[3] for r in results if r[3]]
    if errors:
        raise RuntimeError("engine completions failed: " + "; ".join(errors[:3]))
    done = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    cpu = sum(r[2] for r in results)
    return {
        "completions": done,
        "seconds": round(elapsed, 3),
        "per_s": done / elapsed,
        "client_cpu_ms_per_completion": round(1000 * cpu / max(done, 1), 3),
    }


def _pgbench_sql(name: str) -> str:
    """A queries.sql statement as pgbench SQL: %(x)s -> :x, %% -> %."""
    text = re.sub(r"%\((\w+)\)s", r":\1", Q(name) if name in _ENGINE else BQ(name))
    return text.replace("%%", "%") + ";\n"


_ENGINE = {"batch_lock", "import_transactions", "batch_complete_notify"}


def pgbench_script(path: Path) -> Path:
    """The worker's completion transaction for a SalesOrder batch, statement for statement."""
    body = (
        "-- generated by bench/throughput.py from operator/importwaves/db/queries.sql\n"
        + _pgbench_sql("pgbench_batch_params").rstrip(";\n")
        + " \\gset\n"
        + "BEGIN;\n"
        + _pgbench_sql("batch_lock")
        + _pgbench_sql("import_transactions")
        + _pgbench_sql("batch_complete_notify")
        + "END;\n"
    )
    _check_variables(body)
    path.write_text(body, encoding="utf-8")
    return path


#: Values of the worker's parameters for a SalesOrder batch (worker._import_and_complete),
#: constant per run; the per-transaction ones come from pgbench_batch_params (\gset).
DEFINES = {
    "job_id": JOB,
    "prefix": PREFIX,
    "record_type_id": str(SALES_ORDER),
    # The worker passes NULL (a main batch has no parent type); pgbench cannot send a NULL
    # parameter, and for a main batch (by_parent false) the predicate never reads it.
    "parent_record_type_id": "0",
    # batch size 1: the worker records the one row its upsert wrote
    "rows_written": "1",
}
PER_TRANSACTION = {"batch_id", "ids", "dispatch_seq"}
#: Per run (the tenant's channel) and the NOTIFY payload: constant (the engine's names the batch;
#: the server's work for it is the same).
PER_RUN = {"channel", "payload"}


def _check_variables(body: str) -> None:
    """Every :variable of the script has a value (queries.sql may grow a parameter)."""
    used = set(re.findall(r"(?<!:):([a-z_]+)", body))
    missing = used - set(DEFINES) - PER_TRANSACTION - PER_RUN
    if missing:
        raise RuntimeError(f"pgbench script needs values for {sorted(missing)}")


def pgbench(
    pg: LocalPostgres, tenant: str, script: Path, clients: int, seconds: float, start: int
) -> dict[str, Any]:
    with tenant_conn(pg.dsn(), tenant) as conn:
        conn.execute(BQ("bench_sequence_set"), {"start": start})
    env = {
        **os.environ,
        "PGOPTIONS": f"-c search_path={tenant}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg.port),
        "PGUSER": "postgres",
        "PGDATABASE": "postgres",
    }
    defines = {
        **DEFINES,
        "channel": channel_for(tenant),
        "payload": '{"tenant":"bench","job_id":"tput","batch_id":"SalesOrder-000000"}',
    }
    cmd = [str(pg.binary("pgbench")), "-n", "-M", "prepared", "-f", str(script)]
    cmd += ["-c", str(clients), "-j", str(clients), "-T", str(int(seconds))]
    for k, v in defines.items():
        cmd += ["-D", f"{k}={v}"]
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed ({out.returncode}): {out.stderr[-2000:]}")
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    txns = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if tps is None or txns is None:
        raise RuntimeError(f"cannot read pgbench output:\n{out.stdout}")
    return {
        "transactions": int(txns.group(1)),
        "failed": int(failed.group(1)) if failed else 0,
        "per_s": float(tps.group(1)),
    }


def completed_in(dsn: str, tenant: str, lo: int, hi: int) -> int:
    """Batches in [lo, hi) that are completed (every timed transaction really completed one)."""
    with tenant_conn(dsn, tenant) as conn:
        n = one(
            conn,
            "completed_between",
            {"job_id": JOB, "lo": f"{PREFIX}-{lo:06d}", "hi": f"{PREFIX}-{hi:06d}"},
        )
    return int(n or 0)
