"""A real local Kubernetes control plane for the e2e tests, started with `kwokctl`.

The binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm,
kwok, kwokctl) are built from Go modules by `make testbin` (hack/testbin/build.sh) into a
cache directory outside the repo; `testbin_dir()` computes the same path.

`kwokctl create cluster --runtime=binary` is the process manager: it writes the PKI and
kubeconfig, starts every component from our local binaries (symlinked, never downloaded),
waits for readiness, and `kwokctl delete cluster` stops them. Component logs end up in
`<workdir>/clusters/<name>/logs/`.

kwok only manages nodes annotated `kwok.x-k8s.io/node=fake` (kwokctl's binary runtime would
otherwise manage all nodes, including the local kubelet's node). The fake node carries a
NoSchedule taint, so only pods that tolerate it (see `KWOK_TOLERATION`) land there; everything
else is scheduled on the local kubelet's untainted node.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .localkubelet import wait_node_ready

REPO_ROOT = Path(__file__).resolve().parents[3]
TESTBIN_DIR_SCRIPT = REPO_ROOT / "hack" / "testbin" / "bindir.sh"
VERSIONS_FILE = REPO_ROOT / "hack" / "testbin" / "versions.env"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "helm",
    "kwok",
    "kwokctl",
)
BUILD_HINT = (
    "build them with `make testbin` (or `hack/testbin/build.sh`; cold build ~7 min on 2 cores, "
    "needs Go >= 1.26 and the Go module proxy), or point IMPORTWAVES_TESTBIN at a directory "
    "holding them"
)

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_NAME = "kwok-node-0"
KWOK_NODE_LABELS = {"type": "kwok", "kubernetes.io/role": "agent"}
#: A pod spec that tolerates and selects the kwok fake node (its pods are "run" by kwok:
#: Pending -> Running -> Succeeded for Job pods, nothing executes).
KWOK_TOLERATION: dict[str, Any] = {
    "key": KWOK_NODE_ANNOTATION,
    "operator": "Exists",
    "effect": "NoSchedule",
}
KWOK_POD_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [KWOK_TOLERATION],
}


def read_versions() -> dict[str, str]:
    """The pinned versions from hack/testbin/versions.env."""
    out: dict[str, str] = {}
    for raw in VERSIONS_FILE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def testbin_dir() -> Path:
    """Where the test binaries live (same rule as hack/testbin/bindir.sh)."""
    override = os.environ.get("IMPORTWAVES_TESTBIN")
    if override:
        return Path(override)
    out = subprocess.run(
        ["bash", str(TESTBIN_DIR_SCRIPT)], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def missing_binaries(bin_dir: Path) -> list[str]:
    return [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]


class ClusterError(RuntimeError):
    pass


# argv: owner pid, kwok cluster dir, component pids. Exits once the cluster dir is gone
# (normal teardown); kills the components if the owner dies first.
_REAPER = """
import os, signal, sys, time
owner, cluster_dir, pids = int(sys.argv[1]), sys.argv[2], [int(p) for p in sys.argv[3:]]
while os.path.isdir(cluster_dir):
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        break
    time.sleep(1)
