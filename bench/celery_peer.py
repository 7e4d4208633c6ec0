"""Row 1's peer: a Celery chord on the same Redis. Runs ONLY in bench/.venv-celery.

Celery pins python-dateutil 2.9 and `kubernetes` needs >= 3, so Celery cannot share the
project's virtualenv; run.py creates bench/.venv-celery and drives this module through it:

    python -m bench.celery_peer worker --redis URL          a real `celery worker` (prefork, 2)
    python -m bench.celery_peer drive --redis URL --n 50    chords one after another, JSON out

Each chord is a group of 20 parent tasks whose callback dispatches the derived group (20 tasks).
A parent stamps time.time() as the last thing before it returns. lag = first derived dispatch
(the first derived task's message handed to the broker: Celery's after_task_publish signal, in
the callback) - latest parent return, the definition importwaves is measured by (its launcher
called with the derived batches). The callback's own start is reported too (callback_lag_s): a
lower bound that stops before the callback dispatches anything. The driver waits for the derived
group too, so chords do not overlap (as the importwaves imports do not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from celery import Celery, chord, group
from celery.result import GroupResult
from celery.signals import after_task_publish

PARENTS = 20
REDIS_URL = os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/1")

app = Celery("bench_celery_peer", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.parent")
def parent(i: int) -> float:
    _ = i * i
    return time.time()


@app.task(name="bench.derived")
def derived(i: int) -> int:
    return i


@app.task(name="bench.callback")
def callback(returns: list[float]) -> dict[str, Any]:
    started = time.time()
    first_publish: list[float] = []

    def published(sender: str | None = None, **_: Any) -> None:
        if sender == "bench.derived" and not first_publish:
            first_publish.append(time.time())

    after_task_publish.connect(published, weak=False)
    try:
        res = group(derived.s(i) for i in range(PARENTS)).apply_async()
    finally:
        after_task_publish.disconnect(published)
    res.save()
    last_return = max(returns)
    return {
        "lag_s": first_publish[0] - last_return,
        "callback_lag_s": started - last_return,
        "derived_group": res.id,
    }


def drive(n: int, warmup: int) -> tuple[list[float], list[float]]:
    lags: list[float] = []
    callback_lags: list[float] = []
    for k in range(n + warmup):
        result = chord(parent.s(i) for i in range(PARENTS))(callback.s())
        out = result.get(timeout=60, interval=0.001)
        derived_group = GroupResult.restore(out["derived_group"], app=app)
        if derived_group is not None:
            derived_group.get(timeout=60, interval=0.001)
        if k >= warmup:
            lags.append(float(out["lag_s"]))
            callback_lags.append(float(out["callback_lag_s"]))
    return lags, callback_lags


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.celery_peer")
    ap.add_argument("mode", choices=["worker", "drive"])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args(argv)
    if args.mode == "worker":
        app.worker_main(
            [
                "worker",
                "--pool=prefork",
                f"--concurrency={args.concurrency}",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
        return 0
    lags, callback_lags = drive(args.n, args.warmup)
    json.dump({"lags_s": lags, "callback_lags_s": callback_lags}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
