"""Harness for the operator e2e tests: the operator as a subprocess, tenant databases, watches
that record every ImportJob status and every worker Job ever created, and failure dumps.

Everything here is real: `importwaves run` against the test kube-apiserver, worker pods run by
the local kubelet, the tenant schema in the session's PostgreSQL.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from importwaves.datagen import DataSet, generate
from importwaves.db import migrate
from importwaves.db.connect import Conn, connect
from importwaves.k8s.crd import GROUP, PLURAL, VERSION
from importwaves.localdev import free_port
from importwaves.log import events_named

from .cluster import REPO_ROOT, Cluster

IMPORTWAVES = Path(sys.executable).parent / "importwaves"
#: the fault injection of slow_ticks/sitecustomize.py (see there)
SLOW_TICKS_DIR = Path(__file__).parent / "slow_ticks"
SLOW_TICK_MARK = "slow_ticks: every timer tick returns late by"


def slow_ticks_env(seconds: float) -> dict[str, str]:
    """The operator environment that makes each of its timer ticks return `seconds` after its
    reconcile; its log then holds SLOW_TICK_MARK."""
    return {"PYTHONPATH": str(SLOW_TICKS_DIR), "IMPORTWAVES_TEST_SLOW_TICK_S": f"{seconds:g}"}


EXAMPLES = REPO_ROOT / "examples"


# -- the operator process --------------------------------------------------------------------------
class OperatorProcess:
    """`importwaves run --standalone --namespace NS` with its output in `log_path`."""

    def __init__(
        self,
        cluster: Cluster,
        namespaces: list[str],
        log_path: Path,
        env: dict[str, str],
        standalone: bool = True,
    ) -> None:
        self.standalone = standalone
        self.cluster = cluster
        self.namespaces = namespaces
        self.log_path = log_path
        self.extra_env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60) -> OperatorProcess:
        port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "IMPORTWAVES_TIMER_INTERVAL": "1",
            "IMPORTWAVES_METRICS_PORT": "0",
            "IMPORTWAVES_MAX_BACKOFF": "2",
            "IMPORTWAVES_LIVENESS": f"http://127.0.0.1:{port}/healthz",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        env.pop("IMPORTWAVES_REDIS_URL", None)
        args = [str(IMPORTWAVES), "run"] + (["--standalone"] if self.standalone else [])
        for ns in self.namespaces:
            args += ["--namespace", ns]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(args)}\n".encode())
            self.proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{port}/healthz"
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"operator exited {self.proc.returncode} at startup:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(f"operator not live after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no graceful shutdown of kopf."""
        assert self.proc is not None and self.running, "operator is not running"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        with self.log_path.open("ab") as log:
            log.write(b"\n===== SIGKILLed by the test\n")

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None or not self.running:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_events(self, name: str) -> list[dict[str, Any]]:
        """The operator's structured log records with `"event": name`."""
        return events_named(self.log(), name)


# -- tenant databases ------------------------------------------------------------------------------
@dataclass
class Tenant:
    """One tenant schema in the test PostgreSQL, migrated, with staging data for `job_id`."""

    dsn: str
    name: str

    def create(self) -> Tenant:
        self.drop()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            migrate.up(conn, self.name)
        return self

    def generate(self, job_id: str, orders: int, customers: int | None = None) -> DataSet:
        with self.connect() as conn:
            return generate(conn, job_id, orders=orders, customers=customers)

    def connect(self) -> Conn:
        return connect(self.dsn, self.name, autocommit=True)

    def query(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def scalar(self, query: str, params: Any = None) -> Any:
        rows = self.query(query, params)
        return next(iter(rows[0].values())) if rows else None

    def batches(self, job_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT batch_id, record_type_id, wave_number, status, attempts, dispatch_seq, "
            "last_error, worker_id FROM wave_batches WHERE job_id = %s ORDER BY id",
            (job_id,),
        )

    def target_counts(self, job_id: str) -> dict[str, int]:
        return {
            t: int(self.scalar(f"SELECT count(*) FROM {t} WHERE imported_job = %s", (job_id,)))
            for t in ("customers", "transactions", "transaction_lines")
        }

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.name))
            )


# -- manifests -------------------------------------------------------------------------------------
def example_importjob() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / "importjob.yaml").read_text())
    return data


