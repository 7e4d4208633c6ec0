"""A "local kubelet": runs the pods bound to one Node as local processes, or as containers.

The e2e cluster has no container runtime. This stand-in registers a Node (Ready, untainted,
kept alive with a Lease and status heartbeats so the node lifecycle controller leaves it
alone), watches the pods the scheduler binds to it and, for each one, runs the FIRST
container's `command` + `args` as a local subprocess:

* the image is ignored; PATH puts this Python's bin dir (the project venv) first, so
  `importwaves worker ...` or `python -m ...` resolve;
* the env is built like the kubelet does: `envFrom` (secretRef/configMapRef, with prefix),
  then `env` (value with $(VAR) expansion, valueFrom secretKeyRef/configMapKeyRef/fieldRef/
  resourceFieldRef); `$(VAR)` in command/args is expanded too;
* a missing non-optional Secret/ConfigMap keeps the pod Pending with
  `CreateContainerConfigError`, retried every second, as the kubelet does;
* an image name that is not a valid reference (`valid_image_reference`, Docker's grammar) keeps
  the pod Pending with `InvalidImageName` and the kubelet's message until it is deleted, as the
  kubelet does before it looks for the image (both modes; process mode ignores the image
  otherwise);
* the working directory is `workingDir` if set, else a fresh per-pod directory
  (`LocalKubelet.pod_dir(ns, name)`), which also holds `<container>.log` (stdout+stderr);
* it patches pod status Pending -> Running -> Succeeded/Failed with containerStatuses
  (`terminated.exitCode`, reason Completed/Error), so the real Job controller counts the pod;
  restartPolicy OnFailure/Always restarts the process in place (restartCount, lastState);
* pod deletion is honoured: SIGTERM to the process group, SIGKILL after the grace period,
  terminal status, then the final `delete(gracePeriodSeconds=0)` that a kubelet issues.

Not supported (documented limits): init/sidecar/other containers, probes, volumes (no
projected service-account token, so in-cluster client config does not work), `kubectl logs`
and `kubectl exec` (no kubelet server), resource limits (nothing is enforced).

Container mode (`LocalKubelet(..., runtime="podman")`): each pod's first container runs as a
podman container (runc, host networking) from its image, with its security context, volumes and
a ServiceAccount token from a TokenRequest; what it honours and refuses is listed in
tests/e2e/harness/podmanpods.py. A pod whose settings cannot be honoured fails (phase Failed)
with the kubelet's reason and message in its container's terminated state (e.g.
`CreateContainerConfigError: container has runAsNonRoot and image will run as root ...`); a
real kubelet would keep such a pod Pending and retry; here only a missing Secret/ConfigMap is
retried. The termination message (terminationMessagePath) is reported on exit.

Both modes: with `terminationMessagePolicy: FallbackToLogsOnError` a failed container without a
termination message reports the tail of its log (80 lines, 2048 bytes) as the kubelet does; a
pod start latency (`start_latency`, or $LOCALKUBELET_START_LATENCY; default 0) keeps each pod
Pending/ContainerCreating that long before its container first starts, as a real node's
sandbox and image set-up does.

Run it in-process (`LocalKubelet(...).start()`, as the e2e fixture does) or standalone:
`python tests/e2e/harness/localkubelet.py --kubeconfig PATH`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:  # a package import in the tests; a plain one when run as a script
    from .podmanpods import PODMAN, PodConfigError, PodmanRuntime, Prepared, container_name, podman
except ImportError:  # pragma: no cover
    from podmanpods import (  # type: ignore[no-redef]
        PODMAN,
        PodConfigError,
        PodmanRuntime,
        Prepared,
        container_name,
        podman,
    )

log = logging.getLogger("localkubelet")

NODE_NAME = "importwaves-local"
NODE_LABEL = "importwaves.io/local-kubelet"
SMP = "application/strategic-merge-patch+json"
LEASE_DURATION_S = 40
POD_IP = "127.0.0.1"
START_LATENCY_ENV = "LOCALKUBELET_START_LATENCY"
#: A failed container's log tail used as its termination message (FallbackToLogsOnError): the
#: kubelet's limits, 80 lines and 2048 bytes.
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
#: Docker's image reference grammar (distribution/reference), as the kubelet parses it: an
#: optional domain (with port), lowercase path components, an optional tag and digest.
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?/)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_REF = re.compile(
    rf"{_DOMAIN}{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


def valid_image_reference(image: str) -> bool:
    """True when `image` parses as an image reference (else the kubelet's InvalidImageName)."""
    return len(image) <= 255 and _IMAGE_REF.fullmatch(image) is not None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known vars are substituted, `$$` is a literal `$`,
    unknown references are left untouched."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_REF.sub(repl, value)


_SUFFIX = {
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "": 1.0,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def parse_quantity(q: str | int | float) -> float:
    """A resource.Quantity as a float (enough for resourceFieldRef)."""
    if isinstance(q, int | float):
        return float(q)
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", q.strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"bad quantity {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def wait_node_ready(core: Any, name: str, timeout: float) -> None:
    """Wait until node `name` is Ready and carries no node.kubernetes.io/* taint."""
    deadline = time.monotonic() + timeout
    last = "not found"
    while time.monotonic() < deadline:
        try:
            node = core.read_node(name)
        except Exception as exc:  # still being created
            last = repr(exc)
        else:
            ready = any(
                c.type == "Ready" and c.status == "True" for c in (node.status.conditions or [])
            )
            bad = [
                t.key for t in (node.spec.taints or []) if t.key.startswith("node.kubernetes.io/")
            ]
            if ready and not bad:
                return
            last = f"ready={ready} taints={bad}"
        time.sleep(0.5)
    raise TimeoutError(f"node {name} not ready after {timeout}s: {last}")


class ConfigError(Exception):
    """The pod's env cannot be built (yet): kubelet's CreateContainerConfigError."""


class LocalKubelet:
    """See the module docstring. `api_factory()` must return a new kubernetes ApiClient."""

    def __init__(
        self,
        api_factory: Callable[[], Any],
        root_dir: Path,
        *,
        node_name: str = NODE_NAME,
        kubelet_version: str = "v0.0.0",
        path_prefix: list[str] | None = None,
        heartbeat_interval: float = 10.0,
        capacity: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        runtime: str = "process",
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        start_latency: float | None = None,
    ) -> None:
        from kubernetes import client

        self._client_mod = client
        self.api_factory = api_factory
        self.root_dir = Path(root_dir)
        self.node_name = node_name
        self.kubelet_version = kubelet_version
        self.path_prefix = (
            path_prefix if path_prefix is not None else [str(Path(sys.prefix) / "bin")]
        )
        self.heartbeat_interval = heartbeat_interval
        #: Extra node labels and taints (e.g. to keep a container node for the pods that ask).
        self.labels = dict(labels or {})
        self.taints = list(taints or [])
        #: Added to every pod's environment (the pod's own env wins), e.g. for coverage.
        self.extra_env = dict(extra_env or {})
        #: Seconds a pod waits (Pending, ContainerCreating) before its container first starts:
        #: what a real node spends on the sandbox and a cached image. Default
        #: $LOCALKUBELET_START_LATENCY or 0 (functional tests); the benchmark uses 2 s. Read at
        #: each pod's start, so a test may change it on a running kubelet.
        self.start_latency = (
            float(os.environ.get(START_LATENCY_ENV, "0") or 0)
            if start_latency is None
            else float(start_latency)
        )
        self.capacity = capacity or {
            "cpu": "64",
            "memory": "256Gi",
            "pods": "250",
            "ephemeral-storage": "1Ti",
        }
        self._api = api_factory()
        self.core = client.CoreV1Api(self._api)
        self.coordination = client.CoordinationV1Api(self._api)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._runners: dict[str, _PodRunner] = {}
        self._threads: list[threading.Thread] = []
        self._watch: Any = None
        self._node_uid: str | None = None
        #: Container mode (runtime="podman"): see tests/e2e/harness/podmanpods.py.
        self.podman: PodmanRuntime | None = None
        if runtime == "podman":
            self.podman = PodmanRuntime(self.core, self._api.configuration.host, self.root_dir)
        elif runtime != "process":
            raise ValueError(f"runtime {runtime!r}: process or podman")

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, ready_timeout: float = 60.0) -> LocalKubelet:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self._register_node()
        self._renew_lease()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "watch")):
            t = threading.Thread(target=target, name=f"localkubelet-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        wait_node_ready(self.core, self.node_name, timeout=ready_timeout)
        log.info("local kubelet %s ready", self.node_name)
        return self

    def stop(self, delete_node: bool = True) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        with self._lock:
            runners = list(self._runners.values())
        for r in runners:
            r.kill(grace=2.0)
        for r in runners:
            r.join(timeout=10)
        for t in self._threads:
            t.join(timeout=10)
        if delete_node:
            with contextlib.suppress(Exception):
                self.core.delete_node(self.node_name)
        self._api.close()

    def __enter__(self) -> LocalKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- public helpers --------------------------------------------------------------

    def pod_dir(self, namespace: str, name: str) -> Path:
        """Default working directory of a pod's process; also holds `<container>.log`."""
        return self.root_dir / "pods" / namespace / name

    def pod_log(self, namespace: str, name: str) -> str:
        """stdout+stderr of the pod's first container (all restarts), '' if none yet."""
        d = self.pod_dir(namespace, name)
        logs = sorted(d.glob("*.log")) if d.is_dir() else []
        return "".join(p.read_text(errors="replace") for p in logs)

    # ---- node ------------------------------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        now = _now()
        conds = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True", "KubeletReady"),
        ]
        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": "local kubelet (importwaves e2e)",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, s, r in conds
            ],
            "addresses": [
                {"type": "InternalIP", "address": POD_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "machineID": "importwaves-local",
                "systemUUID": "importwaves-local",
                "bootID": str(os.getpid()),
                "kernelVersion": os.uname().release,
                "osImage": "local containers" if self.podman else "local processes",
                "containerRuntimeVersion": (
                    "podman://runc" if self.podman else "local://importwaves"
                ),
                "kubeletVersion": self.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    NODE_LABEL: "true",
                    **self.labels,
                },
            },
            "spec": {"taints": self.taints} if self.taints else {},
            "status": self._node_status(),
        }
        try:
            node = self.core.create_node(body)
        except self._client_mod.ApiException as exc:
            if exc.status != 409:
                raise
            node = self.core.read_node(self.node_name)
        self._node_uid = node.metadata.uid
        # Status on create is kept for nodes, but make sure (and refresh a leftover node).
        self.core.patch_node_status(
            self.node_name, {"status": self._node_status()}, _content_type=SMP
        )

    def _renew_lease(self) -> None:
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": _now_micro(),
        }
        try:
            self.coordination.patch_namespaced_lease(
                self.node_name, "kube-node-lease", {"spec": spec}, _content_type=SMP
            )
        except self._client_mod.ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(
                "kube-node-lease",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.node_name,
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": self.node_name,
                                "uid": self._node_uid,
                            }
                        ],
                    },
                    "spec": spec,
                },
            )

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self._renew_lease()
                now = _now()
                self.core.patch_node_status(
                    self.node_name,
                    {
                        "status": {
                            "conditions": [
                                {"type": t, "lastHeartbeatTime": now}
                                for t in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")
                            ]
                        }
                    },
                    _content_type=SMP,
                )
            except Exception:
                if not self._stop.is_set():
                    log.exception("heartbeat failed")

    # ---- pods ------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        from kubernetes import watch

        selector = f"spec.nodeName={self.node_name}"
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    pods = self.core.list_pod_for_all_namespaces(field_selector=selector)
                    rv = pods.metadata.resource_version
                    seen = set()
                    for p in pods.items:
                        d = self._api.sanitize_for_serialization(p)
                        seen.add(d["metadata"]["uid"])
                        self._on_pod("SYNC", d)
                    with self._lock:
                        gone = [u for u in self._runners if u not in seen]
                    for uid in gone:
                        self._forget(uid)
                self._watch = watch.Watch()
                for ev in self._watch.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=60,
                    deserialize=False,
                ):
                    if self._stop.is_set():
                        break
                    obj = ev["object"]
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._on_pod(ev["type"], obj)
            except self._client_mod.ApiException as exc:
                if exc.status == 410:
                    rv = None  # expired: relist
                    continue
                if not self._stop.is_set():
                    log.warning("pod watch failed: %s", exc)
                    rv = None
                    time.sleep(1)
            except Exception:
                if not self._stop.is_set():
                    log.exception("pod watch failed")
                    rv = None
                    time.sleep(1)

    def _forget(self, uid: str) -> None:
        with self._lock:
            runner = self._runners.pop(uid, None)
        if runner:
            runner.kill(grace=0)

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if kind == "DELETED":
            self._forget(uid)
            return
        with self._lock:
            runner = self._runners.get(uid)
            if meta.get("deletionTimestamp"):
                if runner is not None and runner.request_delete(
                    meta.get("deletionGracePeriodSeconds")
                ):
                    return
            elif runner is not None or pod.get("status", {}).get("phase", "Pending") != "Pending":
                return
            else:
                runner = _PodRunner(self, pod)
                self._runners[uid] = runner
                runner.start()
                return
        # Deleted before it ever ran (or after it finished and we forgot it): finish deletion.
        self._final_delete(meta["namespace"], meta["name"], uid)

    def _final_delete(self, namespace: str, name: str, uid: str) -> None:
        with contextlib.suppress(self._client_mod.ApiException):
            self.core.delete_namespaced_pod(
                name,
                namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
            )

    # env --------------------------------------------------------------------------------

    def build_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """The container env as the kubelet would build it (raises ConfigError)."""
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                data = self._secret(ns, src["secretRef"])
            elif "configMapRef" in src:
                data = self._configmap(ns, src["configMapRef"])
            else:
                continue
            for k, v in (data or {}).items():
                env[prefix + k] = v
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            value = self._value_from(pod, container, var["valueFrom"])
            if value is not None:
                env[name] = value
        return env

    def _secret(self, ns: str, ref: dict[str, Any]) -> dict[str, str] | None:
        try:
            s = self.core.read_namespaced_secret(ref["name"], ns)
        except self._client_mod.ApiException as exc:
            if exc.status == 404 and ref.get("optional"):
                return None
            raise ConfigError(f'secret "{ref["name"]}" not found') from exc
        out = {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}
        out.update(s.string_data or {})
        return out

    def _configmap(self, ns: str, ref: dict[str, Any]) -> dict[str, str] | None:
        try:
            cm = self.core.read_namespaced_config_map(ref["name"], ns)
        except self._client_mod.ApiException as exc:
            if exc.status == 404 and ref.get("optional"):
                return None
            raise ConfigError(f'configmap "{ref["name"]}" not found') from exc
        out = dict(cm.data or {})
        for k, v in (cm.binary_data or {}).items():
            out[k] = base64.b64decode(v).decode(errors="replace")
        return out

    def _value_from(
        self, pod: dict[str, Any], container: dict[str, Any], vf: dict[str, Any]
    ) -> str | None:
        ns = pod["metadata"]["namespace"]
        for kind, getter in (("secretKeyRef", self._secret), ("configMapKeyRef", self._configmap)):
            if kind in vf:
                ref = vf[kind]
                data = getter(ns, ref)
                if data is None:
                    return None
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
                return data[ref["key"]]
        if "fieldRef" in vf:
            return self._field_ref(pod, vf["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in vf:
            return self._resource_field_ref(container, vf["resourceFieldRef"])
        raise ConfigError(f"unsupported valueFrom {sorted(vf)}")

    def _field_ref(self, pod: dict[str, Any], path: str) -> str:
        meta, spec = pod["metadata"], pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        simple = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"),
            "spec.nodeName": spec.get("nodeName") or self.node_name,
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.hostIP": POD_IP,
            "status.hostIPs": POD_IP,
            "status.podIP": POD_IP,
            "status.podIPs": POD_IP,
        }
        if path not in simple:
            raise ConfigError(f"unsupported fieldRef {path}")
        return str(simple[path] or "")

    def _resource_field_ref(self, container: dict[str, Any], ref: dict[str, Any]) -> str:
        res = ref["resource"]  # e.g. limits.cpu, requests.memory
        section, _, name = res.partition(".")
        resources = container.get("resources") or {}
        raw = (resources.get(section) or {}).get(name)
        if raw is None and section == "requests":
            raw = (resources.get("limits") or {}).get(name)
        if raw is None:  # limits default to node allocatable, requests to 0
            raw = self.capacity.get(name, "0") if section == "limits" else "0"
        divisor = parse_quantity(ref.get("divisor", "1") or "1")
        value = parse_quantity(raw) / divisor
        return str(math.ceil(value))

    def base_env(self, pod: dict[str, Any]) -> dict[str, str]:
        path = os.pathsep.join([*self.path_prefix, os.environ.get("PATH", "/usr/bin:/bin")])
        out = {"PATH": path, "HOSTNAME": pod["metadata"]["name"]}
        for k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "TZ"):
            if k in os.environ:
                out[k] = os.environ[k]
        out.update(self.extra_env)
        return out


