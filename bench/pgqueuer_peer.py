"""Issue 16 row "peers": a PgQueuer fan-in on the bench's PostgreSQL. Runs ONLY in
bench/.venv-pgqueuer (created by run.py on first use; PgQueuer is not a project dependency).

    python -m bench.pgqueuer_peer --dsn DSN --n 50 --warmup 3     JSON out

One process runs a PgQueuer QueueManager (psycopg driver, LISTEN/NOTIFY wake-up with its
polling fallback) and drives N fan-ins one after another: 20 "parent" jobs are enqueued; each
parent, in its own transaction, decrements the fan-in's counter row, and the parent that brings
it to zero enqueues the 20 "derived" jobs in that same transaction (PgQueuer's documented
transactional enqueue). lag = first derived job's start (time.time() as the handler's first
act) - the last parent's commit (time.time() right after its COMMIT returned): the end points
importwaves is measured by.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import timedelta
from typing import Any

import asyncpg
import psycopg
from pgqueuer import AsyncpgDriver, Job, PsycopgDriver, QueueManager
from pgqueuer.queries import Queries

PARENTS = 20
SETTINGS: dict[str, Any] = {
    "batch_size": 10,
    "dequeue_timeout_s": 30.0,
    "max_concurrent_tasks": None,
    "entrypoint_concurrency_limit": 0,
}


class FanIns:
    def __init__(self) -> None:
        self.parent_commit: dict[int, float] = {}
        self.derived_start: dict[int, float] = {}
        self.derived_done: dict[int, int] = {}
        self.done: dict[int, asyncio.Event] = {}


async def run(dsn: str, n: int, warmup: int, driver: str) -> dict[str, Any]:
    """driver: "psycopg" (AsyncConnection, autocommit, as PgQueuer requires) or "asyncpg"."""
    admin = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await admin.execute("DROP TABLE IF EXISTS bench_pgq_fanin")
    await admin.execute("CREATE TABLE bench_pgq_fanin (k int PRIMARY KEY, remaining int NOT NULL)")
    queries = Queries(PsycopgDriver(admin))
    if not await queries.has_table("pgqueuer"):
        await queries.install()
    use_asyncpg = driver == "asyncpg"
    worker_conn: Any = await (
        asyncpg.connect(dsn)
        if use_asyncpg
        else psycopg.AsyncConnection.connect(dsn, autocommit=True)
    )
    qm = QueueManager(
        Queries(AsyncpgDriver(worker_conn) if use_asyncpg else PsycopgDriver(worker_conn))
    )
    # parents' own connections (a small pool: one per concurrently running parent)
    pool: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(SETTINGS["batch_size"]):
        pool.put_nowait(
            await (
                asyncpg.connect(dsn)
                if use_asyncpg
                else psycopg.AsyncConnection.connect(dsn, autocommit=True)
            )
        )
    st = FanIns()

    async def decrement(conn: Any, k: int) -> bool:
        if use_asyncpg:
            left = await conn.fetchval(
                "UPDATE bench_pgq_fanin SET remaining = remaining - 1 WHERE k = $1 "
                "RETURNING remaining",
                k,
            )
            return bool(left == 0)
        cur = await conn.execute(
            "UPDATE bench_pgq_fanin SET remaining = remaining - 1 WHERE k = %s RETURNING remaining",
            (k,),
        )
        row = await cur.fetchone()
        return row is not None and row[0] == 0

    @qm.entrypoint("parent")
    async def parent(job: Job) -> None:
        k = int((job.payload or b"0").decode())
        conn = await pool.get()
        try:
            async with conn.transaction():
                last = await decrement(conn, k)
                if last:
                    drv = AsyncpgDriver(conn) if use_asyncpg else PsycopgDriver(conn)
                    await Queries(drv).enqueue(
                        ["derived"] * PARENTS,
                        [f"{k}".encode()] * PARENTS,
                        [0] * PARENTS,
                    )
            if last:
                st.parent_commit[k] = time.time()
        finally:
            pool.put_nowait(conn)

    @qm.entrypoint("derived")
    async def derived(job: Job) -> None:
        now = time.time()
        k = int((job.payload or b"0").decode())
        st.derived_start.setdefault(k, now)
        st.derived_done[k] = st.derived_done.get(k, 0) + 1
        if st.derived_done[k] == PARENTS:
            st.done[k].set()

    runner = asyncio.create_task(
        qm.run(
            dequeue_timeout=timedelta(seconds=SETTINGS["dequeue_timeout_s"]),
            batch_size=SETTINGS["batch_size"],
        )
    )
    lags: list[float] = []
    try:
        await asyncio.sleep(0.5)  # the manager is listening
        for k in range(n + warmup):
            st.done[k] = asyncio.Event()
            await admin.execute("INSERT INTO bench_pgq_fanin VALUES (%s, %s)", (k, PARENTS))
            await queries.enqueue(["parent"] * PARENTS, [f"{k}".encode()] * PARENTS, [0] * PARENTS)
            await asyncio.wait_for(st.done[k].wait(), 60)
            if k >= warmup:
                lags.append(st.derived_start[k] - st.parent_commit[k])
    finally:
        qm.shutdown.set()
        await asyncio.wait_for(runner, 30)
        while not pool.empty():
            await (pool.get_nowait()).close()
        await worker_conn.close()
        await admin.close()
    return {"lags_s": lags, "settings": {**SETTINGS, "driver": driver}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pgqueuer_peer")
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--driver", choices=["psycopg", "asyncpg"], default="psycopg")
    args = ap.parse_args(argv)
    out = asyncio.run(run(args.dsn, args.n, args.warmup, args.driver))
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
