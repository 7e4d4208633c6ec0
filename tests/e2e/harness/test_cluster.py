"""The control plane itself: versions, CRDs with the Python client, Jobs and garbage collection.

Jobs here run on the kwok fake node (tolerating its taint): kwok moves their pods
Pending -> Running -> Succeeded; the real kube-controller-manager does the rest.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch
from urllib3.exceptions import ProtocolError

from .cluster import KWOK_NODE_NAME, KWOK_POD_PLACEMENT, Cluster
from .waits import job_condition, wait_for, wait_job_finished

FIXTURES = Path(__file__).parent / "fixtures"
GROUP, VERSION, PLURAL = "e2e.importwaves.io", "v1", "widgets"


def test_versions_are_stamped(k8s_cluster: Cluster, tmp_path: Path) -> None:
    want = f"v{k8s_cluster.kube_version}"
    out = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == want
    assert out["serverVersion"]["gitVersion"] == want
    with k8s_cluster.api_client() as api:
        info = client.VersionApi(api).get_code()
    assert info.git_version == want
    minor = k8s_cluster.kube_version.split(".")[1]
    assert info.minor == minor
    helm = k8s_cluster.helm("version", "--short").stdout
    assert helm.startswith("v3."), helm
    # Offline (helm template), helm reports the kube version stamped at build time (ldflags),
    # not its built-in v1.20: a throwaway chart that prints .Capabilities.KubeVersion.
    chart = tmp_path / "stamp"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: stamp\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stamp\n"
        "data:\n  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    rendered = yaml.safe_load(k8s_cluster.helm("template", "x", str(chart)).stdout)
    assert rendered["data"]["kubeVersion"] == f"v1.{minor}.0", rendered


def test_crd_create_list_watch(k8s_cluster: Cluster, namespace: str) -> None:
    k8s_cluster.kubectl("apply", "-f", str(FIXTURES / "crd.yaml"))
    k8s_cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}"
    )

    def widget(name: str, size: int) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"size": size, "color": "blue"},
        }

    with k8s_cluster.api_client() as api:
        co = client.CustomObjectsApi(api)
        for i in range(2):
            co.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, widget(f"w{i}", i)
            )
        listed = co.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        assert sorted(o["metadata"]["name"] for o in listed["items"]) == ["w0", "w1"]
        # The schema is enforced by the real apiserver.
        try:
            co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("bad", -1))
        except client.ApiException as exc:
            assert exc.status == 422, exc
        else:
            raise AssertionError("a negative size was accepted")

        # Watch from the list's resourceVersion: we must see exactly the later changes.
        events: queue.Queue[tuple[str, str, int]] = queue.Queue()
        w = watch.Watch()
        ready = threading.Event()

        def consume() -> None:
            with k8s_cluster.api_client() as wapi, contextlib.suppress(ProtocolError):
                # (w.stop() shuts the socket down: the stream then ends with ProtocolError.)
                wco = client.CustomObjectsApi(wapi)
                ready.set()
                for ev in w.stream(
                    wco.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=60,
                ):
                    obj = ev["object"]
                    events.put((ev["type"], obj["metadata"]["name"], obj["spec"]["size"]))

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        ready.wait(10)
        co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w2", 2))
        co.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "w0",
            {"spec": {"size": 10}},
            _content_type="application/merge-patch+json",
        )
        co.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1")
        got = [events.get(timeout=30) for _ in range(3)]
        w.stop()
        assert got == [("ADDED", "w2", 2), ("MODIFIED", "w0", 10), ("DELETED", "w1", 1)]

    out = k8s_cluster.kubectl("get", "widgets", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(out) == [f"widget.{GROUP}/w0", f"widget.{GROUP}/w2"]


def _kwok_job(name: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if owner:
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    **KWOK_POD_PLACEMENT,
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "busybox", "command": ["true"]}],
                }
            },
        },
    }


def test_job_completes_and_owner_deletion_garbage_collects(
    k8s_cluster: Cluster, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        owner = core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "owner"}, "data": {"k": "v"}}
        )
        ref = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": owner.metadata.name,
            "uid": owner.metadata.uid,
        }
        batch.create_namespaced_job(namespace, _kwok_job("kwok-job", ref))
        job = wait_job_finished(batch, namespace, "kwok-job")
        assert job_condition(job) == "Complete", job.status
        assert job.status.succeeded == 1
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=kwok-job").items
        assert [p.spec.node_name for p in pods] == [KWOK_NODE_NAME]
        assert pods[0].status.phase == "Succeeded"

        core.delete_namespaced_config_map("owner", namespace)

        def job_and_pods_gone() -> bool:
            jobs = batch.list_namespaced_job(namespace).items
            left = core.list_namespaced_pod(namespace, label_selector="job-name=kwok-job").items
            return not jobs and not left

        wait_for(job_and_pods_gone, timeout=60, what="garbage collection of the job and pod")
