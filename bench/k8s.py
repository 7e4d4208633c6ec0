"""Row 5: the operator on the real test cluster (kube-apiserver + controllers from `make testbin`
via tests/e2e/harness/cluster.py, worker pods run as local processes by the e2e local kubelet, the
bench's PostgreSQL). `row()` runs the three parts on one cluster, each in its own namespace with
its own operator process (`importwaves run --standalone --namespace NS`, as the e2e tests start
it; no Redis; the default 10 s timer):

objects  one import of 1 + 2 x N tiny batches, worker `true`; watches on Jobs, Pods, Events and
         ImportJobs (opened before the ImportJob is applied) count every object created, the
         updates to them and the peak number of live Jobs/Pods; the kube-apiserver's
         apiserver_request_total gives the requests. Normalized per 10,000 batches.
memory   100 ImportJobs (distinct importId, one tenant) in flight at once; the operator's VmRSS
         (/proc/<pid>/status) sampled every 0.25 s.
lag      last parent batch's commit -> first derived worker Job seen by a watch, for the NOTIFY
         path (reference worker), the Job-event path (bench/silent_worker.py) and the timer
         alone (silent worker that keeps its pod running).

Experiments: `python -m bench.k8s --part objects|memory|lag|timer --n N` (its own servers and
cluster); BENCH_K8S_DEBUG=1 prints per-stage pod/Job latencies and keeps the component logs;
BENCH_KCM_QPS=200 raises the kube-controller-manager's client rate limit (default 20 QPS).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import BENCH_DIR, new_tenant, pct, proc_status_kb, summary_ms, tenant_conn
from importwaves.datagen import generate
from importwaves.k8s.crd import GROUP, PLURAL, VERSION
from importwaves.localdev import free_port
from importwaves.log import events_named

REPO = BENCH_DIR.parent
IMPORTWAVES = Path(sys.executable).parent / "importwaves"
DERIVED = -13


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the cluster ------------------------------------------------------------------------------
class Kube:
    """The e2e cluster (kwokctl, binary runtime) with its local kubelet and the CRDs."""

    def __init__(
        self,
        workdir: Path,
        start_latency: float | None = None,
        kcm_qps: int | None = None,
        pod_env: dict[str, str] | None = None,
    ) -> None:
        import inspect

        from tests.e2e.harness.cluster import Cluster, testbin_dir
        from tests.e2e.harness.localkubelet import LocalKubelet

        qps = str(kcm_qps) if kcm_qps else os.environ.get("BENCH_KCM_QPS")
        self.kcm_qps = int(qps) if qps else None
        if qps:

            class Tuned(Cluster):
                def _write_kwokctl_config(self) -> Path:
                    path = super()._write_kwokctl_config()
                    path.write_text(
                        path.read_text()
                        + "- name: kube-controller-manager\n  extraArgs:\n"
                        + f'  - key: kube-api-qps\n    value: "{qps}"\n'
                        + f'  - key: kube-api-burst\n    value: "{int(qps) * 2}"\n'
                    )
                    return path

            Cluster = Tuned
        t0 = time.monotonic()
        workdir.mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster.start(testbin_dir(), workdir=workdir, name=f"iw-bench-{os.getpid()}")
        try:
            self.cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
            self.cluster.kubectl(
                "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"
            )
            # pod start latency (issue 12): a setting of the local kubelet on i12-k8s and later
            self.start_latency_supported = (
                "start_latency" in inspect.signature(LocalKubelet.__init__).parameters
            )
            extra: dict[str, Any] = {}
            if start_latency is not None and self.start_latency_supported:
                extra["start_latency"] = start_latency
            if pod_env:
                extra["extra_env"] = dict(pod_env)  # every pod's env (the pod's own wins)
            self.kubelet = LocalKubelet(
                self.cluster.api_client,
                root_dir=workdir / "localkubelet",
                kubelet_version=f"v{self.cluster.kube_version}",
                **extra,
            ).start()
        except BaseException:
            self.cluster.stop()
            raise
        self.api = self.cluster.api_client()
        self.version = self.cluster.kube_version
        self.startup_s = time.monotonic() - t0

    def namespace(self, name: str, dsn: str) -> str:
        """A namespace with its default ServiceAccount and the tenant Secret `tenant-db`."""
        from kubernetes import client
        from tests.e2e.harness.operatorkit import wait_for_default_service_account

        core = client.CoreV1Api(self.api)
        core.create_namespace({"metadata": {"name": name}})
        wait_for_default_service_account(core, name)
        core.create_namespaced_secret(
            name,
            {"metadata": {"name": "tenant-db"}, "stringData": {"dsn": dsn}},
        )
        return name

    def apply(self, bodies: Sequence[dict[str, Any]]) -> None:
        docs = "---\n".join(yaml.safe_dump(b) for b in bodies)
        self.cluster.kubectl("apply", "-f", "-", input=docs, timeout=300)

    def delete_importjobs(self, namespace: str) -> None:
        self.cluster.kubectl(
            "-n", namespace, "delete", "importjobs", "--all", "--timeout=120s", check=False
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.kubelet.stop()
        with contextlib.suppress(Exception):
            self.api.close()
        self.cluster.stop()


def importjob(
    name: str,
    namespace: str,
    tenant: str,
    *,
    import_id: str,
    customer_batch: int,
    order_batch: int,
    line_batch: int,
    parallelism: int,
    command: list[str],
    env: dict[str, str] | None = None,
    suspend: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImportJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "tenant": tenant,
            "importId": import_id,
            "database": {"secretName": "tenant-db", "key": "dsn"},
            "recordTypes": [
                {"name": "Customer", "recordTypeId": -2, "batchSize": customer_batch},
                {
                    "name": "SalesOrder",
                    "recordTypeId": -30,
                    "batchSize": order_batch,
                    "parentTypes": ["Customer"],
                },
            ],
            "derivedTypes": [
                {
                    "name": "TransactionLine",
                    "recordTypeId": DERIVED,
                    "batchSize": line_batch,
                    "parentTypes": ["SalesOrder"],
                }
            ],
            "completionThreshold": 100,
            "parallelism": parallelism,
            "retries": 1,
            "staleAfterSeconds": 600,
            "suspend": suspend,
            "worker": {
                "image": "importwaves:bench",
                "command": command,
                "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
            },
        },
    }


# -- the operator -----------------------------------------------------------------------------
class Operator:
    """`importwaves run --standalone --namespace NS` with its VmRSS sampled every `every` s."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        log_path: Path,
        timer: float,
        every: float = 0.25,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        port = free_port()
        env = {
            **os.environ,
            **(extra_env or {}),
            "KUBECONFIG": str(kube.cluster.kubeconfig),
            "IMPORTWAVES_TIMER_INTERVAL": str(timer),
            "IMPORTWAVES_METRICS_PORT": "0",
            "IMPORTWAVES_LIVENESS": f"http://127.0.0.1:{port}/healthz",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("IMPORTWAVES_REDIS_URL", None)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(IMPORTWAVES), "run", "--standalone", "--namespace", namespace],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.samples: list[tuple[float, int]] = []  # (monotonic, VmRSS kB)
        self._stop = threading.Event()
        self._every = every
        self._sampler = threading.Thread(target=self._sample, name="rss", daemon=True)
        self._sampler.start()
        try:
            self._wait_live(f"http://127.0.0.1:{port}/healthz", 180)
        except BaseException:
            self.stop()
            raise

    def _wait_live(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited {self.proc.returncode}: see {self.log_path}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310
                if resp.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"operator not live after {timeout:.0f} s: see {self.log_path}")
            time.sleep(0.1)

    def _sample(self) -> None:
        while not self._stop.is_set():
            kb = proc_status_kb(self.proc.pid, "VmRSS")
            if kb is not None:
                self.samples.append((time.monotonic(), kb))
            self._stop.wait(self._every)

    def rss_mb(self) -> float:
        kb = proc_status_kb(self.proc.pid, "VmRSS")
        return round((kb or 0) / 1024, 1)

    def hwm_mb(self) -> float:
        kb = proc_status_kb(self.proc.pid, "VmHWM")
        return round((kb or 0) / 1024, 1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._sampler.join(5)
        self._log.close()

    def log_events(self, name: str) -> list[dict[str, Any]]:
        return events_named(self.log_path.read_text(errors="replace"), name)


# -- watching the namespace -------------------------------------------------------------------
@dataclass
class Seen:
    """What a watch saw of one object."""

    kind: str
    name: str
    uid: str
    added: float  # time.time() when the ADDED event arrived
    labels: dict[str, str]
    annotations: dict[str, str]
    modified: int = 0
    deleted: float | None = None
    finished: float | None = None  # Jobs: first event with a Complete/Failed condition
    extra: dict[str, Any] = field(default_factory=dict)


class Watch:
    """One watch (kind in a namespace) from "now": every object it sees, with receive times
    (time.time(), the host clock PostgreSQL also uses), the number of MODIFIED events, and
    the peak number of live objects. Resumes after timeouts; relists on 410."""

    def __init__(self, api: Any, kind: str, namespace: str) -> None:
        from kubernetes import client

        fns: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            "Job": (client.BatchV1Api(api).list_namespaced_job, (namespace,)),
            "Pod": (client.CoreV1Api(api).list_namespaced_pod, (namespace,)),
            "Event": (client.CoreV1Api(api).list_namespaced_event, (namespace,)),
            "ImportJob": (
                client.CustomObjectsApi(api).list_namespaced_custom_object,
                (GROUP, VERSION, namespace, PLURAL),
            ),
        }
        self.kind = kind
        self.fn, self.args = fns[kind]
        self.objects: dict[str, Seen] = {}
        self.live: set[str] = set()
        self.live_running: set[str] = set()
        self.peak_live = 0
        self.peak_running = 0
        self.event_counts: Counter[str] = Counter()  # Events: sum of `count` by source
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        listing = self.fn(*self.args, _preload_content=False)
        data = json.loads(listing.data)
        self._preexisting = {i["metadata"]["uid"] for i in data.get("items") or []}
        self._rv = str(data["metadata"]["resourceVersion"])
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        from tests.e2e.harness.operatorkit import follow  # the e2e watch loop (resume, 410 relist)

        follow(self.fn, self.args, self._rv, self._stop, self._on, self._relist, self.errors, 5)

    def _relist(self) -> str:
        listing = self.fn(*self.args, _preload_content=False)
        self.errors.append("410 Gone: relisted (events in between may be missed)")
        return str(json.loads(listing.data)["metadata"]["resourceVersion"])

    def _on(self, kind: str, obj: dict[str, Any], now: float) -> None:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid", "")
        if uid in self._preexisting:
            return
        with self._lock:
            seen = self.objects.get(uid)
            if seen is None:
                seen = Seen(
                    self.kind,
                    meta.get("name", ""),
                    uid,
                    now,
                    dict(meta.get("labels") or {}),
                    dict(meta.get("annotations") or {}),
                )
                self.objects[uid] = seen
                if self.kind == "Event":
                    src = obj.get("reportingComponent") or (obj.get("source") or {}).get(
                        "component", "?"
                    )
                    inv = (obj.get("involvedObject") or {}).get("kind", "?")
                    seen.extra = {"source": src, "involved": inv, "reason": obj.get("reason")}
            elif kind == "MODIFIED":
                seen.modified += 1
            if self.kind == "Event":
                seen.extra["count"] = int(obj.get("count") or 1)
            if kind == "DELETED":
                seen.deleted = now
                self.live.discard(uid)
                self.live_running.discard(uid)
                return
            self.live.add(uid)
            running = True
            if self.kind == "Job":
                conds = {
                    c.get("type")
                    for c in (obj.get("status") or {}).get("conditions") or []
                    if c.get("status") == "True"
                }
                if conds & {"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"}:
                    running = False
                    if seen.finished is None:
                        seen.finished = now
            elif self.kind == "ImportJob":
                summary = (obj.get("status") or {}).get("summary")
                if summary:
                    seen.extra.setdefault(f"summary_{summary}", now)
                self._importjob_change(kind, obj, seen)
            elif self.kind == "Pod":
                phase = (obj.get("status") or {}).get("phase")
                running = phase in (None, "Pending", "Running")
                seen.extra.setdefault(f"phase_{phase}", now)
                if (obj.get("spec") or {}).get("nodeName"):
                    seen.extra.setdefault("bound", now)
                owners = meta.get("ownerReferences") or []
                if owners:
                    seen.extra.setdefault("job", owners[0].get("name"))
            if running:
                self.live_running.add(uid)
            else:
                self.live_running.discard(uid)
            self.peak_live = max(self.peak_live, len(self.live))
            self.peak_running = max(self.peak_running, len(self.live_running))

    @staticmethod
    def _importjob_change(kind: str, obj: dict[str, Any], seen: Seen) -> None:
        """What each MODIFIED event of an ImportJob changed: `status` (which top-level status
        fields), `metadata` (kopf's annotations, finalizers), both or neither."""
        meta = {
            k: v
            for k, v in (obj.get("metadata") or {}).items()
            if k not in ("resourceVersion", "managedFields")
        }
        status = dict(obj.get("status") or {})
        prev = seen.extra.get("_prev")
        seen.extra["_prev"] = (meta, status)
        if prev is None or kind != "MODIFIED":
            return
        pmeta, pstatus = prev
        keys = sorted(k for k in set(status) | set(pstatus) if status.get(k) != pstatus.get(k))
        what = []
        if keys:
            what.append("status")
            fields: Counter[str] = seen.extra.setdefault("status_fields_changed", Counter())
            fields.update(keys)
        if meta != pmeta:
            what.append("metadata")
        changes: Counter[str] = seen.extra.setdefault("modified_by_change", Counter())
        changes["+".join(what) or "nothing"] += 1

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.objects.values())


