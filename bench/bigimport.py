"""Rows 6-8 (issue 12): whole imports end to end, against the SQL they run.

Row 6  the 1M-line import (datagen 200,000 orders: 20,000 customers, 200,000 orders,
       1,000,004 lines; batch sizes 500/500/2,500; parallelism 4) with the local runner
       (`importwaves run-local`, its own process, as a user runs it), divided by a plain
       `INSERT ... SELECT` of the same staging rows into copies of the target tables (same
       indexes and foreign keys) on the same server, timed before and after the import. Also
       rows/s, the peak RSS of every process of the run (the runner and each worker: /proc of
       the runner's process tree, sampled every 0.1 s), and the derived dispatch lag; that
       lag also over 10 imports of the row 7 size (`lag_series`: one value per import).
Row 7  the `make demo` size (20,000 orders, 100,004 lines), the same way.
Row 8  the row 6 import through the operator on the test cluster with a 2 s pod start latency
       (bench/k8s.py's cluster; the local kubelet's `start_latency`): wall time divided by the
       local runner's, and the Jobs, Pods and Events created for the import.

Wall time of an import = from starting `importwaves run-local` (or applying the ImportJob) to
its end (the process's exit, the ImportJob's `Completed`); staging is not part of it. Every
import is verified afterwards (every staged row in its target table, `verify_import`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from psycopg import sql

from bench import cpu
from bench.common import BQ, new_tenant, pct, tenant_conn
from importwaves.datagen import generate, reference_spec
from importwaves.db.queries import Q
from importwaves.verify import verify_import

JOB = "big"
DERIVED = -13

SIZES: dict[str, dict[str, int]] = {
    "full": {"orders": 200_000, "demo_orders": 20_000, "k8s_orders": 200_000},
    "quick": {"orders": 20_000, "demo_orders": 4_000, "k8s_orders": 4_000},
}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- staging and the plain INSERT ... SELECT --------------------------------------------------
def stage(dsn: str, tenant_name: str, orders: int) -> dict[str, int]:
    tenant = new_tenant(dsn, tenant_name)
    with tenant_conn(dsn, tenant) as conn:
        data = generate(conn, JOB, orders=orders)
        conn.execute(BQ("vacuum_staging"))
    return {"customers": data.customers, "orders": data.orders, "lines": data.lines}


def plain_insert(dsn: str, tenant: str) -> float:
    """Seconds for INSERT ... SELECT of the job's staging rows into fresh copies of the target
    tables (LIKE ... INCLUDING ALL: the same primary keys, indexes and defaults; the same
    foreign keys added), in one transaction, committed (fsync on). The copies are dropped."""
    plain = f"{tenant}_plain"
    ident, src = sql.Identifier(plain), sql.Identifier(tenant)
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        for ddl in (
            "CREATE TABLE {p}.customers (LIKE {s}.customers INCLUDING ALL)",
            "CREATE TABLE {p}.transactions (LIKE {s}.transactions INCLUDING ALL, "
            "FOREIGN KEY (customer_id) REFERENCES {p}.customers (id))",
            "CREATE TABLE {p}.transaction_lines (LIKE {s}.transaction_lines INCLUDING ALL, "
            "FOREIGN KEY (transaction_id) REFERENCES {p}.transactions (id))",
        ):
            conn.execute(sql.SQL(ddl).format(p=ident, s=src))
        conn.execute(sql.SQL("SET search_path = {}, {}").format(ident, src))
        conn.execute("CHECKPOINT")
        t0 = time.perf_counter()
        with conn.transaction():
            for name in ("plain_insert_customers", "plain_insert_orders", "plain_insert_lines"):
                conn.execute(BQ(name), {"job_id": JOB})
        seconds = time.perf_counter() - t0
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(ident))
    return seconds


# -- the process tree -------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


@dataclass
class ProcSeen:
    pid: int
    role: str  # runner | worker | other
    first: float
    last: float
    hwm_kb: int = 0
    cmd: str = ""


@dataclass
class TreeSampler:
    """Samples the process tree under `root` every `every` s: each process's VmHWM (its peak
    RSS so far; the last sample before it exits is its peak, to within one interval) and the
    tree's total VmRSS at each instant."""

    root: int
    every: float = 0.1
    seen: dict[int, ProcSeen] = field(default_factory=dict)
    total_peak_kb: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> None:
        kids = _children()
        todo, tree = [self.root], []
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += kids.get(pid, [])
        now = time.monotonic()
        total = 0
        for pid in tree:
            st = _status(pid)
            if not st:
                continue
            total += st.get("VmRSS", 0)
            p = self.seen.get(pid)
            if p is None:
                role, cmd = self._role(pid)
                p = self.seen[pid] = ProcSeen(pid, role, now, now, cmd=cmd)
            p.last = now
            p.hwm_kb = max(p.hwm_kb, st.get("VmHWM", 0))
        self.total_peak_kb = max(self.total_peak_kb, total)
        self.samples += 1

    def _role(self, pid: int) -> tuple[str, str]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = ""
        if pid == self.root:
            return "runner", cmd[:120]
        return ("worker" if "worker" in cmd else "other"), cmd[:120]

    def summary(self) -> dict[str, Any]:
        def mb(kb: float) -> float:
            return round(kb / 1024, 1)

        workers = [p.hwm_kb for p in self.seen.values() if p.role == "worker" and p.hwm_kb]
        runner = [p.hwm_kb for p in self.seen.values() if p.role == "runner"]
        others = [p.hwm_kb for p in self.seen.values() if p.role == "other" and p.hwm_kb]
        return {
            "runner_peak_mb": mb(max(runner)) if runner else None,
            "worker_processes_seen": len(workers),
            "worker_peak_mb_max": mb(max(workers)) if workers else None,
            "worker_peak_mb_median": mb(statistics.median(workers)) if workers else None,
            "other_processes_seen": len(others),
            "other_peak_mb_max": mb(max(others)) if others else None,
            "other_commands": sorted({p.cmd for p in self.seen.values() if p.role == "other"})[:5],
            "tree_total_rss_peak_mb": mb(self.total_peak_kb),
            "samples": self.samples,
            "interval_s": self.every,
        }


