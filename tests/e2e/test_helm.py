"""helm (built from Go modules) against the fixture chart and the real cluster."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from kubernetes import client

from .cluster import Cluster

CHART = Path(__file__).parent / "fixtures" / "chart" / "hello"


def test_helm_lint(k8s_cluster: Cluster) -> None:
    out = k8s_cluster.helm("lint", "--strict", str(CHART)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out


def test_helm_template(k8s_cluster: Cluster) -> None:
    out = k8s_cluster.helm(
        "template", "demo", str(CHART), "--set", "greeting=hi", "--set", "replicas=3"
    ).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    assert set(docs) == {"ConfigMap", "ServiceAccount"}
    data = docs["ConfigMap"]["data"]
    assert docs["ConfigMap"]["metadata"]["name"] == "demo-hello"
    assert data["greeting"] == "hi"
    assert [data[f"item-{i}"] for i in range(3)] == ["hi-0", "hi-1", "hi-2"]
    # Offline, helm reports the kube version stamped at build time (ldflags), not v1.20.
    minor = k8s_cluster.kube_version.split(".")[1]
    assert data["kubeVersion"] == f"v1.{minor}.0", data["kubeVersion"]


def test_helm_install_upgrade_uninstall(k8s_cluster: Cluster, namespace: str) -> None:
    k8s_cluster.helm("install", "demo", str(CHART), "-n", namespace, "--wait", "--timeout", "60s")
    with k8s_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        cm = core.read_namespaced_config_map("demo-hello", namespace)
        assert cm.data["greeting"] == "hello"
        # Rendered against the live cluster: the server's version.
        assert cm.data["kubeVersion"] == f"v{k8s_cluster.kube_version}"
        core.read_namespaced_service_account("demo-hello", namespace)

        k8s_cluster.helm("upgrade", "demo", str(CHART), "-n", namespace, "--set", "greeting=yo")
        cm = core.read_namespaced_config_map("demo-hello", namespace)
        assert cm.data["greeting"] == "yo"
        releases = json.loads(k8s_cluster.helm("list", "-n", namespace, "-o", "json").stdout)
        assert [(r["name"], r["revision"], r["status"]) for r in releases] == [
            ("demo", "2", "deployed")
        ]

        k8s_cluster.helm("uninstall", "demo", "-n", namespace, "--wait")
        names = [c.metadata.name for c in core.list_namespaced_config_map(namespace).items]
        assert "demo-hello" not in names