@contextlib.contextmanager
def watching(api: Any, namespace: str, kinds: Sequence[str]) -> Iterator[dict[str, Watch]]:
    ws = {k: Watch(api, k, namespace) for k in kinds}
    try:
        yield ws
    finally:
        for w in ws.values():
            w.stop()


#: LIST requests the bench itself made (polling ImportJobs), subtracted from the API counts.
BENCH_LISTS: Counter[str] = Counter()


def importjob_statuses(api: Any, namespace: str) -> dict[str, dict[str, Any]]:
    from kubernetes import client

    BENCH_LISTS["importjobs LIST"] += 1
    items = client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL
    )["items"]
    return {i["metadata"]["name"]: i.get("status") or {} for i in items}


def wait_all(
    api: Any,
    namespace: str,
    names: Sequence[str],
    op: Operator,
    timeout: float,
    what: str = "Completed",
    every: float = 0.5,
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        st = importjob_statuses(api, namespace)
        done = [n for n in names if (st.get(n) or {}).get("summary") == what]
        bad = [n for n in names if (st.get(n) or {}).get("summary") in ("Failed", "Invalid")]
        if bad:
            raise RuntimeError(
                f"{len(bad)} ImportJob(s) ended {st[bad[0]].get('summary')}: {st[bad[0]]}"
            )
        if len(done) == len(names):
            return st
        if not op.alive():
            raise RuntimeError(f"operator exited {op.proc.returncode}: see {op.log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{len(names) - len(done)} of {len(names)} ImportJobs not {what} after "
                f"{timeout:.0f} s; see {op.log_path}"
            )
        time.sleep(every)


def apiserver_requests(kube: Kube) -> Counter[str]:
    """kube-apiserver's own request counters (apiserver_request_total), by
    `resource[/subresource] verb`, every client included."""
    text = kube.cluster.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_txt, _, value = line[len("apiserver_request_total{") :].rpartition("} ")
        labels = dict(
            (k, v.strip('"')) for k, _, v in (kv.partition("=") for kv in labels_txt.split('",'))
        )
        res = labels.get("resource", "")
        if labels.get("subresource"):
            res += "/" + labels["subresource"]
        out[f"{res} {labels.get('verb', '')}"] += int(float(value))
    return out


# -- 1. API objects per batch -----------------------------------------------------------------
def stage(dsn: str, tenant: str, job_ids: Sequence[str], orders: int, customers: int) -> None:
    with tenant_conn(dsn, tenant) as conn:
        for job_id in job_ids:
            generate(conn, job_id, orders=orders, customers=customers)


def batches_of(dsn: str, tenant: str, job_id: str) -> list[dict[str, Any]]:
    with tenant_conn(dsn, tenant) as conn:
        return conn.execute(
            "SELECT batch_id, record_type_id, wave_number, status, dispatch_seq, completed_at "
            "FROM wave_batches WHERE job_id = %s",
            (job_id,),
        ).fetchall()


def objects_run(
    kube: Kube, dsn: str, workdir: Path, orders: int, parallelism: int, command: list[str]
) -> dict[str, Any]:
    """One import of 1 + 2 x `orders` batches: 1 Customer batch, one SalesOrder batch per order,
    one derived TransactionLine batch per SalesOrder batch."""
    ns = kube.namespace("bench-objects", dsn)
    tenant = new_tenant(dsn, "bench_k8s_objects")
    job_id = "objects"
    stage(dsn, tenant, [job_id], orders=orders, customers=10)
    op = Operator(kube, ns, workdir / "operator-objects.log", timer=10)
    try:
        with watching(kube.api, ns, ("Job", "Pod", "Event", "ImportJob")) as ws:
            before = apiserver_requests(kube) + BENCH_LISTS
            t0 = time.monotonic()
            kube.apply(
                [
                    importjob(
                        "objects",
                        ns,
                        tenant,
                        import_id=job_id,
                        customer_batch=10,
                        order_batch=1,
                        line_batch=9,
                        parallelism=parallelism,
                        command=command,
                    )
                ]
            )
            wait_all(kube.api, ns, ["objects"], op, timeout=1800)
            wall = time.monotonic() - t0
            deadline = time.monotonic() + 60
            while (ws["Job"].live or ws["Pod"].live) and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(1)
            requests = apiserver_requests(kube) - BENCH_LISTS - before
    finally:
        op.stop()
    n = len(batches_of(dsn, tenant, job_id))
    per = 10_000 / n
    jobs, pods, evs, ijs = (ws[k].snapshot() for k in ("Job", "Pod", "Event", "ImportJob"))
    by_source: Counter[str] = Counter()
    occurrences: Counter[str] = Counter()
    for e in evs:
        key = f"{e.extra['source']}: {e.extra['involved']} {e.extra['reason']}"
        by_source[key] += 1
        occurrences[key] += int(e.extra.get("count", 1))
    if os.environ.get("BENCH_K8S_DEBUG"):
        _timeline(jobs, pods)
    by_resource: Counter[str] = Counter()
    requests = Counter({k: v for k, v in requests.items() if not k.startswith(" ")})
    for key, v in requests.items():
        res, verb = key.split(" ", 1)
        if verb not in ("WATCH", "CONNECT"):
            by_resource[res.split("/")[0]] += v
    operator_events = sum(v for k, v in by_source.items() if k.startswith("kopf"))
    out: dict[str, Any] = {
        "batches": n,
        "parallelism": parallelism,
        "worker_command": command,
        "wall_s": round(wall, 1),
        "batches_per_s": round(n / wall, 2),
        "created": {
            "jobs": len(jobs),
            "pods": len(pods),
            "events": len(evs),
            "events_by_operator": operator_events,
        },
        "events_by_source": dict(by_source.most_common()),
        "event_occurrences_by_source": dict(occurrences.most_common()),
        "left_after": {"jobs": len(ws["Job"].live), "pods": len(ws["Pod"].live)},
        "peak_live": {
            "jobs": ws["Job"].peak_live,
            "unfinished_jobs": ws["Job"].peak_running,
            "pods": ws["Pod"].peak_live,
        },
        "updates_seen": {
            "job": sum(j.modified for j in jobs),
            "pod": sum(p.modified for p in pods),
            "importjob": sum(i.modified for i in ijs),
        },
        "apiserver_requests": {
            "total_non_watch": sum(by_resource.values()),
            "by_resource": dict(by_resource.most_common()),
            "by_resource_verb": {
                k: v for k, v in requests.most_common() if v and not k.endswith(" WATCH")
            },
        },
        "watch_errors": [e for w in ws.values() for e in w.errors][:5],
        "operator_peak_rss_mb": round(max(kb for _, kb in op.samples) / 1024, 1),
    }
    out["per_10k_batches"] = {
        "jobs": round(len(jobs) * per),
        "pods": round(len(pods) * per),
        "events": round(len(evs) * per),
        "events_by_operator": round(operator_events * per),
        "job_updates": round(out["updates_seen"]["job"] * per),
        "pod_updates": round(out["updates_seen"]["pod"] * per),
        "importjob_updates": round(out["updates_seen"]["importjob"] * per),
        "apiserver_requests": round(out["apiserver_requests"]["total_non_watch"] * per),
        "apiserver_requests_by_resource": {k: round(v * per) for k, v in by_resource.most_common()},
    }
    return out


# -- 2. operator RSS with 100 ImportJobs in flight ---------------------------------------------
def memory_run(kube: Kube, dsn: str, workdir: Path, imports: int, sleep_s: float) -> dict[str, Any]:
    """`imports` ImportJobs (distinct importId, one tenant) applied at once. Each: 1 Customer,
    1 SalesOrder, 1 derived TransactionLine batch, parallelism 1, the worker `sleep S` (exit 0:
    recorded completed by the operator). In flight: from the moment every ImportJob has a live
    worker Job (planned in the tenant DB, first batch dispatched, its Job and pod exist) to the
    first Completed; the operator's VmRSS is sampled throughout."""
    ns = kube.namespace("bench-memory", dsn)
    tenant = new_tenant(dsn, "bench_k8s_memory")
    ids = [f"mem-{i:03d}" for i in range(imports)]
    stage(dsn, tenant, ids, orders=2, customers=1)
    op = Operator(kube, ns, workdir / "operator-memory.log", timer=10)
    try:
        time.sleep(3)
        idle = op.rss_mb()
        with watching(kube.api, ns, ("Job", "ImportJob")) as ws:
            t_apply = time.monotonic()
            kube.apply(
                [
                    importjob(
                        i,
                        ns,
                        tenant,
                        import_id=i,
                        customer_batch=1,
                        order_batch=2,
                        line_batch=20,
                        parallelism=1,
                        command=["sleep", f"{sleep_s:g}"],
                    )
                    for i in ids
                ]
            )
            wait_all(kube.api, ns, ids, op, timeout=900, every=2)
            t_done = time.monotonic()
            time.sleep(5)  # the last Jobs' deletion; the operator idle again
            after = op.rss_mb()
            hwm = op.hwm_mb()
        jobs, ijs = ws["Job"].snapshot(), ws["ImportJob"].snapshot()
        peak_jobs = ws["Job"].peak_running
    finally:
        op.stop()
    # Watch times are time.time(); RSS samples are monotonic: one offset converts.
    off = time.time() - time.monotonic()
    first_job: dict[str, float] = {}
    for j in jobs:
        owner = j.labels.get(f"{GROUP}/importjob", "")
        first_job[owner] = min(first_job.get(owner, j.added), j.added)
    done_at = [i.extra["summary_Completed"] for i in ijs if "summary_Completed" in i.extra]
    all_in = max(first_job.values()) - off if len(first_job) == imports else None
    first_done = min(done_at) - off if done_at else None
    run = [kb / 1024 for t, kb in op.samples if t_apply <= t <= t_done]
    steady = (
        [kb / 1024 for t, kb in op.samples if all_in <= t <= first_done]
        if all_in is not None and first_done is not None
        else []
    )
    return {
        "importjobs": imports,
        "import_shape": "1 Customer + 1 SalesOrder + 1 derived TransactionLine batch, "
        f"parallelism 1, worker `sleep {sleep_s:g}` (exit 0)",
        "tenants": 1,
        "rss_idle_mb": idle,
        "rss_peak_mb": round(max(run), 1) if run else None,
        "rss_steady_median_mb": round(pct(steady, 50), 1) if steady else None,
        "rss_steady_max_mb": round(max(steady), 1) if steady else None,
        "rss_after_mb": after,
        "vm_hwm_mb": hwm,
        "in_flight_window_s": round(first_done - all_in, 1)
        if all_in is not None and first_done is not None
        else None,
        "all_in_flight_after_s": round(all_in - t_apply, 1) if all_in is not None else None,
        "wall_s": round(t_done - t_apply, 1),
        "peak_unfinished_jobs": peak_jobs,
        "samples": len(run),
        "rss_timeline_mb": _timeline_mb(op.samples, t_apply, t_done),
    }


def _timeline_mb(samples: list[tuple[float, int]], t0: float, t1: float) -> list[list[float]]:
    """RSS every ~5 s of the run: [[seconds since apply, MB], ...]."""
    out: list[list[float]] = []
    for t, kb in samples:
        if t0 - 5 <= t <= t1 + 5 and (not out or t - t0 - out[-1][0] >= 5):
            out.append([round(t - t0, 1), round(kb / 1024, 1)])
    return out


# -- 3. derived dispatch lag through the API server -----------------------------------------
LAG_SHAPE = "1 Customer + 2 SalesOrder parent batches (10 orders each) + 2 derived batches"


#: The reference worker (NOTIFYs its completion at commit) and the same worker without the
#: NOTIFY (bench/silent_worker.py): only the Job-completion event (or the timer) can tell.
REFERENCE_WORKER = ["importwaves", "worker"]
SILENT_WORKER = ["python", "-m", "bench.silent_worker"]
SILENT_ENV = {"PYTHONPATH": str(REPO)}


def _lag_spec(
    name: str, ns: str, tenant: str, command: list[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    return importjob(
        name,
        ns,
        tenant,
        import_id=name,
        customer_batch=2,
        order_batch=10,
        line_batch=100,
        parallelism=2,
        command=command,
        env=env,
    )


def _lags(
    dsn: str, tenant: str, ids: Sequence[str], jobs: list[Seen], pods: list[Seen]
) -> list[dict[str, Any]]:
    """Per import: last parent commit (DB) -> first derived Job seen by the watch."""
    by_batch = {
        (j.annotations.get(f"{GROUP}/job-id"), j.annotations.get(f"{GROUP}/batch-id")): j
        for j in jobs
    }
    pod_of = {p.extra.get("job"): p for p in pods}
    out = []
    with tenant_conn(dsn, tenant) as conn:
        for job_id in ids:
            rows = conn.execute(
                "SELECT batch_id, record_type_id, extract(epoch FROM completed_at) AS done "
                "FROM wave_batches WHERE job_id = %s",
                (job_id,),
            ).fetchall()
            w = conn.execute(
                "SELECT extract(epoch FROM first_dispatched_at) AS first, dispatch_lag_seconds "
                "FROM wave_coordination WHERE job_id = %s AND dependency_level = -2",
                (job_id,),
            ).fetchone()
            parents = [r for r in rows if r["record_type_id"] == -30]
            derived = [r for r in rows if r["record_type_id"] == DERIVED]
            last = max(parents, key=lambda r: r["done"])
            t_commit = float(last["done"])
            seen = [
                by_batch[(job_id, r["batch_id"])]
                for r in derived
                if (job_id, r["batch_id"]) in by_batch
            ]
            if not seen:
                continue
            rec: dict[str, Any] = {
                "job_id": job_id,
                "lag_s": min(j.added for j in seen) - t_commit,
                "db_dispatch_s": float(w["first"]) - t_commit if w and w["first"] else None,
                "db_view_s": w["dispatch_lag_seconds"] if w else None,
            }
            pj = by_batch.get((job_id, last["batch_id"]))
            if pj is not None:
                pod = pod_of.get(pj.name)
                if pod is not None and pod.extra.get("phase_Succeeded"):
                    rec["pod_succeeded_s"] = pod.extra["phase_Succeeded"] - t_commit
                if pj.finished is not None:
                    rec["job_complete_s"] = pj.finished - t_commit
            out.append(rec)
    return out


def lag_run(kube: Kube, dsn: str, workdir: Path, imports: int, timer: float) -> dict[str, Any]:
    """NOTIFY path and Job-event path side by side: imports one after another (the next applied
    when the previous one is Completed), alternating the reference worker and the silent one,
    one operator (timer `timer` s). The first pair warms up and is not counted."""
    ns = kube.namespace("bench-lag", dsn)
    tenant = new_tenant(dsn, "bench_k8s_lag")
    pairs = [(f"notify-{i:03d}", f"jobevent-{i:03d}") for i in range(imports + 1)]
    stage(dsn, tenant, [x for p in pairs for x in p], orders=20, customers=2)
    op = Operator(kube, ns, workdir / "operator-lag.log", timer=timer)
    try:
        with watching(kube.api, ns, ("Job", "Pod")) as ws:
            t0 = time.monotonic()
            for i, (a, b) in enumerate(pairs):
                order = [(a, REFERENCE_WORKER, None), (b, SILENT_WORKER, SILENT_ENV)]
                for name, cmd, env in order if i % 2 == 0 else order[::-1]:
                    kube.apply([_lag_spec(name, ns, tenant, cmd, env)])
                    wait_all(kube.api, ns, [name], op, timeout=300, every=0.1)
            wall = time.monotonic() - t0
            time.sleep(1)
            jobs, pods = ws["Job"].snapshot(), ws["Pod"].snapshot()
    finally:
        op.stop()
    return {
        "notify": _lags(dsn, tenant, [a for a, _ in pairs[1:]], jobs, pods),
        "job_event": _lags(dsn, tenant, [b for _, b in pairs[1:]], jobs, pods),
        "wall_s": round(wall, 1),
        "timer_s": timer,
    }


def timer_only_run(
    kube: Kube, dsn: str, workdir: Path, imports: int, timer: float
) -> dict[str, Any]:
    """The timer alone: the silent worker waits U(0, timer) s first (parents finish at a
    random phase of the timer), commits its batch, then keeps its pod running, so its Job does
    not finish during the run: only the operator's timer (a level-based reconcile every
    `timer` s per ImportJob) can see the completion. All imports at once."""
    ns = kube.namespace("bench-timer", dsn)
    tenant = new_tenant(dsn, "bench_k8s_timer")
    ids = [f"timer-{i:03d}" for i in range(imports)]
    stage(dsn, tenant, ids, orders=20, customers=2)
    ms = int(timer * 1000)
    silent = " ".join(SILENT_WORKER)
    cmd = ["sh", "-c", f"sleep $(shuf -i 0-{ms} -n 1)e-3; {silent} && exec sleep 3600"]
    op = Operator(kube, ns, workdir / "operator-timer.log", timer=timer)
    try:
        with watching(kube.api, ns, ("Job", "Pod")) as ws:
            t0 = time.monotonic()
            kube.apply([_lag_spec(name, ns, tenant, cmd, SILENT_ENV) for name in ids])
            wait_all(kube.api, ns, ids, op, timeout=20 * timer + 120, every=1)
            wall = time.monotonic() - t0
            jobs, pods = ws["Job"].snapshot(), ws["Pod"].snapshot()
        kube.delete_importjobs(ns)
    finally:
        op.stop()
    return {
        "timer_only": _lags(dsn, tenant, ids, jobs, pods),
        "wall_s": round(wall, 1),
        "timer_s": timer,
    }


# -- the row --------------------------------------------------------------------------------
SIZES = {
    # objects: orders (batches = 1 + 2 x orders); memory: ImportJobs, worker sleep (s);
    # lag: imports per path (NOTIFY, Job event) and timer-only imports
    "full": {"orders": 150, "parallelism": 20, "imports": 100, "sleep": 20, "lag": 20, "timer": 20},
    "quick": {"orders": 50, "parallelism": 20, "imports": 30, "sleep": 10, "lag": 5, "timer": 5},
}
#: The operator's default IMPORTWAVES_TIMER_INTERVAL (settings.py); every row-5 operator runs it.
TIMER_S = 10.0


def _part(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as exc:  # one part failing must not lose the others
        say(f"row 5: {name} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    out["part_wall_s"] = round(time.monotonic() - t0, 1)
    return out


def lag_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = summary_ms([r["lag_s"] for r in rows])
    for key in ("db_dispatch_s", "pod_succeeded_s", "job_complete_s"):
        xs = [r[key] for r in rows if r.get(key) is not None]
        if xs:
            out[f"{key[:-2]}_p50_ms"] = round(pct(xs, 50) * 1000, 1)
    return out


def row(dsn: str, workdir: Path, quick: bool) -> dict[str, Any]:
    """Issue 7 row 5 on one cluster; each part in its own namespace with its own operator."""
    size = SIZES["quick" if quick else "full"]
    t0 = time.monotonic()
    load0 = [round(x, 2) for x in os.getloadavg()]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    kube = Kube(workdir / "k8s")
    say(f"row 5: cluster (k8s v{kube.version}) and local kubelet up in {kube.startup_s:.1f} s")
    res: dict[str, Any] = {
        "measured": True,
        "cluster": f"kwokctl binary runtime, k8s v{kube.version} (make testbin); "
        "kube-controller-manager with its default client QPS 20 / burst 30; worker pods run "
        "as local processes by tests/e2e/harness/localkubelet.py",
        "operator": "importwaves run --standalone --namespace NS (one per part), no Redis, "
        f"IMPORTWAVES_TIMER_INTERVAL={TIMER_S:g} (the default)",
        "sizes": size,
    }
    try:
        n = 1 + 2 * size["orders"]
        say(f"row 5: API objects: one import of {n} batches, worker `true`")
        res["objects"] = _part(
            "objects",
            lambda: objects_run(kube, dsn, workdir, size["orders"], size["parallelism"], ["true"]),
        )
        say(f"row 5: operator RSS with {size['imports']} ImportJobs in flight")
        res["memory"] = _part(
            "memory", lambda: memory_run(kube, dsn, workdir, size["imports"], size["sleep"])
        )
        say(f"row 5: dispatch lag, {size['lag']} imports per path, one after another")
        lag = _part("lag", lambda: lag_run(kube, dsn, workdir, size["lag"], TIMER_S))
        say(f"row 5: dispatch lag, timer only: {size['timer']} imports at once")
        tmr = _part("timer", lambda: timer_only_run(kube, dsn, workdir, size["timer"], TIMER_S))
        res["lag"] = {
            "import_shape": LAG_SHAPE + ", parallelism 2",
            "method": "lag = first derived worker Job's ADDED event at a watch in the bench "
            "(time.time()) - the last parent batch's completed_at (clock_timestamp() in the "
            "worker's completion transaction, just before its commit); one host clock",
            "timer_s": TIMER_S,
        }
        if "error" in lag:
            res["lag"]["error"] = lag["error"]
        else:
            res["lag"]["notify"] = lag_summary(lag["notify"])
            res["lag"]["job_event"] = lag_summary(lag["job_event"])
            res["lag"]["wall_s"] = lag["wall_s"]
        if "error" in tmr:
            res["lag"]["timer_only_error"] = tmr["error"]
        else:
            res["lag"]["timer_only"] = lag_summary(tmr["timer_only"])
            res["lag"]["timer_only_wall_s"] = tmr["wall_s"]
        res["lag"]["timer_only_expected_ms"] = {
            "p50_ms": TIMER_S * 500,
            "p99_ms": TIMER_S * 990,
            "why": "parents finish at a uniformly random phase of the timer: U(0, interval)",
        }
        res["lag"]["rows"] = {
            k: v for k, v in (("paths", lag), ("timer_only", tmr)) if "error" not in v
        }
    finally:
        kube.stop()
    res["run"] = {
        "started_at": started,
        "wall_s": round(time.monotonic() - t0, 1),
        "load_average_at_start": load0,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    return res


def _timeline(jobs: list[Seen], pods: list[Seen]) -> None:
    pod_of = {p.extra.get("job"): p for p in pods}
    stages: dict[str, list[float]] = {}
    for j in jobs:
        p = pod_of.get(j.name)
        if p is None:
            continue
        marks = [
            ("job->pod", j.added, p.added),
            ("pod->bound", p.added, p.extra.get("bound")),
            ("bound->running", p.extra.get("bound"), p.extra.get("phase_Running")),
            ("running->succeeded", p.extra.get("phase_Running"), p.extra.get("phase_Succeeded")),
            ("succeeded->job done", p.extra.get("phase_Succeeded"), j.finished),
            ("job done->deleted", j.finished, j.deleted),
        ]
        for k, a, b in marks:
            if a is not None and b is not None:
                stages.setdefault(k, []).append(b - a)
    for k, xs in stages.items():
        print(f"{k:22s} n={len(xs)} p50={pct(xs, 50):.3f} p90={pct(xs, 90):.3f} max={max(xs):.3f}")


def _main() -> None:  # experiments: python -m bench.k8s --part objects|memory|lag|timer
    import argparse
    import tempfile

    from bench.common import engine_logs_to, start_servers

    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="objects")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--parallelism", type=int, default=20)
    ap.add_argument("--sleep", type=float, default=20)
    ap.add_argument("--timer", type=float, default=10)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="importwaves-bench-k8s-"))
    engine_logs_to(workdir / "engine.log")
    s = start_servers(workdir)
    try:
        kube = Kube(workdir / "k8s")
    except BaseException:
        s.stop()
        raise
    say(f"cluster up in {kube.startup_s:.1f} s ({workdir})")
    try:
        if args.part == "objects":
            r = objects_run(kube, s.dsn, workdir, args.n, args.parallelism, ["true"])
        elif args.part == "memory":
            r = memory_run(kube, s.dsn, workdir, args.n, args.sleep)
        elif args.part == "lag":
            r = lag_run(kube, s.dsn, workdir, args.n, args.timer)
        else:
            r = timer_only_run(kube, s.dsn, workdir, args.n, args.timer)
        print(json.dumps(r, indent=2, default=str))
        if os.environ.get("BENCH_K8S_DEBUG"):
            kube.cluster.save_logs(workdir / "cluster-logs")
    finally:
        try:
            kube.stop()
        finally:
            s.stop()


if __name__ == "__main__":
    _main()
