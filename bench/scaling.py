"""Row 3: does the engine's per-event cost grow with the size of a job?

For jobs of 1k, 10k and 100k parent batches (SalesOrder, one record each; derived
TransactionLine batches of one record per parent), planned by the engine itself:

- reconcile, nothing to do: the job mid-wave (half of the parents completed, their derived
  batches created and pending behind the gate, `parallelism` batches handed to workers):
  `check_and_trigger_next_wave` finds nothing to dispatch;
- reconcile with a dispatch: the workers' batches are completed (fixture SQL, untimed), the
  timed run dispatches `parallelism` new ones;
- first derived dispatch: every parent completed, one derived batch per parent; the timed run
  opens the derived wave (dispatch + first-dispatch lag bookkeeping); reset untimed;
- statements per completion event: a real worker run (`run_batch`) plus the listener
  (`on_completed`, which runs the coordinator), counted on the client (every statement psycopg
  sends, by queries.sql name, and the transactions) and on the server (pg_stat_statements with
  track = all: top-level and nested, i.e. the counter triggers' statements too).

State between timed runs is set with bench/queries.sql (fixture SQL, counted by the triggers
like any batch change). Timings are per call; p50 is the headline, the ratio is 100k / 1k.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from bench.common import BQ, StatementCounter, pct, pgss_snapshot, tenant_conn, timed
from importwaves.engine.app import Engine
from importwaves.engine.model import Outcome
from importwaves.launch.base import RecordingLauncher
from importwaves.spec import ImportSpec
from importwaves.worker import EXIT_OK, WorkItem, run_batch

SALES_ORDER, LINE = -30, -13
PARENT_WAVE, DERIVED_WAVE = 1, 2
PARALLELISM = 8


def scale_spec(tenant: str) -> ImportSpec:
    return ImportSpec.model_validate(
        {
            "tenant": tenant,
            "recordTypes": [{"name": "SalesOrder", "recordTypeId": SALES_ORDER, "batchSize": 1}],
            "derivedTypes": [
                {
                    "name": "TransactionLine",
                    "recordTypeId": LINE,
                    "batchSize": 1,
                    "parentTypes": ["SalesOrder"],
                }
            ],
            "parallelism": PARALLELISM,
        }
    )


def _ms(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(xs, 50) * 1000, 3),
        "p90_ms": round(pct(xs, 90) * 1000, 3),
        "min_ms": round(min(xs) * 1000, 3),
    }


def _settle(conn: Any) -> None:
    conn.execute(BQ("vacuum_batches"))
    conn.execute(BQ("checkpoint"))


def measure_size(
    dsn: str,
    tenant: str,
    redis_url: str,
    n: int,
    counter: StatementCounter,
    *,
    reps: int = 40,
    events: int = 10,
) -> dict[str, Any]:
    job = f"scale-{n}"
    spec = scale_spec(tenant)
    out: dict[str, Any] = {"batches": n}
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(BQ("stage_orders_flat"), {"job_id": job, "n": n, "with_lines": True})
        conn.execute(BQ("vacuum_staging"))
    launcher = RecordingLauncher()
    with (
        Engine(dsn, tenant, redis_url=redis_url, launcher=launcher) as engine,
        tenant_conn(dsn, tenant) as conn,
    ):
        engine.submit(job, spec)
        first, out["plan_and_first_dispatch_s"] = timed(engine.check, job, "bench")
        assert len(first.dispatched) == PARALLELISM, first.reason
        # Mid-wave: half the parents done (their derived batches created), 8 with workers.
        conn.execute(
            BQ("complete_first_pending"),
            {"job_id": job, "wave_number": PARENT_WAVE, "n": n // 2},
        )
        conn.execute(
            BQ("insert_derived_for_completed"),
            {
                "job_id": job,
                "wave_number": DERIVED_WAVE,
                "record_type_id": LINE,
                "parent_wave": PARENT_WAVE,
            },
        )
        out["batch_rows"] = conn.execute(BQ("batch_count"), {"job_id": job}).fetchone()["n"]
        _settle(conn)

        # 1. nothing to do
        times = []
        for _ in range(reps):
            res, dt = timed(engine.check, job, "bench")
            assert res.outcome == Outcome.IN_PROGRESS and not res.dispatched, res.reason
            times.append(dt)
        out["reconcile_nothing"] = _ms(times)
        with counter.counting() as counts:
            engine.check(job, "bench")
        out["reconcile_nothing_statements"] = {
            "statements": sum(counts.values()),
            "transactions": counter.transactions,
        }

        # 2. statements per completion event (worker + listener + coordinator)
        out["completion_event"] = _completion_events(dsn, tenant, job, engine, counter, events)

        # 3. reconcile with a dispatch
        times = []
        for _ in range(reps):
            conn.execute(BQ("complete_active"), {"job_id": job, "wave_number": PARENT_WAVE})
            res, dt = timed(engine.check, job, "bench")
            assert len(res.dispatched) == PARALLELISM, res.reason
            times.append(dt)
        out["reconcile_dispatch"] = _ms(times)

        # 4. first derived dispatch
        conn.execute(
            BQ("complete_first_pending"), {"job_id": job, "wave_number": PARENT_WAVE, "n": n}
        )
        conn.execute(BQ("complete_active"), {"job_id": job, "wave_number": PARENT_WAVE})
        conn.execute(
            BQ("insert_derived_for_completed"),
            {
                "job_id": job,
                "wave_number": DERIVED_WAVE,
                "record_type_id": LINE,
                "parent_wave": PARENT_WAVE,
            },
        )
        _settle(conn)
        times = []
        for _ in range(max(10, reps // 2)):
            res, dt = timed(engine.check, job, "bench")
            assert res.outcome == Outcome.DERIVED_WAVE_TRIGGERED, res.reason
            times.append(dt)
            conn.execute(BQ("derived_reset"), {"job_id": job, "wave_number": DERIVED_WAVE})
            conn.execute(
                BQ("wave_reset_first_dispatch"), {"job_id": job, "wave_number": DERIVED_WAVE}
            )
        out["first_derived_dispatch"] = _ms(times)
    return out


def _completion_events(
    dsn: str, tenant: str, job: str, engine: Engine, counter: StatementCounter, events: int
) -> dict[str, Any]:
    """Run `events` real completions of dispatched parent batches; count what each sends."""
    launcher = engine.launcher
    assert isinstance(launcher, RecordingLauncher)
    worker_counts: list[int] = []
    listener_counts: list[int] = []
    transactions: list[int] = []
    server: list[dict[str, int]] = []
    by_name: Counter[str] = Counter()
    with tenant_conn(dsn, tenant) as conn:
        for _ in range(events):
            b = next(x for x in reversed(launcher.launched) if x.record_type_id == SALES_ORDER)
            launcher.launched.remove(b)
            conn.execute(BQ("pgss_reset"))
            with counter.counting() as counts:
                wr = run_batch(WorkItem(dsn, tenant, job, b.batch_id, b.dispatch_seq))
                assert wr.exit_code == EXIT_OK, wr.message
                worker_counts.append(sum(counts.values()))
                engine.listener.on_completed(job, b.batch_id, b.dispatch_seq)
                listener_counts.append(sum(counts.values()) - worker_counts[-1])
                transactions.append(counter.transactions)
                by_name.update(counts)
            time.sleep(0.01)  # let pg_stat_statements see every backend's last statement
            server.append(pgss_snapshot(conn))
    return {
        "events": events,
        "client_statements_worker": sorted(set(worker_counts)),
        "client_statements_listener": sorted(set(listener_counts)),
        "client_statements_total": sorted(
            {w + li for w, li in zip(worker_counts, listener_counts, strict=True)}
        ),
        "client_transactions": sorted(set(transactions)),
        "server_toplevel": sorted({s["toplevel"] for s in server}),
        "server_nested": sorted({s["nested"] for s in server}),
        "per_event_by_name": {k: v / events for k, v in sorted(by_name.items())},
    }


def run(dsn: str, tenant: str, redis_url: str, sizes: list[int], reps: int) -> dict[str, Any]:
    counter = StatementCounter()
    results = {}
    with counter.installed():
        for n in sizes:
            results[str(n)] = measure_size(dsn, tenant, redis_url, n, counter, reps=reps)
    return results
