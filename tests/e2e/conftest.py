"""Fixtures for the e2e tier: a real Kubernetes control plane plus a local kubelet.

* `k8s_cluster` (session): a fresh kwokctl cluster from the pinned binaries built by
  `make testbin` (see tests/e2e/harness/cluster.py). Attributes: `.kubeconfig`, `.bin_dir`,
  `.logs_dir`, `.workdir`, `.kube_version`, `.kubectl(*args)`, `.helm(*args)`,
  `.api_client()`. If any test of the session failed, the component logs and the local
  kubelet's pod logs are kept under `.run/e2e-logs/<timestamp>/` (or $IMPORTWAVES_E2E_LOGS).
* `local_kubelet` (session): a `LocalKubelet` on node `importwaves-local` that runs the
  pods scheduled to it as local processes (tests/e2e/harness/localkubelet.py).
* `namespace` (function): a fresh namespace (with its `default` ServiceAccount), deleted
  afterwards.
* `crds` (session): the CRDs of crds/ applied once and Established.
* `operator` (function): a factory `operator(namespace, **env)` starting `importwaves run
  --standalone --namespace NS` as a subprocess (tests/e2e/harness/operatorkit.py); its log goes to
  `<cluster workdir>/operator/<test>.log`, printed when the test fails and kept with the
  cluster logs. At teardown the ImportJobs of its namespaces are deleted while it still runs
  (their kopf finalizers need it), then it is stopped.
* `tenant_db` (function): a factory `tenant_db(name)` creating a migrated
  tenant schema in the session PostgreSQL, dropped afterwards.
* `harness` (function): bounded waits on ImportJobs that fail with `kubectl get -o yaml`,
  events, Jobs, pods, the tenant's batches and the operator log.

Every test under tests/e2e is marked `e2e`. Missing binaries make these tests fail (never
skip) with the command that builds them.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness.cluster import (
    BUILD_HINT,
    REPO_ROOT,
    Cluster,
    missing_binaries,
    testbin_dir,
)
from .harness.localkubelet import LocalKubelet
from .harness.operatorkit import Harness, OperatorProcess, Tenant, wait_for_default_service_account

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents or "k8s_cluster" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's report on the item (fixtures print logs only for failed tests)."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


def _report(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


#: Session-wide objects shared by every directory whose conftest imports these fixtures
#: (tests/e2e and tests/adversarial): a pytest fixture imported into two conftests is two
#: fixtures, and one test session must not start two clusters or two kubelets for one node.
_SHARED: dict[str, Any] = {}


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if "cluster" in _SHARED:
        yield _SHARED["cluster"]
        return
    bin_dir = testbin_dir()
    missing = missing_binaries(bin_dir)
    if missing:
        pytest.fail(
            f"e2e: Kubernetes test binaries missing in {bin_dir}: {', '.join(missing)}. "
            + BUILD_HINT,
            pytrace=False,
        )
    t0 = time.monotonic()
    cluster = Cluster.start(bin_dir)
    _SHARED["cluster"] = cluster
    _report(
        request.config,
        f"\ne2e: cluster {cluster.name} (k8s v{cluster.kube_version}) up in "
        f"{time.monotonic() - t0:.1f}s, kubeconfig {cluster.kubeconfig}",
    )
    try:
        yield cluster
    finally:
        _SHARED.pop("cluster", None)
        failed = request.session.testsfailed > 0
        if failed:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            dest = (
                Path(os.environ.get("IMPORTWAVES_E2E_LOGS", REPO_ROOT / ".run" / "e2e-logs"))
                / stamp
            )
            cluster.save_logs(dest)
            for sub in ("localkubelet", "operator"):
                if (cluster.workdir / sub).is_dir():
                    shutil.copytree(cluster.workdir / sub, dest / sub, dirs_exist_ok=True)
            _report(request.config, f"\ne2e: tests failed; cluster logs kept in {dest}")
        cluster.stop()
        shutil.rmtree(cluster.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def local_kubelet(k8s_cluster: Cluster) -> Iterator[LocalKubelet]:
    if "kubelet" in _SHARED:
        yield _SHARED["kubelet"]
        return
    kubelet = LocalKubelet(
        k8s_cluster.api_client,
        root_dir=k8s_cluster.workdir / "localkubelet",
        kubelet_version=f"v{k8s_cluster.kube_version}",
    ).start()
    _SHARED["kubelet"] = kubelet
    try:
        yield kubelet
    finally:
        _SHARED.pop("kubelet", None)
        kubelet.stop()


@pytest.fixture
def namespace(k8s_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _namespace(k8s_cluster, request)


@pytest.fixture
def other_namespace(k8s_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A second namespace for the same test (a distinct name)."""
    yield from _namespace(k8s_cluster, request)


def _namespace(k8s_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    from kubernetes import client

    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base or 'e2e'}-{uuid.uuid4().hex[:6]}"
    with k8s_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": name, "labels": {"e2e": "true"}}})
        wait_for_default_service_account(core, name)
        try:
            yield name
        finally:
            try:
                core.delete_namespace(name)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture(scope="session")
def crds(k8s_cluster: Cluster) -> None:
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    k8s_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")


def _node_slug(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:80]


@pytest.fixture
def operator(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, crds: None, request: pytest.FixtureRequest
) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(namespace: str | list[str], **env: str) -> OperatorProcess:
        log_path = k8s_cluster.workdir / "operator" / f"{_node_slug(request)}-{len(started)}.log"
        namespaces = [namespace] if isinstance(namespace, str) else list(namespace)
        op = OperatorProcess(k8s_cluster, namespaces, log_path, dict(env))
        started.append(op)
        return op.start()

    yield start
    failed = _failed(request)
    for op in started:
        if op.running:
            for ns in op.namespaces:
                k8s_cluster.kubectl(
                    "-n", ns, "delete", "importjobs", "--all", "--timeout=30s", check=False
                )
        op.stop()
        if failed:
            _report(
                request.config,
                f"\n----- operator log {op.log_path} (last 150 lines) -----\n" + op.log_tail(150),
            )


@pytest.fixture
def tenant_db(pg: Any) -> Iterator[Callable[[str], Tenant]]:
    made: list[Tenant] = []

    def make(name: str) -> Tenant:
        if not pg.running():
            pg.start()
        t = Tenant(pg.dsn(), name).create()
        made.append(t)
        return t

    yield make
    for t in made:
        t.drop()


@pytest.fixture
def harness(k8s_cluster: Cluster) -> Callable[..., Harness]:
    def make(namespace: str, operators: list[OperatorProcess], tenants: list[Tenant]) -> Harness:
        return Harness(k8s_cluster, namespace, operators, tenants)

    return make