# -- the local runner -------------------------------------------------------------------------
def run_local(
    dsn: str, tenant: str, workdir: Path, redis_url: str | None, parallelism: int = 4
) -> dict[str, Any]:
    """`importwaves run-local` of the staged job (the reference spec, `parallelism`), timed
    from its start to its exit, its process tree sampled."""
    spec = reference_spec(tenant, parallelism=parallelism)
    spec_file = workdir / f"{tenant}-spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)))
    cmd = [sys.executable, "-m", "importwaves.cli", "run-local", JOB, "-f", str(spec_file)]
    cmd += ["--dsn", dsn]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(BQ("pgss_reset"))
    postmaster = cpu.postmaster_of(dsn)
    log_path = workdir / f"{tenant}-run-local.log"
    env = {**os.environ, "IMPORTWAVES_LOG_LEVEL": "WARNING"}
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid).start()
        cpu_sampler = cpu.CpuSampler(
            cpu.classify_local(postmaster, os.getpid(), proc.pid), roots={"bench": os.getpid()}
        ).start()
        try:
            code = proc.wait(7200)
        finally:
            sampler.stop()
            cpu_use = cpu_sampler.stop()
        wall = time.perf_counter() - t0
    say(f"run-local {cpu.lines(cpu_use)}")
    out = log_path.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"run-local exited {code}: {out[-2000:]}")
    with tenant_conn(dsn, tenant) as conn:
        checked = verify_import(conn, JOB, spec)
        lags = conn.execute(BQ("wave_dispatch_lags"), {"job_id": JOB}).fetchall()
        per_batch = [
            float(r["lag_s"])
            for r in conn.execute(
                BQ("derived_batch_dispatch_lags"), {"job_id": JOB, "derived": DERIVED}
            ).fetchall()
        ]
        batches = conn.execute(BQ("batch_count"), {"job_id": JOB}).fetchone()
        phases = conn.execute(BQ("batch_phases"), {"job_id": JOB}).fetchall()
        top = conn.execute(BQ("pgss_top"), {"n": 15}).fetchall()
        span = conn.execute(BQ("job_span"), {"job_id": JOB}).fetchone()
        timeline = timeline_of(conn)
    derived_wave = [r for r in lags if r["record_type_id"] == DERIVED]
    return {
        "wall_s": round(wall, 2),
        "runner_says": out.strip().splitlines()[-1][:300] if out.strip() else "",
        "verified": checked.ok,
        "verification_failures": checked.failures()[:5],
        "batches": int(batches["n"]) if batches else None,
        "processes": sampler.summary(),
        # CPU seconds by process during the run (bench/cpu.py): runner, workers, PostgreSQL
        "cpu": cpu_use,
        "db_first_dispatch_to_last_completion_s": _num(span["seconds"]) if span else None,
        # where a batch's time goes: dispatch -> claim, claim -> completion (per record type)
        "batch_phases": [{k: _num(v) for k, v in r.items()} for r in phases],
        "timeline": timeline,
        # where the server's time went during the run (pg_stat_statements, reset at start)
        "server_top_statements": [{k: _num(v) for k, v in r.items()} for r in top],
        "wave_dispatch_lag_ms": {
            str(r["wave_number"]): (
                None
                if r["dispatch_lag_seconds"] is None
                else round(float(r["dispatch_lag_seconds"]) * 1000, 2)
            )
            for r in lags
        },
        "derived_wave_dispatch_lag_ms": (
            round(float(derived_wave[0]["dispatch_lag_seconds"]) * 1000, 2)
            if derived_wave and derived_wave[0]["dispatch_lag_seconds"] is not None
            else None
        ),
        "derived_batch_lag": {
            "n": len(per_batch),
            "p50_ms": round(pct(per_batch, 50) * 1000, 1) if per_batch else None,
            "p99_ms": round(pct(per_batch, 99) * 1000, 1) if per_batch else None,
            "what": "per derived batch: its (last) dispatch minus its parent batch's "
            "completion; includes waiting for a free worker (parallelism) behind earlier work",
        },
    }