"""


@dataclass
class Cluster:
    """One kwokctl-managed cluster. Create with `Cluster.start()`, end with `.stop()`."""

    name: str
    bin_dir: Path
    workdir: Path
    kubeconfig: Path
    kube_version: str
    env: dict[str, str] = field(default_factory=dict)

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        bin_dir: Path,
        workdir: Path | None = None,
        name: str | None = None,
        timeout: float = 120.0,
    ) -> Cluster:
        missing = missing_binaries(bin_dir)
        if missing:
            raise ClusterError(f"missing test binaries in {bin_dir}: {missing}; {BUILD_HINT}")
        versions = read_versions()
        workdir = workdir or Path(tempfile.mkdtemp(prefix="importwaves-e2e-"))
        name = name or f"iw-e2e-{os.getpid()}"
        env = {
            **os.environ,
            # Everything kwokctl writes (cluster dirs, its cache) stays in our temp dir.
            "KWOK_WORKDIR": str(workdir / "kwok"),
            "KWOK_KUBECTL_BINARY": str(bin_dir / "kubectl"),
            # Tells kwokctl which flags the binaries understand (it has no CLI flag for it).
            "KWOK_KUBE_VERSION": f"v{versions['K8S_VERSION']}",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        cluster = cls(
            name=name,
            bin_dir=bin_dir,
            workdir=workdir,
            kubeconfig=workdir / "kubeconfig",
            kube_version=versions["K8S_VERSION"],
            env=env,
        )
        try:
            cluster._create(timeout)
            cluster._start_reaper()
            cluster._add_kwok_node()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _create(self, timeout: float) -> None:
        b = self.bin_dir
        args = [
            str(b / "kwokctl"),
            "create",
            "cluster",
            f"--name={self.name}",
            "--runtime=binary",
            f"--kubeconfig={self.kubeconfig}",
            f"--etcd-binary={b / 'etcd'}",
            f"--kube-apiserver-binary={b / 'kube-apiserver'}",
            f"--kube-controller-manager-binary={b / 'kube-controller-manager'}",
            f"--kube-scheduler-binary={b / 'kube-scheduler'}",
            f"--kwok-controller-binary={b / 'kwok'}",
            # RBAC + default admission plugins (ServiceAccount, ...) as in a real cluster; also
            # gives kube-controller-manager the service-account signing key.
            "--kube-authorization=true",
            "--kube-admission=true",
            f"--config={self._write_kwokctl_config()}",
            f"--wait={int(timeout)}s",
        ]
        proc = subprocess.run(
            args, check=False, env=self.env, capture_output=True, text=True, timeout=timeout + 60
        )
        (self.workdir / "kwokctl-create.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise ClusterError(
                f"kwokctl create cluster failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                f"\ncomponent logs: {self.logs_dir}"
            )

    def _start_reaper(self) -> None:
        """kwokctl daemonizes the components: if this (pytest) process dies without running
        its teardown, a tiny watchdog kills them so no cluster outlives the session."""
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _REAPER,
                str(os.getpid()),
                str(self.workdir / "kwok" / "clusters" / self.name),
                *map(str, self._component_pids()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _write_kwokctl_config(self) -> Path:
        """Options with no CLI flag: listen on loopback only, and keep kwok away from every
        node but the annotated fake ones (the binary runtime defaults to all nodes, which
        would include the local kubelet's node and its pods)."""
        path = self.workdir / "kwokctl-config.yaml"
        path.write_text(
            "apiVersion: config.kwok.x-k8s.io/v1alpha1\n"
            "kind: KwokctlConfiguration\n"
            "options:\n"
            "  bindAddress: 127.0.0.1\n"
            "componentsPatches:\n"
            "- name: kwok-controller\n"
            "  extraArgs:\n"
            "  - key: manage-all-nodes\n"
            '    value: "false"\n'
            "  - key: manage-nodes-with-annotation-selector\n"
            f"    value: {KWOK_NODE_ANNOTATION}=fake\n"
        )
        return path

    def _add_kwok_node(self) -> None:
        from kubernetes import client

        node = client.V1Node(
            metadata=client.V1ObjectMeta(
                name=KWOK_NODE_NAME,
                annotations={KWOK_NODE_ANNOTATION: "fake"},
                labels={**KWOK_NODE_LABELS, "kubernetes.io/hostname": KWOK_NODE_NAME},
            ),
            spec=client.V1NodeSpec(
                taints=[client.V1Taint(key=KWOK_NODE_ANNOTATION, value="fake", effect="NoSchedule")]
            ),
            status=client.V1NodeStatus(
                allocatable={"cpu": "32", "memory": "256Gi", "pods": "110"},
                capacity={"cpu": "32", "memory": "256Gi", "pods": "110"},
            ),
        )
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            core.create_node(node)
            wait_node_ready(core, KWOK_NODE_NAME, timeout=60)

    def stop(self) -> None:
        """Stop every component; idempotent. Removes kwok's cluster dir (logs included:
        call `save_logs` first to keep them); leaves the rest of `self.workdir`."""
        cluster_dir = self.workdir / "kwok" / "clusters" / self.name
        if not cluster_dir.exists():
            return
        pids = self._component_pids()
        proc = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc = subprocess.run(
                [str(self.bin_dir / "kwokctl"), "delete", "cluster", f"--name={self.name}"],
                check=False,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        if proc is not None:
            (self.workdir / "kwokctl-delete.log").write_text(
                f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}"
            )
        # Make sure no component outlives us, whatever kwokctl managed to do.
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _component_pids(self) -> list[int]:
        pids_dir = self.workdir / "kwok" / "clusters" / self.name / "pids"
        out = []
        for pidfile in pids_dir.glob("*.pid") if pids_dir.is_dir() else []:
            with contextlib.suppress(ValueError, OSError):
                out.append(int(pidfile.read_text().strip()))
        return out

    def save_logs(self, dest: Path) -> Path:
        """Copy component logs (and the kwokctl config) to `dest`; return it."""
        dest.mkdir(parents=True, exist_ok=True)
        cluster_dir = self.workdir / "kwok" / "clusters" / self.name
        if self.logs_dir.is_dir():
            shutil.copytree(self.logs_dir, dest / "components", dirs_exist_ok=True)
        for extra in ("kwok.yaml", "kwok.yaml.tmp", "kwokctl.yaml"):
            if (cluster_dir / extra).exists():
                shutil.copy2(cluster_dir / extra, dest / extra)
        create_log = self.workdir / "kwokctl-create.log"
        if create_log.exists():
            shutil.copy2(create_log, dest / create_log.name)
        return dest

    # ---- accessors ----------------------------------------------------------------------

    @property
    def logs_dir(self) -> Path:
        """Component logs (etcd.log, kube-apiserver.log, ...) written by kwokctl."""
        return self.workdir / "kwok" / "clusters" / self.name / "logs"

    def _run(
        self, binary: str, args: tuple[str, ...], check: bool, input: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / binary), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(
            cmd,
            check=False,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                f"stderr:\n{proc.stderr}"
            )
        return proc

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run our kubectl against this cluster (raises ClusterError if check and rc != 0)."""
        return self._run("kubectl", args, check, input, timeout)

    def helm(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run our helm against this cluster (helm's state dirs live in the cluster workdir)."""
        return self._run("helm", args, check, input, timeout)

    def api_client(self) -> Any:
        """A new `kubernetes.client.ApiClient` for this cluster (close it, or use `with`)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def __post_init__(self) -> None:
        helm_home = self.workdir / "helm"
        self.env.setdefault("HELM_CACHE_HOME", str(helm_home / "cache"))
        self.env.setdefault("HELM_CONFIG_HOME", str(helm_home / "config"))
        self.env.setdefault("HELM_DATA_HOME", str(helm_home / "data"))
