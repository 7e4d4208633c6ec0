"""Row "many" (issue 16, row 1): many tenants on one operator, on the real test cluster.

1,000 small ImportJobs across 200 tenant schemas in 4 databases of one PostgreSQL server (the
run's), one namespace, one Secret per database, one operator process (`importwaves run
--standalone --namespace NS`, as row 5 starts it), the reference worker (`importwaves worker`)
in pods the e2e local kubelet runs as local processes (no start latency). Each import: 1
Customer batch, 1 SalesOrder batch (2 orders), 1 derived TransactionLine batch (their ~10
lines), parallelism 1. Every ImportJob is created at once (8 client threads).

Measured, never asserted:

* operator RSS: VmRSS every 0.25 s (/proc/<pid>/status), VmHWM (its peak) read before it stops;
  steady = median VmRSS over the last third of the rest window after every import finished;
* the operator's connections: pg_stat_activity sampled every 0.25 s on the server, grouped by
  database, application_name and state. The operator runs with PGAPPNAME=importwaves-operator
  (its LISTEN and migration connections take it; its pooled connections set
  application_name=importwaves-engine), the worker pods' connections have none. Peak per
  database (LISTEN, pool, other) while the imports run, and at rest (the last sample of the
  rest window, `REST_S` after the last Completed: engines are evicted 30 s after their
  ImportJob finished);
* time from the first create to the last ImportJob Completed, both seen by a watch on the API;
* derived dispatch lag: `wave_coordination.dispatch_lag_seconds` of every derived wave, every
  tenant, every database (p50 / p99), and every batch's status checked afterwards.

`python -m bench.many [--quick] [--imports N --tenants T --dbs D]` runs it alone (its own
servers and cluster); `python -m bench.run --rows many` as part of the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench import k8s
from bench.common import new_tenant, pct, summary_ms, tenant_conn
from importwaves.datagen import generate
from importwaves.db.pools import APPLICATION_NAME as POOL_APP
from importwaves.k8s.crd import GROUP, PLURAL, VERSION
from importwaves.log import events_named

#: application_name of the operator's own non-pooled connections (LISTEN, migrations)
OPERATOR_APP = "importwaves-operator"
SAMPLER_APP = "bench-many-sampler"
SIZES = {
    "full": {"imports": 1000, "tenants": 200, "dbs": 4},
    "quick": {"imports": 100, "tenants": 20, "dbs": 2},
}
#: The operator's settings for the row (reported with the result). The budget bounds the
#: batches (= worker pods here) running at once; without one (the chart's default, 0), 1,000
#: ImportJobs would start 1,000 worker processes at once (the node allows 250 pods) on 2 cores.
OPERATOR_SETTINGS = {
    "IMPORTWAVES_BUDGET_TOTAL": "16",
    "IMPORTWAVES_BUDGET_PER_TENANT": "0",
    "IMPORTWAVES_POOL_SIZE": "4",
    "IMPORTWAVES_TIMER_INTERVAL": "10",
}
#: The operator's worker idle setting (`operator.workerIdleSeconds`), which it puts into every
#: worker pod's env (runs before it had the setting added it through the local kubelet's
#: extra_env): a pooled worker exits after this many idle seconds (default 30): each
#: wave of these imports has one batch, and an idle worker is a Python process holding two
#: connections; 30 s x ~3 batches/s would keep ~90 of them alive for nothing.
WORKER_ENV = {"IMPORTWAVES_WORKER_IDLE_SECONDS": "3"}
#: kube-controller-manager client QPS (burst 2x): at the stock 20 QPS the Job controller alone
#: runs ~2.5 worker Jobs/s (row 5), so 3,000 Jobs would take ~20 min of its budget.
KCM_QPS = 200
#: seconds watched after the last Completed (engine eviction grace 30 s, pool max_idle 60 s)
REST_S = 90.0
SAMPLE_S = 0.25


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def db_dsn(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


# -- the data ---------------------------------------------------------------------------------
def layout(imports: int, tenants: int, dbs: int) -> list[dict[str, Any]]:
    """Tenants spread round-robin over the databases, imports round-robin over the tenants."""
    tenant_names = [(f"many_d{t % dbs + 1}_t{t:03d}", t % dbs + 1) for t in range(tenants)]
    out = []
    for i in range(imports):
        tenant, db = tenant_names[i % tenants]
        out.append({"name": f"ij-{i:04d}", "tenant": tenant, "db": db})
    return out


def prepare(dsn: str, dbs: int, plan: list[dict[str, Any]]) -> dict[int, str]:
    """The databases, each tenant schema migrated, each import's staging rows."""
    dsns: dict[int, str] = {}
    with psycopg.connect(dsn, autocommit=True) as admin:
        for d in range(1, dbs + 1):
            name = f"bench_many_{d}"
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            dsns[d] = db_dsn(dsn, name)
    by_tenant: dict[tuple[int, str], list[str]] = defaultdict(list)
    for p in plan:
        by_tenant[(p["db"], p["tenant"])].append(p["name"])

    def one(item: tuple[tuple[int, str], list[str]]) -> None:
        (d, tenant), names = item
        new_tenant(dsns[d], tenant)
        with tenant_conn(dsns[d], tenant) as conn:
            for name in names:
                generate(conn, name, orders=2, customers=1)

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(one, by_tenant.items()))
    return dsns