def importjob(
    name: str,
    namespace: str,
    tenant: str,
    secret: str = "tenant-db",
    **spec: Any,
) -> dict[str, Any]:
    """The example ImportJob with another name/namespace/tenant/Secret and `spec` overrides
    (no importId unless given: the job id is then `<namespace>.<name>`)."""
    body = copy.deepcopy(example_importjob())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"].pop("importId", None)
    body["spec"].update(tenant=tenant, database={"secretName": secret, "key": "dsn"}, **spec)
    return body


def small_spec(
    customers: int = 100,
    orders: int = 100,
    lines: int = 1000,
    *,
    parallelism: int = 3,
    hold: float | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """ImportJob spec fields (no tenant or database) for the reference import with these batch
    sizes: Customer, then SalesOrder, then the derived TransactionLine. `hold`: the reference
    worker holds each batch that many seconds (so kills and patches land while batches are out).
    """
    spec: dict[str, Any] = {
        "recordTypes": [
            {"name": "Customer", "recordTypeId": -2, "batchSize": customers},
            {
                "name": "SalesOrder",
                "recordTypeId": -30,
                "batchSize": orders,
                "parentTypes": ["Customer"],
            },
        ],
        "derivedTypes": [
            {
                "name": "TransactionLine",
                "recordTypeId": -13,
                "batchSize": lines,
                "parentTypes": ["SalesOrder"],
            }
        ],
        "parallelism": parallelism,
    }
    if hold is not None:
        spec["worker"] = {
            "image": "importwaves:test",
            "command": ["importwaves", "worker"],
            "env": [{"name": "IWTEST_WORKER_HOLD_SECONDS", "value": str(hold)}],
        }
    spec.update(overrides)
    return spec


def apply(cluster: Cluster, body: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=check)


def wait_for_default_service_account(core: Any, namespace: str, timeout: float = 30) -> None:
    """With ServiceAccount admission on, pods need the namespace's `default` SA first; it is
    created asynchronously after the namespace. `core`: a kubernetes CoreV1Api."""
    from kubernetes import client

    deadline = time.monotonic() + timeout
    while True:
        try:
            core.read_namespaced_service_account("default", namespace)
            return
        except client.ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def create_secret(cluster: Cluster, namespace: str, name: str, dsn: str) -> None:
    cluster.kubectl(
        "-n", namespace, "create", "secret", "generic", name, f"--from-literal=dsn={dsn}"
    )


# -- watches ---------------------------------------------------------------------------------------
def follow(
    list_fn: Callable[..., Any],
    args: tuple[Any, ...],
    rv: str,
    stop: threading.Event,
    on_event: Callable[[str, dict[str, Any], float], None],
    relist: Callable[[], str],
    errors: list[str],
    timeout_seconds: int = 2,
) -> None:
    """Watch `list_fn(*args)` from resourceVersion `rv` until `stop` is set, handing each
    ADDED/MODIFIED/DELETED object to `on_event(type, object, time.time() on arrival)`. Resumes
    after every watch timeout from the last resourceVersion seen, skips bookmarks, on 410 Gone
    takes the resourceVersion `relist()` returns, and records any other error in `errors` and
    goes on watching."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    while not stop.is_set():
        w = watch.Watch()
        try:
            for ev in w.stream(
                list_fn,
                *args,
                resource_version=rv,
                timeout_seconds=timeout_seconds,
                allow_watch_bookmarks=True,
            ):
                now = time.time()
                obj = ev["raw_object"]
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if ev["type"] == "BOOKMARK":
                    continue
                if ev["type"] == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                on_event(ev["type"], obj, now)
                if stop.is_set():
                    break
        except ApiException as exc:
            if exc.status == 410:
                rv = relist()
            else:
                errors.append(f"{exc.status} {exc.reason}")
                time.sleep(0.2)
        except Exception as exc:  # keep watching; reported at the end
            errors.append(repr(exc))
            time.sleep(0.2)
        finally:
            w.stop()


class Recorder:
    """Watches one kind in one namespace from "now" and keeps every event's object (dicts).

    Survives watch timeouts (resumes from the last resourceVersion) and 410 Gone (relists)."""

    def __init__(self, list_fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        self.list_fn, self.args, self.what = list_fn, args, what
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{what}", daemon=True)

    def start(self) -> Recorder:
        rv = self._list()
        self._rv = rv
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _list(self) -> str:
        listing = self.list_fn(*self.args, _preload_content=False)
        data = json.loads(listing.data)
        with self._lock:
            for item in data.get("items") or []:
                self.events.append(("LISTED", item))
        return str(data["metadata"]["resourceVersion"])

    def _run(self) -> None:
        follow(self.list_fn, self.args, self._rv, self._stop, self._record, self._list, self.errors)

    def _record(self, kind: str, obj: dict[str, Any], _now: float) -> None:
        with self._lock:
            self.events.append((kind, obj))

    def snapshot(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.events)


def watch_importjobs(api: Any, namespace: str) -> Recorder:
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    return Recorder(
        custom.list_namespaced_custom_object,
        (GROUP, VERSION, namespace, PLURAL),
        f"importjobs/{namespace}",
    ).start()


def watch_jobs(api: Any, namespace: str) -> Recorder:
    from kubernetes import client

    batch = client.BatchV1Api(api)
    return Recorder(batch.list_namespaced_job, (namespace,), f"jobs/{namespace}").start()


def watch_pods(api: Any, namespace: str) -> Recorder:
    from kubernetes import client

    core = client.CoreV1Api(api)
    return Recorder(core.list_namespaced_pod, (namespace,), f"pods/{namespace}").start()


@dataclass(frozen=True)
class CreatedJob:
    """A worker Job: one work-queue Job per wave (launch/kubejobs.py)."""

    name: str
    uid: str
    wave: int
    index: int
    record_type: str
    owner: str
    parallelism: int


def created_jobs(rec: Recorder) -> list[CreatedJob]:
    """Every distinct worker Job object (by uid) the recorder saw, in order of appearance."""
    seen: dict[str, CreatedJob] = {}
    for _, obj in rec.snapshot():
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if meta.get("uid") in seen or f"{GROUP}/owner-uid" not in labels:
            continue
        owners = [r["name"] for r in meta.get("ownerReferences") or []]
        seen[meta["uid"]] = CreatedJob(
            meta["name"],
            meta["uid"],
            int(labels[f"{GROUP}/wave"]),
            int(labels[f"{GROUP}/job-index"]),
            labels.get(f"{GROUP}/record-type", ""),
            owners[0] if owners else "",
            int((obj.get("spec") or {}).get("parallelism") or 0),
        )
    return list(seen.values())


def overlapping_jobs(rec: Recorder) -> list[str]:
    """Worker Jobs created while another Job of the same ImportJob (uid) and wave had not yet
    finished, as the watch saw them in order: there must be none (a wave gets its next Job only
    after its pods have ended)."""
    finished = {"Complete", "Failed"}
    active: dict[tuple[str, str], str] = {}  # (owner uid, wave) -> the Job not yet finished
    seen: set[str] = set()
    out = []
    for kind, obj in rec.snapshot():
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        uid = labels.get(f"{GROUP}/owner-uid")
        if not uid:
            continue
        key = (uid, labels.get(f"{GROUP}/wave", ""))
        done = kind == "DELETED" or any(
            c.get("type") in finished and c.get("status") == "True"
            for c in (obj.get("status") or {}).get("conditions") or []
        )
        if meta["uid"] not in seen:
            seen.add(meta["uid"])
            other = active.get(key)
            if other is not None and other != meta["uid"]:
                out.append(meta["name"])
        if done:
            if active.get(key) == meta["uid"]:
                del active[key]
        else:
            active[key] = meta["uid"]
    return out


def created_pods(rec: Recorder) -> list[str]:
    """Names of every distinct worker pod (by uid) the recorder saw."""
    seen: dict[str, str] = {}
    for _, obj in rec.snapshot():
        meta = obj.get("metadata") or {}
        if f"{GROUP}/owner-uid" in (meta.get("labels") or {}):
            seen.setdefault(meta["uid"], meta["name"])
    return list(seen.values())


def deleted_unfinished(rec: Recorder) -> list[str]:
    """Worker Jobs that were deleted before they finished (the last state the watch saw had
    neither a success nor a failure condition)."""
    finished = {"Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"}
    out = []
    for kind, obj in rec.snapshot():
        if kind != "DELETED":
            continue
        conds = {
            c.get("type")
            for c in (obj.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"
        }
        if not conds & finished:
            out.append(obj["metadata"]["name"])
    return out


def status_history(rec: Recorder, name: str) -> list[dict[str, Any]]:
    """The distinct statuses of ImportJob `name`, in the order they were observed."""
    out: list[dict[str, Any]] = []
    for _, obj in rec.snapshot():
        if (obj.get("metadata") or {}).get("name") != name:
            continue
        st = obj.get("status") or {}
        if not out or out[-1] != st:
            out.append(st)
    return out


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


def is_true(status: dict[str, Any], ctype: str) -> bool:
    return conditions(status).get(ctype, {}).get("status") == "True"


# -- the per-test harness --------------------------------------------------------------------------
@dataclass
class Harness:
    """Bounded waits on ImportJobs that fail with everything needed to understand why."""

    cluster: Cluster
    namespace: str
    operators: list[OperatorProcess] = field(default_factory=list)
    tenants: list[Tenant] = field(default_factory=list)

    def get(self, name: str) -> dict[str, Any] | None:
        r = self.cluster.kubectl(
            "-n", self.namespace, "get", "importjob", name, "-o", "json", check=False
        )
        return json.loads(r.stdout) if r.returncode == 0 else None

    def status(self, name: str) -> dict[str, Any]:
        obj = self.get(name)
        return (obj or {}).get("status") or {}

    def wait(
        self,
        name: str,
        pred: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = 90,
        interval: float = 0.3,
    ) -> dict[str, Any]:
        """Poll ImportJob `name` until `pred(status)`; return the status or fail with dumps."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
            if pred(st):
                return st
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout}s waiting for importjob/{name}: {what}")
            for op in self.operators:
                if op.starts and not op.running and op.proc is not None:
                    rc = op.proc.returncode
                    if rc not in (-signal.SIGKILL,):
                        self.fail(f"operator exited {rc} while waiting for {what}")
            time.sleep(interval)

    def wait_for(
        self, fn: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.3
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = fn()
            if got:
                return got
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        args = ["-n", self.namespace, "get", "events", "-o", "json"]
        if name:
            args += ["--field-selector", f"involvedObject.name={name}"]
        r = self.cluster.kubectl(*args, check=False)
        items: list[dict[str, Any]] = json.loads(r.stdout).get("items", []) if r.stdout else []
        return items

    def event_reasons(self, name: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for e in self.events(name):
            if (e.get("involvedObject") or {}).get("kind") == "ImportJob":
                out.setdefault(e["reason"], []).append(e.get("message", ""))
        return out

    def jobs(self) -> list[dict[str, Any]]:
        r = self.cluster.kubectl("-n", self.namespace, "get", "jobs", "-o", "json")
        items: list[dict[str, Any]] = json.loads(r.stdout)["items"]
        return items

    def pods(self) -> list[dict[str, Any]]:
        r = self.cluster.kubectl("-n", self.namespace, "get", "pods", "-o", "json")
        items: list[dict[str, Any]] = json.loads(r.stdout)["items"]
        return items

    def dump(self) -> str:
        parts = []
        for args in (
            ("get", "importjobs", "-o", "yaml"),
            ("get", "jobs,pods", "-o", "wide"),
            ("get", "events", "--sort-by=.lastTimestamp"),
        ):
            r = self.cluster.kubectl("-n", self.namespace, *args, check=False)
            parts.append(f"$ kubectl -n {self.namespace} {' '.join(args)}\n{r.stdout}{r.stderr}")
        for t in self.tenants:
            with contextlib.suppress(Exception):
                rows = t.query(
                    "SELECT job_id, batch_id, status, attempts, dispatch_seq, last_error "
                    "FROM wave_batches ORDER BY id"
                )
                parts.append(f"tenant {t.name} wave_batches:\n" + "\n".join(str(r) for r in rows))
        for op in self.operators:
            parts.append(f"operator log {op.log_path} (tail):\n{op.log_tail(60)}")
        return "\n\n".join(parts)

    def fail(self, message: str) -> None:
        raise AssertionError(f"{message}\n\n{self.dump()}")

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Assertion failures inside the block carry the dump."""
        try:
            yield
        except AssertionError as exc:
            if "operator log" in str(exc):
                raise
            raise AssertionError(f"{exc}\n\n{self.dump()}") from None
