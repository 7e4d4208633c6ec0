"""The Helm chart (charts/importwaves) against the real test cluster.

* lint and the values schema (typos rejected);
* `helm template` for both RBAC modes, validated by the API server (`kubectl apply
  --dry-run=server`), plus what the issue asks of the Deployment, Service and RBAC;
* a namespaced install whose operator runs with the chart's ServiceAccount identity and
  completes the example import; the SA is denied what it should not do; `helm upgrade` with a
  changed value, `helm test`, `helm uninstall`;
* a cluster-wide install: the ClusterRole grants the same and nothing more.

The local kubelet runs the chart's Deployment pod as a local process with the pod's env (the
command and env the chart renders) but mounts no ServiceAccount token, so the test gives the
operator a kubeconfig holding a token of the chart's ServiceAccount (`kubectl create token`)
through `extraEnv`: the operator's API calls are made as that ServiceAccount.

Not validated by the API server: the ServiceMonitor and PrometheusRule (the Prometheus Operator
CRDs are not installed here); their structure and PromQL are checked instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
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

from .harness.cluster import REPO_ROOT, Cluster, ClusterError
from .harness.localkubelet import LocalKubelet

CHART = REPO_ROOT / "charts" / "importwaves"
EXAMPLE = REPO_ROOT / "examples" / "importjob.yaml"
RELEASE = "importwaves"  # the documented release name: resources are named "importwaves"
MONITORING = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.grafanaDashboard.enabled=true",
]
#: What `helm template` needs to render MONITORING without a cluster that has the Prometheus
#: Operator's CRDs (the chart fails without them: test_chart_refuses_with_a_hint).
MONITORING_APIS = [
    "--api-versions",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
]
SEED_METRICS = (
    "importwaves_wave_stuck_detection_total",
    "importwaves_queue_active_jobs",
    "importwaves_wave_dispatch_lag_seconds",
    "importwaves_derived_backlog_batches",
)

#: An HTTP 403 in a log line ("'code': 403}", "403, message='Forbidden'"); not the
#: milliseconds of a timestamp like "05:06:40.403" nor a piece of a uid like "3413b403-77af".
HTTP_403 = re.compile(r"(?<![\w.-])403(?![\w.-])")


# -- helpers ---------------------------------------------------------------------------------
def _uid() -> str:
    return uuid.uuid4().hex[:6]


def _template(cluster: Cluster, namespace: str, *args: str) -> list[dict[str, Any]]:
    out = cluster.helm("template", RELEASE, str(CHART), "-n", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)} objects"
    return found[0]


def _rules(obj: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource, resourceName or '*', verb) for every rule of a (Cluster)Role."""
    return {
        (group, res, name, verb)
        for r in obj["rules"]
        for group in r["apiGroups"]
        for res in r["resources"]
        for name in r.get("resourceNames") or ["*"]
        for verb in r["verbs"]
    }


def _expand(group: str, resources: list[str], verbs: list[str], name: str = "*") -> set[Any]:
    return {(group, r, name, v) for r in resources for v in verbs}


def _namespaced_rules(peering_kind: str, peering_name: str) -> set[Any]:
    return (
        _expand("importwaves.io", ["importjobs"], ["get", "list", "watch", "patch"])
        | _expand("importwaves.io", ["importjobs/status"], ["patch"])
        | _expand("batch", ["jobs"], ["list", "watch", "create", "delete"])
        | _expand("", ["pods"], ["list"])
        | _expand("", ["secrets"], ["get"])
        | _expand("", ["events"], ["create"])
        | _expand("kopf.dev", [peering_kind], ["list", "watch"])
        | _expand("kopf.dev", [peering_kind], ["get", "patch"], name=peering_name)
    )


CRD_DISCOVERY = _expand("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"])
NAMESPACE_DISCOVERY = _expand("", ["namespaces"], ["list", "watch"])


@contextlib.contextmanager
def _namespaces(cluster: Cluster, *names: str) -> Iterator[None]:
    for n in names:
        cluster.kubectl("create", "namespace", n)
    try:
        yield
    finally:
        for n in names:
            cluster.kubectl("delete", "namespace", n, "--wait=false", "--ignore-not-found")