NAMED = ("jobs", "pods", "events", "importjobs", "secrets", "leases", "configmaps")


def operator_api_calls(path: Path) -> Counter[str]:
    """The operator's API requests so far (bench/apicount/sitecustomize.py's file), by client,
    method and path with object names replaced by {name}."""
    import json

    out: Counter[str] = Counter()
    with contextlib.suppress(OSError, ValueError):
        for key, n in json.loads(path.read_text()).items():
            client, method, p = key.split(" ", 2)
            parts = p.split("/")
            for i in range(len(parts) - 1):
                if parts[i] in NAMED and parts[i - 1] != "" and i + 1 < len(parts):
                    parts[i + 1] = "{name}"
            out[f"{client} {method} {'/'.join(parts)}"] += int(n)
    return out


def operator_log_counts(path: Path) -> dict[str, int]:
    """The operator's JSON log lines counted by their `event` name (most first)."""
    import json

    out: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out[str(rec.get("event") or f"{rec.get('logger')}: {rec.get('msg')}")[:70]] += 1
    return dict(out.most_common(40))


def timeline_of(conn: Any) -> dict[str, Any]:
    """When each wave ran (seconds from the job's first dispatch) and how many batches were in
    workers' hands, on average, in each second of the job's span."""
    waves = conn.execute(BQ("wave_timeline"), {"job_id": JOB}).fetchall()
    busy = conn.execute(BQ("busy_profile"), {"job_id": JOB}).fetchall()
    return {
        "waves": [{k: _num(v) for k, v in r.items()} for r in waves],
        "busy_per_second": [float(r["busy"] or 0) for r in busy],
    }


def _num(v: Any) -> Any:
    """Decimal -> float for JSON."""
    return float(v) if v is not None and type(v).__name__ == "Decimal" else v


def import_row(
    dsn: str, workdir: Path, redis_url: str | None, orders: int, name: str, plain_runs: int = 2
) -> dict[str, Any]:
    """Stage `orders` orders, time the plain INSERT ... SELECT, run the import, time the plain
    insert again: ratio = import wall / mean plain insert."""
    t0 = time.monotonic()
    tenant = f"bench_{name}"
    staged = stage(dsn, tenant, orders)
    rows = sum(staged.values())
    say(
        f"{name}: staged {rows:,} rows ({staged['lines']:,} lines) in {time.monotonic() - t0:.0f} s"
    )
    plain = [plain_insert(dsn, tenant)]
    say(f"{name}: plain INSERT ... SELECT {plain[0]:.2f} s; running the import (run-local)")
    run = run_local(dsn, tenant, workdir, redis_url)
    say(f"{name}: import {run['wall_s']:.1f} s ({run['runner_says']})")
    for _ in range(plain_runs - 1):
        plain.append(plain_insert(dsn, tenant))
    mean_plain = sum(plain) / len(plain)
    out = {
        "staged": staged,
        "rows": rows,
        "shape": f"datagen {orders:,} orders; batch sizes 500/500/2,500; parallelism 4",
        "plain_insert_s": [round(x, 2) for x in plain],
        "import": run,
        "ratio_import_over_plain": round(run["wall_s"] / mean_plain, 2),
        "rows_per_s": round(rows / run["wall_s"]),
        "plain_rows_per_s": round(rows / mean_plain),
    }
    with contextlib.suppress(Exception):
        from bench.common import drop_tenant

        drop_tenant(dsn, tenant)
    return out


