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
  (`on_worker_exited_ok`: the exit-0 check, then the coordinator), counted on the client
  (every statement psycopg sends, by queries.sql name, and the transactions) and on the server
  (pg_stat_statements with track = all: top-level and nested, i.e. the counter triggers'
  statements too).

State between timed runs is set with bench/queries.sql (fixture SQL, counted by the triggers
like any batch change). The three jobs live side by side and every timed step goes round the
sizes in turn (1k, 10k, 100k, 1k, ...), so machine noise hits all sizes alike. Timings are per
call; p50 is the headline, the ratio is 100k / 1k.
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


def _setup(dsn: str, tenant: str, engine: Engine, conn: Any, n: int, out: dict[str, Any]) -> str:
    """A job of n parent batches, mid-wave: half completed (their derived batches created and
    pending behind the gate), `parallelism` batches with workers."""
    job = f"scale-{n}"
    with tenant_conn(dsn, tenant) as c:
        c.execute(BQ("stage_orders_flat"), {"job_id": job, "n": n, "with_lines": True})
        c.execute(BQ("vacuum_staging"))
    engine.submit(job, scale_spec(tenant))
    first, out["plan_and_first_dispatch_s"] = timed(engine.check, job, "bench")
    assert len(first.dispatched) == PARALLELISM, first.reason
    conn.execute(
        BQ("complete_first_pending"), {"job_id": job, "wave_number": PARENT_WAVE, "n": n // 2}
    )
    _derive_completed(conn, job)
    out["batch_rows_mid_wave"] = conn.execute(BQ("batch_count"), {"job_id": job}).fetchone()["n"]
    return job


def _derive_completed(conn: Any, job: str) -> None:
    conn.execute(
        BQ("insert_derived_for_completed"),
        {
            "job_id": job,
            "wave_number": DERIVED_WAVE,
            "record_type_id": LINE,
            "parent_wave": PARENT_WAVE,
        },
    )


def _interleaved(
    sizes: list[int], reps: int, step: Any, before: Any = None
) -> dict[int, list[float]]:
    """Time step(n) for every size in turn, `reps` times (sizes side by side under the same
    machine noise); before(n), untimed, sets the state up for each timed call."""
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(reps):
        for n in sizes:
            if before is not None:
                before(n)
            t0 = time.perf_counter()
            step(n)
            times[n].append(time.perf_counter() - t0)
    return times


def run(dsn: str, tenant: str, redis_url: str, sizes: list[int], reps: int) -> dict[str, Any]:
    counter = StatementCounter()
    out: dict[str, Any] = {str(n): {"batches": n} for n in sizes}
    launcher = RecordingLauncher()
    with (
        counter.installed(),
        Engine(dsn, tenant, redis_url=redis_url, launcher=launcher) as engine,
        tenant_conn(dsn, tenant) as conn,
    ):
        jobs = {n: _setup(dsn, tenant, engine, conn, n, out[str(n)]) for n in sizes}
        _settle(conn)

        # 1. nothing to do
        def nothing(n: int) -> None:
            res = engine.check(jobs[n], "bench")
            assert res.outcome == Outcome.IN_PROGRESS and not res.dispatched, res.reason

        for n, xs in _interleaved(sizes, reps, nothing).items():
            out[str(n)]["reconcile_nothing"] = _ms(xs)
            with counter.counting() as counts:
                nothing(n)
            out[str(n)]["reconcile_nothing_statements"] = {
                "statements": sum(counts.values()),
                "transactions": counter.transactions,
            }

        # 2. statements per completion event (worker + listener + coordinator)
        for n in sizes:
            out[str(n)]["completion_event"] = _completion_events(
                dsn, tenant, jobs[n], engine, counter, 10
            )

        # 3. reconcile with a dispatch: the workers' batches completed (untimed) first
        def free_slots(n: int) -> None:
            conn.execute(BQ("complete_active"), {"job_id": jobs[n], "wave_number": PARENT_WAVE})

        def dispatch(n: int) -> None:
            res = engine.check(jobs[n], "bench")
            assert len(res.dispatched) == PARALLELISM, res.reason

        for n, xs in _interleaved(sizes, reps, dispatch, free_slots).items():
            out[str(n)]["reconcile_dispatch"] = _ms(xs)

        # 4. first derived dispatch: every parent completed, one derived batch per parent
        for n in sizes:
            job = jobs[n]
            conn.execute(
                BQ("complete_first_pending"), {"job_id": job, "wave_number": PARENT_WAVE, "n": n}
            )
            conn.execute(BQ("complete_active"), {"job_id": job, "wave_number": PARENT_WAVE})
            _derive_completed(conn, job)
            out[str(n)]["batch_rows_all_parents_done"] = conn.execute(
                BQ("batch_count"), {"job_id": job}
            ).fetchone()["n"]
        _settle(conn)

        def reopen(n: int) -> None:
            conn.execute(BQ("derived_reset"), {"job_id": jobs[n], "wave_number": DERIVED_WAVE})
            conn.execute(
                BQ("wave_reset_first_dispatch"), {"job_id": jobs[n], "wave_number": DERIVED_WAVE}
            )

        def first_derived(n: int) -> None:
            res = engine.check(jobs[n], "bench")
            assert res.outcome == Outcome.DERIVED_WAVE_TRIGGERED, res.reason

        for n, xs in _interleaved(sizes, reps, first_derived, reopen).items():
            out[str(n)]["first_derived_dispatch"] = _ms(xs)
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
            b = next(
                x
                for x in reversed(launcher.launched)
                if x.job_id == job and x.record_type_id == SALES_ORDER
            )
            launcher.launched.remove(b)
            conn.execute(BQ("pgss_reset"))
            with counter.counting() as counts:
                wr = run_batch(WorkItem(dsn, tenant, job, b.batch_id, b.dispatch_seq))
                assert wr.exit_code == EXIT_OK, wr.message
                worker_counts.append(sum(counts.values()))
                engine.listener.on_worker_exited_ok(job, b.batch_id, b.dispatch_seq)
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