class _PodRunner(threading.Thread):
    """Runs one pod's first container as a local process and reports its status."""

    def __init__(self, kubelet: LocalKubelet, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.pod = pod
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        spec = pod["spec"]
        self.container: dict[str, Any] = spec["containers"][0]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.grace: float = float(spec.get("terminationGracePeriodSeconds", 30))
        self.proc: subprocess.Popen[bytes] | None = None
        self._deleting = threading.Event()
        self._killed = threading.Event()
        self._cond = threading.Condition()
        self._done = False
        self._done_lock = threading.Lock()
        self._last_waiting: str | None = None
        self.restart_count = 0
        self.last_state: dict[str, Any] | None = None
        self.start_time = _now()
        self.container_id = ""
        self.image_id = ""
        self.cname = ""  # the podman container's name (container mode)

    # control (called from other threads) -----------------------------------------------

    def request_delete(self, grace: float | None) -> bool:
        """Stop the pod for deletion; False if the runner is done (caller deletes)."""
        with self._done_lock:
            if self._done:
                return False
            if grace is not None:
                self.grace = min(self.grace, float(grace))
            self._deleting.set()
        self._signal_stop()
        return True

    def kill(self, grace: float) -> None:
        """Pod gone or kubelet stopping: stop the process, report nothing more."""
        self.grace = min(self.grace, grace)
        self._killed.set()
        self._signal_stop()

    def _signal_stop(self) -> None:
        with self._cond:
            self._cond.notify_all()
        proc = self.proc
        if self.cname:
            return  # container mode: _wait_container stops the container
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def _stopping(self) -> bool:
        return self._deleting.is_set() or self._killed.is_set()

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            if not self._stopping():
                self._cond.wait(seconds)

    # the pod's life ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: runner crashed", self.ns, self.pod_name)
            with contextlib.suppress(Exception):
                self._patch_terminal(137, "LocalKubeletError", failed=True)
        finally:
            with self._done_lock:
                self._done = True
                delete = self._deleting.is_set() and not self._killed.is_set()
            if delete:
                self.kubelet._final_delete(self.ns, self.pod_name, self.uid)

    def _run(self) -> None:
        kl = self.kubelet
        workdir = kl.pod_dir(self.ns, self.pod_name)
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        image = str(self.container.get("image") or "")
        if image and not valid_image_reference(image):
            # the kubelet's first step: the pod stays Pending with this until it is deleted
            self._patch_waiting(
                "InvalidImageName",
                f'Failed to apply default image tag "{image}": couldn\'t parse image name '
                f'"{image}": invalid reference format',
            )
            while not self._stopping():
                self._sleep(5.0)
            self._patch_terminal(None, "ContainerCreating", failed=True)
            return
        # Build the env, waiting for missing Secrets/ConfigMaps like the kubelet does.
        while True:
            try:
                env = kl.build_env(self.pod, self.container)
                break
            except ConfigError as exc:
                self._patch_waiting("CreateContainerConfigError", str(exc))
                self._sleep(1.0)
                if self._stopping():
                    self._patch_terminal(None, "ContainerCreating", failed=True)
                    return
        latency = kl.start_latency
        if latency > 0:
            self._patch_waiting("ContainerCreating", "")
            self._sleep(latency)
            if self._stopping():
                self._patch_terminal(None, "ContainerCreating", failed=True)
                return
        if kl.podman is not None:
            self._run_container(env, workdir)
            return
        full_env = {**kl.base_env(self.pod), **env}
        argv = [expand(a, env) for a in (self.container.get("command") or [])]
        argv += [expand(a, env) for a in (self.container.get("args") or [])]
        if not argv:
            self._patch_waiting(
                "CreateContainerError",
                "local kubelet needs an explicit command (image entrypoints are unknown)",
            )
            self._patch_terminal(128, "ContainerCannotRun", failed=True)
            return
        cwd = self.container.get("workingDir") or str(workdir)
        log_path = workdir / f"{self.container['name']}.log"
        while True:
            started = _now()
            with log_path.open("ab") as out:
                try:
                    self.proc = subprocess.Popen(
                        argv,
                        env=full_env,
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as exc:
                    out.write(f"local kubelet: cannot start {argv}: {exc}\n".encode())
                    self._patch_terminal(128, "StartError", failed=True, message=str(exc))
                    return
            if self._stopping():
                self._signal_stop()
            self._patch_running(started)
            rc = self._wait()
            finished = _now()
            if self._killed.is_set():
                return
            if not self._restart_after(rc, started, finished, self._fallback_message(rc, log_path)):
                return

    def _run_container(self, env: dict[str, str], workdir: Path) -> None:
        kl = self.kubelet
        assert kl.podman is not None
        self.cname = container_name(self.pod, self.container)
        log_path = workdir / f"{self.container['name']}.log"
        while True:
            podman("rm", "--force", "--ignore", self.cname, check=False)
            try:
                prep = kl.podman.prepare(
                    self.pod,
                    self.container,
                    env,
                    workdir,
                    self.cname,
                    lambda a: expand(a, env),
                )
            except PodConfigError as exc:
                self._patch_waiting(exc.reason, exc.message)
                if exc.retry and not self._stopping():
                    self._sleep(1.0)
                    if not self._stopping():
                        continue
                log.info("pod %s/%s: %s", self.ns, self.pod_name, exc)
                self._patch_terminal(128, exc.reason, failed=True, message=exc.message)
                return
            self.image_id = prep.image_id
            proc_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **prep.env}
            created = subprocess.run(
                [*PODMAN, *prep.argv],
                env=proc_env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if created.returncode != 0:
                msg = created.stderr.strip()[-1000:]
                self._patch_waiting("CreateContainerError", msg)
                self._patch_terminal(128, "CreateContainerError", failed=True, message=msg)
                return
            self.container_id = created.stdout.strip()
            started = _now()
            with log_path.open("ab") as out:
                self.proc = subprocess.Popen(
                    [*PODMAN, "start", "--attach", self.cname],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._patch_running(started)
            rc, message = self._wait_container(prep, log_path)
            podman("rm", "--force", "--ignore", self.cname, check=False)
            finished = _now()
            if self._killed.is_set():
                return
            if not self._restart_after(rc, started, finished, message):
                return

    def _restart_after(self, rc: int, started: str, finished: str, message: str) -> bool:
        """A container ended with `rc`: record its end and return False, or (restartPolicy says
        so and the pod is not being deleted) keep it as lastState, wait the restart back-off
        and return True to start it again (False when the pod stopped meanwhile)."""
        reason = "Completed" if rc == 0 else "Error"
        restart = self.restart_policy == "Always" or (
            self.restart_policy == "OnFailure" and rc != 0
        )
        if self._deleting.is_set() or not restart:
            self._patch_terminal(
                rc, reason, failed=rc != 0, started=started, message=message or None
            )
            return False
        self.last_state = {
            "terminated": {
                "exitCode": rc,
                "reason": reason,
                "startedAt": started,
                "finishedAt": finished,
                **({"message": message} if message else {}),
            }
        }
        self.restart_count += 1
        self._sleep(min(10.0, 0.5 * 2 ** (self.restart_count - 1)))
        return not self._stopping()

    def _fallback_message(self, rc: int, log_path: Path) -> str:
        """Process mode has no terminationMessagePath file: with FallbackToLogsOnError, a failed
        container's message is the tail of its log (this run's output included), as the
        kubelet's."""
        if rc == 0 or self.container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return ""
        try:
            lines = log_path.read_text(errors="replace").splitlines()[-FALLBACK_LINES:]
        except OSError:
            return ""
        return "\n".join(lines)[-FALLBACK_BYTES:].strip()

    def _wait_container(self, prep: Prepared, log_path: Path) -> tuple[int, str]:
        """Wait for `podman start --attach` to end (stopping the container, with the pod's grace
        period, when the pod is deleted); return the exit code and the termination message."""
        assert self.proc is not None
        stopping: threading.Thread | None = None
        while True:
            try:
                self.proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if self._stopping() and stopping is None:
                    stopping = threading.Thread(
                        target=podman,
                        args=("stop", "--time", str(int(self.grace)), self.cname),
                        kwargs={"check": False, "timeout": self.grace + 60},
                        daemon=True,
                    )
                    stopping.start()
        state = podman(
            "inspect", "--format", "{{.State.ExitCode}}", self.cname, check=False
        ).stdout.strip()
        rc = int(state) if state.lstrip("-").isdigit() else 128 + 9
        message = prep.termination_file.read_text(errors="replace")[:4096].strip()
        if not message and rc != 0 and prep.termination_policy == "FallbackToLogsOnError":
            lines = log_path.read_text(errors="replace").splitlines()[-FALLBACK_LINES:]
            message = "\n".join(lines)[-FALLBACK_BYTES:]
        return rc, message

    def _wait(self) -> int:
        assert self.proc is not None
        proc = self.proc
        deadline: float | None = None
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if self._stopping():
                    if deadline is None:
                        deadline = time.monotonic() + self.grace
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGTERM)
                    elif time.monotonic() >= deadline:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
        # Reap stragglers of the process group (e.g. backgrounded children of `sh -c`).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        # Popen's negative return codes mean "killed by signal N": report 128+N as runc does.
        return 128 - rc if rc < 0 else rc

    # status ---------------------------------------------------------------------------

    def _container_status(self, state: dict[str, Any], ready: bool) -> Any:
        c = self.container
        st: dict[str, Any] = {
            "name": c["name"],
            "image": c.get("image", "local"),
            "imageID": self.image_id,
            "containerID": (
                f"podman://{self.container_id}"
                if self.container_id
                else f"local://{self.proc.pid if self.proc else 0}"
            ),
            "ready": ready,
            "started": "running" in state,
            "restartCount": self.restart_count,
            "state": state,
        }
        if self.last_state:
            st["lastState"] = self.last_state
        return st

    def _conditions(self, ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
        now = _now()
        out = []
        for t, ok in (
            ("PodReadyToStartContainers", True),
            ("Initialized", True),
            ("ContainersReady", ready),
            ("Ready", ready),
        ):
            c: dict[str, Any] = {
                "type": t,
                "status": "True" if ok else "False",
                "lastTransitionTime": now,
                "lastProbeTime": None,
            }
            if not ok and reason:
                c["reason"] = reason
            out.append(c)
        return out

    def _patch(self, status: dict[str, Any]) -> None:
        status.setdefault("hostIP", POD_IP)
        status.setdefault("hostIPs", [{"ip": POD_IP}])
        status.setdefault("startTime", self.start_time)
        # Replace (not merge) the container statuses: a merged state would keep the previous
        # `running` next to the new `terminated`. Conditions merge by type (others' stay).
        if "containerStatuses" in status:
            status["containerStatuses"] = [*status["containerStatuses"], {"$patch": "replace"}]
        try:
            self.kubelet.core.patch_namespaced_pod_status(
                self.pod_name,
                self.ns,
                {"metadata": {"uid": self.uid}, "status": status},
                _content_type=SMP,
            )
        except self.kubelet._client_mod.ApiException as exc:
            if exc.status not in (404, 409, 422):
                raise
            log.debug("pod %s/%s status patch: %s", self.ns, self.pod_name, exc.reason)

    def _patch_waiting(self, reason: str, message: str) -> None:
        if self._last_waiting == reason + message:
            return
        self._last_waiting = reason + message
        self._patch(
            {
                "phase": "Pending",
                "conditions": self._conditions(False, "ContainersNotReady"),
                "containerStatuses": [
                    self._container_status(
                        {"waiting": {"reason": reason, "message": message}}, ready=False
                    )
                ],
            }
        )

    def _patch_running(self, started: str) -> None:
        self._patch(
            {
                "phase": "Running",
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "conditions": self._conditions(True),
                "containerStatuses": [
                    self._container_status({"running": {"startedAt": started}}, True)
                ],
            }
        )

    def _patch_terminal(
        self,
        rc: int | None,
        reason: str,
        failed: bool,
        started: str | None = None,
        message: str | None = None,
    ) -> None:
        now = _now()
        term: dict[str, Any] = {
            "exitCode": 137 if rc is None else rc,
            "reason": reason,
            "startedAt": started or now,
            "finishedAt": now,
        }
        if message:
            term["message"] = message
        self._patch(
            {
                "phase": "Failed" if failed else "Succeeded",
                "conditions": self._conditions(False, "PodCompleted"),
                "containerStatuses": [self._container_status({"terminated": term}, False)],
            }
        )


def main() -> None:  # pragma: no cover - manual use
    import argparse

    from kubernetes import config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--root-dir", default="/tmp/importwaves-localkubelet")
    ap.add_argument("--node-name", default=NODE_NAME)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kubelet = LocalKubelet(
        lambda: config.new_client_from_config(config_file=args.kubeconfig),
        Path(args.root_dir),
        node_name=args.node_name,
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        kubelet.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