def lag_series(
    dsn: str, workdir: Path, redis_url: str | None, orders: int, runs: int
) -> dict[str, Any]:
    """Row 6's derived dispatch lag as a distribution: the derived wave's lag (DB view, one
    value per import) of `runs` imports of `orders` orders, each staged in its own tenant and
    run with `importwaves run-local` as row 6's, verified, then dropped."""
    from bench.common import drop_tenant

    values: list[float] = []
    for i in range(runs):
        tenant = f"bench_lag_series_{i}"
        stage(dsn, tenant, orders)
        run = run_local(dsn, tenant, workdir, redis_url)
        if not run["verified"] or run["derived_wave_dispatch_lag_ms"] is None:
            raise RuntimeError(f"lag series import {i}: not verified, or no derived lag: {run}")
        values.append(float(run["derived_wave_dispatch_lag_ms"]))
        with contextlib.suppress(Exception):
            drop_tenant(dsn, tenant)
    return {
        "what": f"the derived wave's dispatch lag (DB view) of {runs} imports of {orders:,} "
        "orders, each its own run-local",
        "n": len(values),
        "values_ms": values,
        "p50_ms": round(pct(values, 50), 2),
        "p99_ms": round(pct(values, 99), 2),
        "max_ms": round(max(values), 2),
    }


# -- the operator on the test cluster, 2 s pod start latency ----------------------------------
POD_START_LATENCY_S = 2.0