def _can_i(cluster: Cluster, sa: str, *args: str) -> bool:
    proc = cluster.kubectl("auth", "can-i", f"--as={sa}", *args, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {args}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


def _sa_kubeconfig(cluster: Cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig holding a token of ServiceAccount `sa` (what a pod would get mounted)."""
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    ctx = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    server = next(c for c in admin["clusters"] if c["name"] == ctx["context"]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": server["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "test", "user": sa}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def _importjob(namespace: str, tenant: str) -> dict[str, Any]:
    """examples/importjob.yaml in the test's namespace and tenant (the shared test PostgreSQL
    must not collide with other tests' tenants)."""
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"]["namespace"] = namespace
    obj["spec"]["tenant"] = tenant
    obj["spec"]["parallelism"] = 3
    return obj


def _operator_pod(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    pods = json.loads(
        cluster.kubectl(
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator",
            "-o",
            "json",
        ).stdout
    )["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return live[0] if len(live) == 1 else None


def _wait(fn: Any, timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- lint and schema ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "watchNamespaces={imports,imports-b}"],
        # monitoring on fails without the Prometheus Operator's CRDs (helm lint knows only the
        # built-in kinds and takes no --api-versions): rendered with them in
        # test_chart_template_validated_by_api_server
        [
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--set",
            "redis.existingSecret=redis",
            "--set",
            "peering.enabled=false",
            "--set",
            "resources.limits.cpu=1.5",
            "--set",
            "resources.requests.memory=1e3",
        ],
    ],
    ids=["default", "namespaced", "dashboard-secret-quantities"],
)
def test_chart_lint_strict(k8s_cluster: Cluster, values: list[str]) -> None:
    out = k8s_cluster.helm("lint", "--strict", str(CHART), *values).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("replicaCuont=1", "additional properties 'replicaCuont' not allowed"),
        ("operator.timerIntreval=3", "additional properties 'timerIntreval' not allowed"),
        ("replicaCount=2", "/replicaCount"),
        ("redis.url=http://redis:6379/0", "/redis/url"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        ("resources.requests.cpu=-1", "/resources/requests/cpu"),
        ("resources.requests.memory=1 Gi", "/resources/requests/memory"),
        ("watchNamespaces={Bad_NS}", "/watchNamespaces/0"),
        ("operator.logLevel=LOUD", "/operator/logLevel"),
    ],
)
def test_chart_values_schema_rejects(k8s_cluster: Cluster, value: str, error: str) -> None:
    proc = k8s_cluster.helm("template", "x", str(CHART), "--set", value, check=False)
    assert proc.returncode != 0, proc.stdout[:500]
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert error in proc.stderr, proc.stderr


PROMETHEUS_HINT = "install the Prometheus Operator"
SECRET_HINT = "set redis.existingSecret"


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (["metrics.serviceMonitor.enabled=true"], "metrics.serviceMonitor.enabled=true needs"),
        (["metrics.prometheusRule.enabled=true"], "metrics.prometheusRule.enabled=true needs"),
        (["redis.url=redis://:s3cretPw@redis:6379/0"], SECRET_HINT),
        (["redis.url=redis://user:s3cretPw@redis:6379/0"], SECRET_HINT),
        (["redis.url=rediss://redis:6379/0?password=s3cretPw"], SECRET_HINT),
    ],
    ids=["serviceMonitor", "prometheusRule", "redis-password", "redis-user", "redis-query"],
)
def test_chart_refuses_with_a_hint(k8s_cluster: Cluster, values: list[str], says: str) -> None:
    """Values the schema cannot explain fail with what to do: `helm template` (no cluster: no
    Prometheus Operator kinds) and a real `helm install` into the test cluster (which has no
    Prometheus Operator CRDs either); the install leaves no release and no namespace objects,
    and the Redis password is never echoed."""
    sets = [a for v in values for a in ("--set", v)]
    proc = k8s_cluster.helm("template", "x", str(CHART), *sets, check=False)
    assert proc.returncode != 0, proc.stdout[:500]
    assert says in proc.stderr, proc.stderr
    assert "s3cretPw" not in proc.stderr + proc.stdout
    hint = PROMETHEUS_HINT if "metrics." in values[0] else "kubectl create secret generic"
    assert hint in proc.stderr, proc.stderr

    ns = f"iwfail-{_uid()}"
    k8s_cluster.kubectl("create", "namespace", ns)
    try:
        proc = k8s_cluster.helm(
            "install", "iwfail", str(CHART), "-n", ns, *sets, "--timeout=60s", check=False
        )
        assert proc.returncode != 0, proc.stdout[:500]
        assert says in proc.stderr, proc.stderr
        assert "no matches for kind" not in proc.stderr, proc.stderr
        assert "s3cretPw" not in proc.stderr + proc.stdout
        releases = json.loads(k8s_cluster.helm("list", "-n", ns, "-a", "-o", "json").stdout)
        assert releases == [], releases
        left = k8s_cluster.kubectl(
            "get", "deployments,services,serviceaccounts,secrets", "-n", ns, "-o", "name"
        ).stdout.split()
        assert [o for o in left if "iwfail" in o] == [], left
    finally:
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_chart_monitoring_renders_with_the_prometheus_operator_kinds(k8s_cluster: Cluster) -> None:
    """With the kinds known (`--api-versions`, as a cluster with the CRDs reports them), the same
    values render the ServiceMonitor and PrometheusRule."""
    docs = _template(k8s_cluster, "default", *MONITORING, *MONITORING_APIS)
    kinds = sorted(d["kind"] for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/"))
    assert kinds == ["PrometheusRule", "ServiceMonitor"]


# -- rendering, validated by the API server ------------------------------------------------------
def _server_dry_run(cluster: Cluster, docs: list[dict[str, Any]]) -> str:
    body = yaml.safe_dump_all(docs)
    out = cluster.kubectl("apply", "--dry-run=server", "-o", "name", "-f", "-", input=body).stdout
    assert len(out.split()) == len(docs), out
    return out


def test_chart_template_validated_by_api_server(k8s_cluster: Cluster) -> None:
    # The CRDs the templates' KopfPeering objects need (what `helm install` does first).
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    rel, w1, w2 = f"iwt-{_uid()}", f"iwt-a-{_uid()}", f"iwt-b-{_uid()}"
    with _namespaces(k8s_cluster, rel, w1, w2):
        # Cluster-wide (the default values).
        docs = _template(k8s_cluster, rel, "--set", f"peering.name=iwt-{_uid()}")
        _server_dry_run(k8s_cluster, docs)
        kinds = sorted(d["kind"] for d in docs)
        assert kinds == [
            "ClusterKopfPeering",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Pod",  # the helm test hook
            "Service",
            "ServiceAccount",
        ], kinds
        peering = _one(docs, "ClusterKopfPeering")["metadata"]["name"]
        assert _rules(_one(docs, "ClusterRole")) == CRD_DISCOVERY | _namespaced_rules(
            "clusterkopfpeerings", peering
        )
        _check_deployment(docs, watch="")

        # A list of watched namespaces, monitoring on, Redis URL from a Secret.
        docs = _template(
            k8s_cluster,
            rel,
            "--set",
            f"watchNamespaces={{{w1},{w2}}}",
            "--set",
            "redis.existingSecret=redis-url",
            *MONITORING,
            *MONITORING_APIS,
        )
        monitoring = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
        _server_dry_run(k8s_cluster, [d for d in docs if d not in monitoring])
        assert _rules(_one(docs, "ClusterRole")) == CRD_DISCOVERY | NAMESPACE_DISCOVERY
        roles = [d for d in docs if d["kind"] == "Role"]
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted([w1, w2])
        for role in roles:
            assert _rules(role) == _namespaced_rules("kopfpeerings", "importwaves")
        bindings = [d for d in docs if d["kind"] == "RoleBinding"]
        assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted([w1, w2])
        assert all(b["subjects"][0]["namespace"] == rel for b in bindings)
        peerings = [d for d in docs if d["kind"] == "KopfPeering"]
        assert sorted(p["metadata"]["namespace"] for p in peerings) == sorted([w1, w2])
        assert not [d for d in docs if d["kind"] == "ClusterKopfPeering"]
        container = _check_deployment(docs, watch=f"{w1},{w2}")
        redis = next(e for e in container["env"] if e["name"] == "IMPORTWAVES_REDIS_URL")
        assert redis["valueFrom"]["secretKeyRef"] == {"name": "redis-url", "key": "url"}
        _check_monitoring(docs, monitoring)


def _check_deployment(docs: list[dict[str, Any]], watch: str) -> dict[str, Any]:
    dep = _one(docs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert set(c["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    assert c["command"] == ["importwaves"] and c["args"] == ["run"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # Both probes hit kopf's liveness endpoint, on the port the operator is told to serve it.
    assert env["IMPORTWAVES_LIVENESS"] == f"http://0.0.0.0:{ports['health']}/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, c[probe]
    assert env["IMPORTWAVES_METRICS_PORT"] == str(ports["http-metrics"])
    assert env["IMPORTWAVES_NAMESPACES"] == watch
    assert env["IMPORTWAVES_PEERING"] == "importwaves" or env["IMPORTWAVES_PEERING"].startswith(
        "iwt-"
    )
    svc = _one(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http-metrics"
    assert svc["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    # ... and not the `helm test` pod.
    test_pod = _one(docs, "Pod")
    assert not svc["spec"]["selector"].items() <= test_pod["metadata"]["labels"].items()
    return dict(c)


def _check_monitoring(docs: list[dict[str, Any]], monitoring: list[dict[str, Any]]) -> None:
    assert sorted(d["kind"] for d in monitoring) == ["PrometheusRule", "ServiceMonitor"]
    sm = _one(monitoring, "ServiceMonitor")
    svc = _one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    rule = _one(monitoring, "PrometheusRule")
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == {
        "ImportwavesStuckWaves",
        "ImportwavesDerivedBacklogNotDraining",
        "ImportwavesHighDispatchLag",
    }
    for name, r in rules.items():
        promql_parser.parse(r["expr"])  # raises on invalid PromQL
        assert r["labels"]["severity"] and r["annotations"]["summary"], name
    assert "importwaves_wave_stuck_detection_total" in rules["ImportwavesStuckWaves"]["expr"]
    assert (
        "importwaves_derived_backlog_batches"
        in (rules["ImportwavesDerivedBacklogNotDraining"]["expr"])
    )
    assert (
        "importwaves_wave_dispatch_lag_seconds_bucket"
        in (rules["ImportwavesHighDispatchLag"]["expr"])
    )
    dashboard = json.loads(_one(docs, "ConfigMap")["data"]["importwaves.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in SEED_METRICS:
        assert metric in exprs, metric


# -- install, run the example import, upgrade, test, uninstall ----------------------------------
@pytest.fixture
def chart_tenant(dsn: str) -> Iterator[tuple[str, str]]:
    """A tenant schema with the example's staging data (import id demo-import)."""
    tenant = f"chart_{_uid()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.up(conn, tenant)
    with connect(dsn, tenant, autocommit=True) as conn:
        generate(conn, "demo-import", orders=1000)
    try:
        yield dsn, tenant
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tenant)))


def test_chart_install_import_upgrade_test_uninstall(
    k8s_cluster: Cluster,
    local_kubelet: LocalKubelet,
    namespace: str,
    chart_tenant: tuple[str, str],
    tmp_path: Path,
) -> None:
    dsn, tenant = chart_tenant
    kc = k8s_cluster.kubectl
    rel_ns, other = f"iwc-{_uid()}", f"iwc-other-{_uid()}"
    sa = f"system:serviceaccount:{rel_ns}:{RELEASE}"
    health, metrics = free_port(), free_port()
    secret = ("create", "secret", "generic", "demo-tenant-db")
    kc(*secret, f"--from-literal=dsn={dsn}", "-n", namespace)
    installed = False
    try:
        with _namespaces(k8s_cluster, other):
            kc(*secret, "--from-literal=dsn=x", "-n", other)
            # 1. Install, operator parked (replicaCount=0) until its token exists.
            out = k8s_cluster.helm(
                "install",
                RELEASE,
                str(CHART),
                "-n",
                rel_ns,
                "--create-namespace",
                "--set",
                f"watchNamespaces={{{namespace}}}",
                "--set",
                "replicaCount=0",
                "--set",
                "operator.timerInterval=2",
                "--set",
                f"health.port={health}",
                "--set",
                f"metrics.port={metrics}",
                "--set",
                f"tests.metricsUrl=http://127.0.0.1:{metrics}/metrics",
                "--wait",
                "--timeout=60s",
            ).stdout
            installed = True
            assert "STATUS: deployed" in out, out
            assert f"kubectl -n {namespace} create secret generic demo-tenant-db" in out, out
            assert f"set metadata.namespace to\n   {namespace} and" in out, out

            # 2. Least privilege, asked of the API server's authorizer.
            def can(*args: str) -> bool:
                return _can_i(k8s_cluster, sa, *args)

            allowed = [
                ("get", "secrets/demo-tenant-db", "-n", namespace),
                ("create", "jobs.batch", "-n", namespace),
                ("delete", "jobs.batch", "-n", namespace),
                ("watch", "importjobs.importwaves.io", "-n", namespace),
                ("patch", "importjobs.importwaves.io", "--subresource=status", "-n", namespace),
                ("create", "events", "-n", namespace),
                ("list", "pods", "-n", namespace),
                ("patch", "kopfpeerings.kopf.dev/importwaves", "-n", namespace),
                ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
                ("list", "namespaces"),
            ]
            denied = [
                ("get", "secrets/demo-tenant-db", "-n", other),  # not a watched namespace
                ("get", "secrets", "-n", rel_ns),
                ("list", "secrets", "-n", namespace),
                ("watch", "secrets", "-n", namespace),
                ("create", "secrets", "-n", namespace),
                ("create", "pods", "-n", namespace),
                ("delete", "pods", "-n", namespace),
                ("update", "jobs.batch", "-n", namespace),
                ("delete", "importjobs.importwaves.io", "-n", namespace),
                ("create", "importjobs.importwaves.io", "-n", namespace),
                ("list", "importjobs.importwaves.io", "-n", other),
                ("create", "jobs.batch", "-n", other),
                ("patch", "kopfpeerings.kopf.dev/someone-else", "-n", namespace),
                ("patch", "clusterkopfpeerings.kopf.dev/importwaves"),
                ("create", "customresourcedefinitions.apiextensions.k8s.io"),
                ("get", "namespaces", "-n", namespace),
                ("create", "namespaces"),
            ]
            assert [a for a in allowed if not can(*a)] == []
            assert [d for d in denied if can(*d)] == []
            # ... and with a real call made with the ServiceAccount's token.
            sa_kubeconfig = _sa_kubeconfig(k8s_cluster, rel_ns, RELEASE, tmp_path / "sa.yaml")
            as_sa = ("--kubeconfig", str(sa_kubeconfig))
            ok = kc(*as_sa, "get", "secret", "demo-tenant-db", "-n", namespace, "-o", "name")
            assert ok.stdout.strip() == "secret/demo-tenant-db"
            no = kc(*as_sa, "get", "secret", "demo-tenant-db", "-n", other, check=False)
            assert no.returncode != 0 and "Forbidden" in no.stderr, no.stderr
            assert f'User "{sa}" cannot get resource "secrets"' in no.stderr, no.stderr

        # 3. Start the operator: the chart's Deployment, its pod run by the local kubelet with
        #    the chart's command and env, plus a kubeconfig holding the ServiceAccount's token.
        env = json.dumps([{"name": "KUBECONFIG", "value": str(sa_kubeconfig)}])
        k8s_cluster.helm(
            "upgrade",
            RELEASE,
            str(CHART),
            "-n",
            rel_ns,
            "--reuse-values",
            "--set",
            "replicaCount=1",
            "--set-json",
            f"extraEnv={env}",
            "--wait",
            "--timeout=60s",
        )
        pod = _wait(lambda: _operator_pod(k8s_cluster, rel_ns), 30, "the operator pod")
        pod_name = pod["metadata"]["name"]
        penv = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert penv["IMPORTWAVES_NAMESPACES"] == namespace

        # 4. The example import, to the end.
        kc("apply", "-f", "-", input=yaml.safe_dump(_importjob(namespace, tenant)))
        try:
            kc(
                "wait",
                "--for=condition=Completed",
                "importjob/demo-import",
                "-n",
                namespace,
                "--timeout=150s",
                timeout=170,
            )
        except ClusterError as exc:
            obj = kc("get", "importjob", "demo-import", "-n", namespace, "-o", "yaml").stdout
            log = local_kubelet.pod_log(rel_ns, pod_name)[-6000:]
            raise AssertionError(f"{exc}\n{obj}\noperator log (tail):\n{log}") from None
        spec = ImportJobSpec.model_validate(_importjob(namespace, tenant)["spec"]).engine_spec()
        with connect(dsn, tenant) as conn:
            verification = verify_import(conn, "demo-import", spec)
        assert verification.ok, verification.failures()
        log = local_kubelet.pod_log(rel_ns, pod_name)
        # Every API call the operator made was allowed (kopf logs refused ones as 403s or
        # "Not enough permissions").
        refused = [
            line
            for line in log.splitlines()
            if HTTP_403.search(line) or "Forbidden" in line or "permission" in line.lower()
        ]
        assert refused == [], "\n".join(refused[:10])

        # 5. helm upgrade with a changed value: the Deployment is recreated with it and the new
        #    operator pod works (it handles a manual reconcile of the completed import).
        k8s_cluster.helm(
            "upgrade",
            RELEASE,
            str(CHART),
            "-n",
            rel_ns,
            "--reuse-values",
            "--set",
            "operator.logLevel=DEBUG",
            "--wait",
            "--timeout=60s",
        )
        releases = json.loads(k8s_cluster.helm("list", "-n", rel_ns, "-o", "json").stdout)
        assert [(r["name"], r["revision"], r["status"]) for r in releases] == [
            (RELEASE, "3", "deployed")
        ]

        def new_pod() -> dict[str, Any] | None:
            p = _operator_pod(k8s_cluster, rel_ns)
            return p if p and p["metadata"]["name"] != pod_name else None

        pod = _wait(new_pod, 60, "the upgraded operator pod")
        penv = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert penv["IMPORTWAVES_LOG_LEVEL"] == "DEBUG"
        reconcile = str(Path(sys.executable).parent / "importwaves")
        out = _run(
            [reconcile, "reconcile", "--importjob", f"{namespace}/demo-import", "--wait", "60"],
            env={**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)},
        )
        assert "status: Completed" in out, out

        # 6. helm test: the image's CRD is the chart's, the operator serves its metrics.
        out = k8s_cluster.helm("test", RELEASE, "-n", rel_ns, "--timeout=90s").stdout
        assert "Phase:          Succeeded" in out or "Phase: Succeeded" in out, out

        # 7. helm uninstall: everything the chart made is gone but the CRDs and ImportJobs.
        k8s_cluster.helm("uninstall", RELEASE, "-n", rel_ns, "--wait", "--timeout=60s")
        installed = False
        for kind, ns in [
            ("deployment", rel_ns),
            ("serviceaccount", rel_ns),
            ("service", rel_ns),
            ("role", namespace),
            ("rolebinding", namespace),
            ("kopfpeering.kopf.dev", namespace),
            ("clusterrole", ""),
            ("clusterrolebinding", ""),
        ]:
            args = ["get", kind, "-o", "name", "-l", f"app.kubernetes.io/instance={RELEASE}"]
            left = kc(*args, *(["-n", ns] if ns else [])).stdout.split()
            assert left == [], (kind, left)
        kc("get", "crd", "importjobs.importwaves.io")
        kc("get", "importjob", "demo-import", "-n", namespace)
        _wait(lambda: _operator_pod(k8s_cluster, rel_ns) is None, 30, "the operator pod to go")
    finally:
        if installed:
            k8s_cluster.helm("uninstall", RELEASE, "-n", rel_ns, "--wait", check=False)
        # kopf's finalizer (its timer needs one) stays once the operator is gone: drop it.
        kc(
            "patch",
            "importjob",
            "demo-import",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )
        kc("delete", "importjob", "demo-import", "-n", namespace, "--ignore-not-found", check=False)
        kc("delete", "namespace", rel_ns, "--wait=false", "--ignore-not-found", check=False)


def _run(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_chart_cluster_wide_rbac(k8s_cluster: Cluster) -> None:
    """Cluster-wide mode: the same application rules in every namespace, and nothing more."""
    rel_ns, peering = f"iwcw-{_uid()}", f"iwcw-{_uid()}"
    release = "iwcw"
    sa = f"system:serviceaccount:{rel_ns}:{release}-importwaves"
    k8s_cluster.helm(
        "install",
        release,
        str(CHART),
        "-n",
        rel_ns,
        "--create-namespace",
        "--set",
        "replicaCount=0",
        "--set",
        f"peering.name={peering}",
        "--wait",
        "--timeout=60s",
    )
    try:
        k8s_cluster.kubectl("get", "clusterkopfpeering.kopf.dev", peering)
        allowed = [
            ("get", "secrets", "-n", "any-namespace"),
            ("create", "jobs.batch", "-n", "any-namespace"),
            ("patch", "importjobs.importwaves.io", "-n", "any-namespace"),
            ("create", "events", "-n", "kube-system"),
            ("watch", "clusterkopfpeerings.kopf.dev"),
            ("patch", f"clusterkopfpeerings.kopf.dev/{peering}"),
        ]
        denied = [
            ("list", "secrets", "--all-namespaces"),
            ("create", "pods", "-n", "any-namespace"),
            ("delete", "importjobs.importwaves.io", "-n", "any-namespace"),
            ("patch", "clusterkopfpeerings.kopf.dev/importwaves-other"),
            ("patch", "kopfpeerings.kopf.dev", "-n", "any-namespace"),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
            ("list", "namespaces"),
            ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ]
        assert [a for a in allowed if not _can_i(k8s_cluster, sa, *a)] == []
        assert [d for d in denied if _can_i(k8s_cluster, sa, *d)] == []
    finally:
        k8s_cluster.helm("uninstall", release, "-n", rel_ns, "--wait", check=False)
        k8s_cluster.kubectl("delete", "namespace", rel_ns, "--wait=false", check=False)