def spec(p: dict[str, Any], namespace: str) -> dict[str, Any]:
    body = k8s.importjob(
        p["name"],
        namespace,
        p["tenant"],
        import_id=p["name"],
        customer_batch=1,
        order_batch=2,
        line_batch=100,
        parallelism=1,
        command=k8s.REFERENCE_WORKER,
    )
    body["spec"]["database"]["secretName"] = f"tenant-db-{p['db']}"
    return body


# -- sampling the server ----------------------------------------------------------------------
ACTIVITY = """
SELECT coalesce(datname, '') AS db, coalesce(application_name, '') AS app,
       coalesce(state, '') AS state, query ~* '^\\s*(UN)?LISTEN' AS listen, count(*) AS n
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1, 2, 3, 4
"""


def kind_of(app: str, listen: bool) -> str | None:
    """The operator's connection kinds; None for anything else (workers, the bench)."""
    if app == POOL_APP:
        return "pool"
    if app == OPERATOR_APP:
        return "listen" if listen else "other"
    return None


class ActivitySampler:
    """pg_stat_activity every SAMPLE_S s: [(monotonic, [(db, app, state, listen, n)])]."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, application_name=SAMPLER_APP)
        self.samples: list[tuple[float, list[tuple[str, str, str, bool, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="activity", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psycopg.Error):
                rows = self.conn.execute(ACTIVITY).fetchall()
                self.samples.append(
                    (time.monotonic(), [(r[0], r[1], r[2], bool(r[3]), int(r[4])) for r in rows])
                )
            self._stop.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.conn.close()

    def operator_by_db(self, t0: float, t1: float) -> list[tuple[float, dict[str, Counter[str]]]]:
        """Per sample in [t0, t1]: {db: Counter(listen=, pool=, other=, total=)} (operator)."""
        out = []
        for t, rows in self.samples:
            if not t0 <= t <= t1:
                continue
            per: dict[str, Counter[str]] = defaultdict(Counter)
            for db, app, _state, listen, n in rows:
                k = kind_of(app, listen)
                if k is not None:
                    per[db][k] += n
                    per[db]["total"] += n
            out.append((t, per))
        return out

    def workers_peak(self, t0: float, t1: float) -> int:
        return max(
            (
                sum(n for _db, app, _s, _l, n in rows if app == "")
                for t, rows in self.samples
                if t0 <= t <= t1
            ),
            default=0,
        )

    def grouped(self, t: float) -> list[dict[str, Any]]:
        """The sample nearest `t`, as rows (database, application_name, state, count)."""
        if not self.samples:
            return []
        _t, rows = min(self.samples, key=lambda s: abs(s[0] - t))
        agg: Counter[tuple[str, str, str]] = Counter()
        for db, app, state, listen, n in rows:
            agg[(db, app + (" (LISTEN)" if listen else ""), state)] += n
        return [
            {"database": db, "application_name": app, "state": st, "count": n}
            for (db, app, st), n in sorted(agg.items())
        ]


def peaks(series: list[tuple[float, dict[str, Counter[str]]]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for _t, per in series:
        for db, c in per.items():
            cur = out.setdefault(db, {"listen": 0, "pool": 0, "other": 0, "total": 0})
            for k in cur:
                cur[k] = max(cur[k], c[k])
    return dict(sorted(out.items()))


# -- the run ----------------------------------------------------------------------------------
def create_all(api: Any, namespace: str, bodies: list[dict[str, Any]]) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(api)

    def one(body: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(one, bodies))


def wait_completed(
    kube: k8s.Kube, ns: str, watch: k8s.Watch, names: list[str], op: k8s.Operator, timeout: float
) -> dict[str, Any]:
    """Until every ImportJob's status said Completed (as the watch saw it; a LIST every 30 s
    backs up a watch that missed an event). Returns counts by summary if it timed out."""
    want = set(names)
    deadline = time.monotonic() + timeout
    last_list = time.monotonic()
    listed: dict[str, str] = {}
    last_say = 0.0
    while True:
        objs = {o.name: o for o in watch.snapshot()}
        done = {
            n
            for n in want
            if "summary_Completed" in objs.get(n, k8s.Seen("", "", "", 0, {}, {})).extra
        }
        done |= {n for n, s in listed.items() if s == "Completed" and n in want}
        bad = [
            n
            for n in want
            if any(
                f"summary_{x}" in (objs[n].extra if n in objs else {})
                for x in ("Failed", "Invalid")
            )
        ]
        if bad:
            return {"failed": sorted(bad)[:20], "n_failed": len(bad)}
        if done >= want:
            return {}
        if not op.alive():
            return {"operator_exited": op.proc.returncode}
        now = time.monotonic()
        if now - last_say > 30:
            say(f"many: {len(done)} / {len(want)} ImportJobs Completed")
            last_say = now
        if now - last_list > 30:
            listed = _listed(kube, ns, listed)
            last_list = now
        if now > deadline:
            listed = _listed(kube, ns, listed)
            return {
                "timed_out_after_s": timeout,
                "not_completed_by_summary": dict(
                    Counter(listed.get(n, "?") for n in want if listed.get(n) != "Completed")
                ),
                "examples": sorted(n for n in want if listed.get(n) != "Completed")[:10],
            }
        time.sleep(1)


def _listed(kube: k8s.Kube, ns: str, before: dict[str, str]) -> dict[str, str]:
    """Every ImportJob's summary from a LIST; the previous answer if the API server did not
    answer (a loaded one times a 1,000-object LIST out: 504): the watch is the main source."""
    try:
        return {
            n: (s.get("summary") or "") for n, s in k8s.importjob_statuses(kube.api, ns).items()
        }
    except Exception as exc:
        say(f"many: LIST of the ImportJobs failed ({type(exc).__name__}); the watch goes on")
        return before


def db_results(
    dsns: dict[int, str], plan: list[dict[str, Any]], operator_log: Path | None = None
) -> dict[str, Any]:
    """Derived dispatch lags of every import and every batch's status, from the databases."""
    lags: list[float] = []
    status: Counter[str] = Counter()
    jobs: Counter[str] = Counter()
    by: dict[tuple[int, str], list[str]] = defaultdict(list)
    for p in plan:
        by[(p["db"], p["tenant"])].append(p["name"])
    missing_lag = 0
    stamps: list[dict[str, Any]] = []
    for (d, tenant), names in sorted(by.items()):
        with tenant_conn(dsns[d], tenant) as conn:
            for r in conn.execute(
                "SELECT job_id, dispatch_lag_seconds FROM wave_coordination "
                "WHERE dependency_level = -2 AND job_id = ANY(%s)",
                (names,),
            ).fetchall():
                if r["dispatch_lag_seconds"] is None:
                    missing_lag += 1
                else:
                    lags.append(float(r["dispatch_lag_seconds"]))
            for r in conn.execute(
                "SELECT status, count(*) AS n FROM wave_batches WHERE job_id = ANY(%s) "
                "GROUP BY status",
                (names,),
            ).fetchall():
                status[r["status"]] += int(r["n"])
            stamps += conn.execute(
                "SELECT job_id, wave_number, extract(epoch FROM dispatched_at)::float8 AS d, "
                "extract(epoch FROM started_at)::float8 AS s, "
                "extract(epoch FROM completed_at)::float8 AS c FROM wave_batches "
                "WHERE job_id = ANY(%s) AND completed_at IS NOT NULL",
                (names,),
            ).fetchall()
            for r in conn.execute(
                "SELECT status, count(*) AS n FROM import_jobs WHERE job_id = ANY(%s) "
                "GROUP BY status",
                (names,),
            ).fetchall():
                jobs[r["status"]] += int(r["n"])
    return {
        "batch_stages_s": _guard(lambda: batch_stages(stamps, operator_log)),
        "derived_dispatch_lag": summary_ms(lags),
        "derived_waves_without_lag": missing_lag,
        "batches_by_status": dict(status),
        "import_jobs_by_status": dict(jobs),
    }


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # a figure that failed must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def batch_stages(stamps: list[dict[str, Any]], operator_log: Path | None) -> dict[str, Any]:
    """Per completed batch (DB clocks; the operator log's wave_job_created time, same host
    clock): dispatch -> its wave Job created, Job created -> the worker's claim, claim ->
    completed, and per import the previous wave's completion -> the next wave's dispatch."""
    created: dict[tuple[str, int], float] = {}
    if operator_log is not None and operator_log.exists():
        for e in events_named(operator_log.read_text(errors="replace"), "wave_job_created"):
            ts = datetime.fromisoformat(str(e["ts"])).timestamp()
            created.setdefault((str(e["job_id"]), int(e["wave"])), ts)
    out: dict[str, Any] = {}

    def put(name: str, xs: list[float]) -> None:
        if xs:
            out[name] = {
                "n": len(xs),
                "p50": round(pct(xs, 50), 2),
                "p90": round(pct(xs, 90), 2),
                "p99": round(pct(xs, 99), 2),
                "max": round(max(xs), 2),
            }

    keyed = [(r, created.get((r["job_id"], r["wave_number"]))) for r in stamps]
    put("dispatch_to_wave_job_created", [c - r["d"] for r, c in keyed if c and r["d"]])
    put("wave_job_created_to_claim", [r["s"] - c for r, c in keyed if c and r["s"]])
    put("dispatch_to_claim", [r["s"] - r["d"] for r in stamps if r["s"] and r["d"]])
    put("claim_to_completed", [r["c"] - r["s"] for r in stamps if r["s"]])
    by: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in stamps:
        by[r["job_id"]][r["wave_number"]] = r
    put(
        "previous_wave_completed_to_next_dispatched",
        [
            w[n]["d"] - w[n - 1]["c"]
            for w in by.values()
            for n in w
            if n - 1 in w and w[n]["d"] and w[n - 1]["c"]
        ],
    )
    return out