def kubernetes_import_row(
    dsn: str, workdir: Path, orders: int, local_wall_s: float | None
) -> dict[str, Any]:
    """The reference import through the operator (`importwaves run --standalone`) on the e2e
    cluster, the local kubelet starting each pod POD_START_LATENCY_S after it is bound."""
    from bench import k8s

    # a run from an export of another commit (PYTHONPATH over this venv) runs its pods from it
    pod_env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    kube = k8s.Kube(workdir / "k8s-import", start_latency=POD_START_LATENCY_S, pod_env=pod_env)
    try:
        if not kube.start_latency_supported:
            return {
                "measured": False,
                "error": "this branch's local kubelet has no start_latency setting "
                "(tests/e2e/harness/localkubelet.py, i12-k8s)",
            }
        ns = kube.namespace("bench-import", dsn)
        tenant = "bench_k8s_import"
        staged = stage(dsn, tenant, orders)
        apicount = workdir / "operator-import-apicount.json"
        pypath = [str(Path(__file__).parent / "apicount"), os.environ.get("PYTHONPATH", "")]
        op = k8s.Operator(
            kube,
            ns,
            workdir / "operator-import.log",
            timer=10,
            extra_env={
                "PYTHONPATH": os.pathsep.join(p for p in pypath if p),
                "IMPORTWAVES_BENCH_APICOUNT": str(apicount),
            },
        )
        cluster_dir = str(kube.cluster.workdir / "kwok" / "clusters" / kube.cluster.name)
        classify = cpu.classify_cluster(
            cpu.postmaster_of(dsn), os.getpid(), op.proc.pid, cluster_dir
        )
        try:
            with k8s.watching(kube.api, ns, ("Job", "Pod", "Event", "ImportJob")) as ws:
                api_before = k8s.apiserver_requests(kube)
                op_calls_before = operator_api_calls(apicount)
                cpu_sampler = cpu.CpuSampler(classify, roots={"bench+kubelet": os.getpid()})
                cpu_sampler.start()
                t0 = time.monotonic()
                kube.apply(
                    [
                        k8s.importjob(
                            "big",
                            ns,
                            tenant,
                            import_id=JOB,
                            customer_batch=500,
                            order_batch=500,
                            line_batch=2500,
                            parallelism=4,
                            command=k8s.REFERENCE_WORKER,
                        )
                    ]
                )
                k8s.wait_all(kube.api, ns, ["big"], op, timeout=7200, every=1)
                wall = time.monotonic() - t0
                cpu_use = cpu_sampler.stop()
                api_calls = k8s.apiserver_requests(kube) - api_before
                time.sleep(1.2)  # the operator writes its counts every second
                op_calls = operator_api_calls(apicount) - op_calls_before
                time.sleep(2)
            say(f"operator import {cpu.lines(cpu_use)}")
            rss_peak = max((kb for _, kb in op.samples), default=0)
        finally:
            op.stop()
        with tenant_conn(dsn, tenant) as conn:
            spec = reference_spec(tenant, parallelism=4)
            checked = verify_import(conn, JOB, spec)
            waves = conn.execute(Q("waves_snapshot"), {"job_id": JOB}).fetchall()
            batches = conn.execute(BQ("batch_count"), {"job_id": JOB}).fetchone()
            phases = conn.execute(BQ("batch_phases"), {"job_id": JOB}).fetchall()
            lags = conn.execute(BQ("wave_dispatch_lags"), {"job_id": JOB}).fetchall()
            span = conn.execute(BQ("job_span"), {"job_id": JOB}).fetchone()
            timeline = timeline_of(conn)
        jobs, pods, evs = (ws[k].snapshot() for k in ("Job", "Pod", "Event"))
        ij_seen = ws["ImportJob"].snapshot()
        ij_changes = {
            "modified_events": sum(s.modified for s in ij_seen),
            "by_change": dict(
                sum((s.extra.get("modified_by_change", Counter()) for s in ij_seen), Counter())
            ),
            "status_fields_changed": dict(
                sum(
                    (s.extra.get("status_fields_changed", Counter()) for s in ij_seen), Counter()
                ).most_common()
            ),
        }
        api_top = dict(api_calls.most_common(25))
        op_log = operator_log_counts(op.log_path)
        say(
            f"operator import: ImportJob MODIFIED {ij_changes['modified_events']} "
            f"({ij_changes['by_change']}); Events {len(evs)}; Job MODIFIED "
            f"{sum(j.modified for j in jobs)}, Pod MODIFIED {sum(p.modified for p in pods)}; "
            f"API requests (all clients) {sum(api_calls.values())}: "
            + ", ".join(f"{k} {v}" for k, v in list(api_top.items())[:12])
        )
        say(
            f"operator import: the operator's own API requests {sum(op_calls.values())}: "
            + ", ".join(f"{k} {v}" for k, v in op_calls.most_common(14))
        )
        say(f"operator import: operator log events {dict(list(op_log.items())[:15])}")
        by_source: dict[str, int] = {}
        for e in evs:
            key = f"{e.extra['source']}: {e.extra['involved']} {e.extra['reason']}"
            by_source[key] = by_source.get(key, 0) + 1
        return {
            "measured": True,
            "pod_start_latency_s": POD_START_LATENCY_S,
            "staged": staged,
            "batches": int(batches["n"]) if batches else None,
            "waves": len(waves),
            "wall_s": round(wall, 1),
            "ratio_over_local_runner": (round(wall / local_wall_s, 2) if local_wall_s else None),
            "verified": checked.ok,
            "created": {"jobs": len(jobs), "pods": len(pods), "events": len(evs)},
            "events_by_source": dict(sorted(by_source.items(), key=lambda kv: -kv[1])),
            "peak_live": {"jobs": ws["Job"].peak_live, "pods": ws["Pod"].peak_live},
            "operator_peak_rss_mb": round(rss_peak / 1024, 1),
            # row 8 broken down: CPU seconds by process (bench/cpu.py), the ImportJob's
            # MODIFIED events by what they changed (status writes vs kopf's metadata), the
            # Jobs' and Pods' MODIFIED events (each a prompt to the operator), the API server's
            # requests during the import (every client: operator, controllers, kubelet, bench
            # watches), and the operator's log events by name
            "cpu": cpu_use,
            "importjob_writes": ij_changes,
            "job_modified_events": sum(j.modified for j in jobs),
            "pod_modified_events": sum(p.modified for p in pods),
            "api_requests_all_clients": {"total": sum(api_calls.values()), "top": api_top},
            "operator_log_events": op_log,
            "operator_api_requests": {
                "total": sum(op_calls.values()),
                "by_call": dict(op_calls.most_common()),
            },
            # where the time goes: per batch dispatch -> claim (a pod's start counts here) and
            # claim -> completion, by record type; the waves' dispatch lags; the database's
            # first dispatch -> last completion
            "batch_phases": [{k: _num(v) for k, v in r.items()} for r in phases],
            "timeline": timeline,
            "wave_dispatch_lag_ms": {
                str(r["wave_number"]): (
                    None
                    if r["dispatch_lag_seconds"] is None
                    else round(float(r["dispatch_lag_seconds"]) * 1000, 2)
                )
                for r in lags
            },
            "db_first_dispatch_to_last_completion_s": _num(span["seconds"]) if span else None,
        }
    finally:
        kube.stop()