def run(
    dsn: str,
    workdir: Path,
    imports: int,
    tenants: int,
    dbs: int,
    timeout: float,
    rest_s: float = REST_S,
) -> dict[str, Any]:
    load0 = [round(x, 2) for x in os.getloadavg()]
    t_start = time.monotonic()
    plan = layout(imports, tenants, dbs)
    say(f"many: {dbs} databases, {tenants} tenant schemas, staging {imports} imports")
    t0 = time.monotonic()
    dsns = prepare(dsn, dbs, plan)
    staged_s = time.monotonic() - t0
    say(
        f"many: staged in {staged_s:.1f} s; starting the cluster "
        f"(kube-controller-manager QPS {KCM_QPS})"
    )
    kube = k8s.Kube(workdir / "k8s-many", start_latency=0, kcm_qps=KCM_QPS)
    res: dict[str, Any] = {
        "measured": True,
        "sizes": {"imports": imports, "tenants": tenants, "databases": dbs},
        "import_shape": "1 Customer batch (1 customer) + 1 SalesOrder batch (2 orders) + "
        "1 derived TransactionLine batch (their lines), parallelism 1, reference worker "
        "`importwaves worker` (pooled, one wave Job per wave), worker idle timeout "
        f"{WORKER_ENV['IMPORTWAVES_WORKER_IDLE_SECONDS']} s",
        "cluster": f"kwokctl binary runtime, k8s v{kube.version}; kube-controller-manager "
        f"client QPS {kube.kcm_qps} / burst {2 * (kube.kcm_qps or 0)} (stock: 20 / 30); local "
        "kubelet: process runtime, pod start latency 0, node capacity 250 pods",
        "operator": "importwaves run --standalone --namespace NS, no Redis, "
        f"PGAPPNAME={OPERATOR_APP}",
        "operator_settings": dict(OPERATOR_SETTINGS),
        "worker_env": dict(WORKER_ENV),
        "staging_s": round(staged_s, 1),
        "rest_window_s": rest_s,
        "load_average_at_start": load0,
    }
    ns = "bench-many"
    sampler: ActivitySampler | None = None
    op: k8s.Operator | None = None
    try:
        from kubernetes import client

        kube.namespace(ns, dsns[1])
        core = client.CoreV1Api(kube.api)
        for d, ddsn in dsns.items():
            core.create_namespaced_secret(
                ns, {"metadata": {"name": f"tenant-db-{d}"}, "stringData": {"dsn": ddsn}}
            )
        sampler = ActivitySampler(dsn)
        op = k8s.Operator(
            kube,
            ns,
            workdir / "operator-many.log",
            timer=float(OPERATOR_SETTINGS["IMPORTWAVES_TIMER_INTERVAL"]),
            extra_env={**OPERATOR_SETTINGS, **WORKER_ENV, "PGAPPNAME": OPERATOR_APP},
        )
        time.sleep(3)
        res["rss_idle_mb"] = op.rss_mb()
        names = [p["name"] for p in plan]
        with k8s.watching(kube.api, ns, ("ImportJob", "Pod")) as ws:
            say(f"many: creating {imports} ImportJobs")
            t_apply = time.monotonic()
            wall0 = time.time()
            create_all(kube.api, ns, [spec(p, ns) for p in plan])
            res["create_s"] = round(time.monotonic() - t_apply, 1)
            problem = wait_completed(kube, ns, ws["ImportJob"], names, op, timeout)
            t_done = time.monotonic()
            if problem:
                res["problem"] = problem
                say(f"many: not every import completed: {json.dumps(problem)[:300]}")
            ijs = ws["ImportJob"].snapshot()
            completed = [
                o.extra["summary_Completed"] for o in ijs if "summary_Completed" in o.extra
            ]
            pods_made = len(ws["Pod"].snapshot())
            res["pods"] = {"created": pods_made, "peak_live_running": ws["Pod"].peak_running}
            if completed and not problem:
                res["all_completed_s"] = round(max(completed) - wall0, 1)
                res["first_completed_s"] = round(min(completed) - wall0, 1)
                res["completed_per_s"] = round(len(completed) / (max(completed) - wall0), 2)
            res["completed"] = len(completed)
            say(
                f"many: all done after {t_done - t_apply:.1f} s; watching the rest for {rest_s:g} s"
            )
            rest_end = time.monotonic() + rest_s
            while time.monotonic() < rest_end and op.alive():
                time.sleep(1)
            t_rest = time.monotonic()
            res["vm_hwm_mb"] = op.hwm_mb()
            res["rss_at_rest_mb"] = op.rss_mb()
        run_rss = [kb / 1024 for t, kb in op.samples if t_apply <= t <= t_done]
        steady = [kb / 1024 for t, kb in op.samples if t_rest - rest_s / 3 <= t <= t_rest]
        res["rss_peak_sampled_mb"] = round(max(run_rss), 1) if run_rss else None
        res["rss_steady_after_mb"] = round(statistics.median(steady), 1) if steady else None
        res["rss_timeline_mb"] = k8s._timeline_mb(op.samples, t_apply, t_rest)
        running = sampler.operator_by_db(t_apply, t_done)
        rest = sampler.operator_by_db(t_rest - 5, t_rest)
        res["connections"] = {
            "peak_per_database": peaks(running),
            "peak_total": max(
                (sum(c["total"] for c in per.values()) for _t, per in running), default=0
            ),
            "at_rest_per_database": {
                db: dict(c) for db, c in (rest[-1][1] if rest else {}).items()
            },
            "at_rest_total": sum(c["total"] for c in rest[-1][1].values()) if rest else None,
            "max_in_last_5_s_of_rest": max(
                (sum(c["total"] for c in per.values()) for _t, per in rest), default=0
            ),
            "released_after_last_completed_s": _released_after(sampler, t_done, t_rest),
            "worker_connections_peak": sampler.workers_peak(t_apply, t_done),
            "samples": len(running),
            "at_peak_grouped": sampler.grouped(_peak_time(running)),
            "at_rest_grouped": sampler.grouped(t_rest),
        }
        res["timeline_s"] = {
            "connections_every_5_s": _conn_timeline(
                sampler.operator_by_db(t_apply, t_rest), t_apply
            ),
        }
    finally:
        if op is not None:
            op.stop()
        if sampler is not None:
            sampler.stop()
        kube.stop()
    res.update(_guard(lambda: db_results(dsns, plan, workdir / "operator-many.log")))
    res["run"] = {
        "wall_s": round(time.monotonic() - t_start, 1),
        "load_average_at_start": load0,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    return res


def _peak_time(series: list[tuple[float, dict[str, Counter[str]]]]) -> float:
    if not series:
        return 0.0
    return max(series, key=lambda s: sum(c["total"] for c in s[1].values()))[0]


def _released_after(sampler: ActivitySampler, t_done: float, t_end: float) -> float | None:
    """Seconds from the last Completed until the operator's connection count reached its
    final value for good."""
    series = sampler.operator_by_db(t_done, t_end)
    if not series:
        return None
    final = sum(c["total"] for c in series[-1][1].values())
    t_final = series[-1][0]
    for t, per in reversed(series):
        if sum(c["total"] for c in per.values()) != final:
            break
        t_final = t
    return round(t_final - t_done, 1)


def _conn_timeline(
    series: list[tuple[float, dict[str, Counter[str]]]], t0: float
) -> list[list[Any]]:
    """[[seconds since create, listen, pool, other]] every ~5 s (operator, all databases)."""
    out: list[list[Any]] = []
    for t, per in series:
        if not out or t - t0 - out[-1][0] >= 5:
            out.append(
                [round(t - t0, 1)]
                + [sum(c[k] for c in per.values()) for k in ("listen", "pool", "other")]
            )
    return out


def row(dsn: str, workdir: Path, quick: bool) -> dict[str, Any]:
    size = SIZES["quick" if quick else "full"]
    return run(dsn, workdir, size["imports"], size["tenants"], size["dbs"], 600 if quick else 2100)


def lines(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The table rows of the result (bench.run's four columns)."""
    if r.get("measured") is False or "sizes" not in r:
        return [("many tenants", "not measured: " + str(r.get("error"))[:70], "-", "-")]
    z = r["sizes"]
    head = f"many ({z['imports']:,} ImportJobs, {z['tenants']} tenants, {z['databases']} DBs)"
    o = r.get("operator_settings") or {}
    idle = (r.get("worker_env") or {}).get("IMPORTWAVES_WORKER_IDLE_SECONDS", 30)
    out = [
        (
            f"{head} settings",
            f"budget {o.get('IMPORTWAVES_BUDGET_TOTAL')} (per tenant "
            f"{o.get('IMPORTWAVES_BUDGET_PER_TENANT')}), poolSize "
            f"{o.get('IMPORTWAVES_POOL_SIZE')}, timer {o.get('IMPORTWAVES_TIMER_INTERVAL')} s, "
            f"worker idle {idle} s",
            "-",
            "-",
        )
    ]
    hwm = max(r.get("vm_hwm_mb") or 0, r.get("rss_peak_sampled_mb") or 0) or None
    if hwm is not None:
        out.append(
            (
                f"{head} operator RSS peak (VmHWM) / steady after (idle)",
                f"{hwm:.0f} / {r.get('rss_steady_after_mb') or 0:.0f} "
                f"({r.get('rss_idle_mb', 0):.0f}) MB",
                "< 250 MB",
                "met" if hwm < 250 else "MISSED",
            )
        )
    c = r.get("connections")
    if c:
        pool = int(r["operator_settings"]["IMPORTWAVES_POOL_SIZE"])
        pk = c["peak_per_database"]
        worst = max((v["total"] for db, v in pk.items() if db), default=0)
        out.append(
            (
                f"{head} operator connections peak per DB (LISTEN + pool + other)",
                ", ".join(
                    f"{db or '(connecting)'}: {v['listen']}+{v['pool']}+{v['other']}"
                    for db, v in pk.items()
                ),
                f"<= 1 + {pool} per DB",
                "met" if worst <= 1 + pool else "MISSED",
            )
        )
        out.append(
            (
                f"{head} operator connections at rest "
                f"({r.get('rest_window_s', REST_S):g} s after the last import)",
                f"{c['at_rest_total']} (released {c['released_after_last_completed_s']} s "
                "after the last Completed)",
                "LISTEN only",
                "-"
                if r.get("problem")
                else "met"
                if all(
                    v.get("pool", 0) == 0 and v.get("other", 0) == 0 and v.get("listen", 0) <= 1
                    for v in c["at_rest_per_database"].values()
                )
                else "MISSED",
            )
        )
    if "all_completed_s" in r:
        out.append(
            (
                f"{head} first create -> all Completed",
                f"{r['all_completed_s']:.0f} s ({r['completed_per_s']:.2f} imports/s)",
                "-",
                "-",
            )
        )
    elif r.get("problem"):
        out.append((f"{head} completion", "NOT ALL: " + json.dumps(r["problem"])[:80], "-", "-"))
    st = (r.get("batch_stages_s") or {}).get("dispatch_to_wave_job_created")
    if st:
        out.append(
            (
                f"{head} per batch: dispatch -> its wave Job created, p50 / p99",
                f"{st['p50']:.1f} / {st['p99']:.1f} s (n={st['n']})",
                "-",
                "-",
            )
        )
    lag = r.get("derived_dispatch_lag")
    if lag and lag.get("n"):
        out.append(
            (
                f"{head} derived dispatch lag (DB view, n={lag['n']}) p50 / p99",
                f"{lag['p50_ms']:.1f} / {lag['p99_ms']:.1f} ms",
                "-",
                "-",
            )
        )
    return out


def _main() -> None:
    import argparse
    import tempfile

    from bench.common import engine_logs_to, start_servers

    ap = argparse.ArgumentParser(prog="python -m bench.many")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--imports", type=int)
    ap.add_argument("--tenants", type=int)
    ap.add_argument("--dbs", type=int)
    ap.add_argument("--timeout", type=float, default=2400)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rest", type=float, default=REST_S, help="seconds watched at rest")
    args = ap.parse_args()
    size = dict(SIZES["quick" if args.quick else "full"])
    for k in ("imports", "tenants", "dbs"):
        if getattr(args, k):
            size[k] = getattr(args, k)
    workdir = Path(tempfile.mkdtemp(prefix="importwaves-bench-many-"))
    engine_logs_to(workdir / "engine.log")
    s = start_servers(workdir)
    try:
        r = run(
            s.dsn,
            workdir,
            size["imports"],
            size["tenants"],
            size["dbs"],
            args.timeout,
            rest_s=args.rest,
        )
    finally:
        s.stop()
    text = json.dumps(r, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    for line in lines(r):
        print("  ".join(line))
    print(f"work directory (operator log): {workdir}")


if __name__ == "__main__":
    _main()
