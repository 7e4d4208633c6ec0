"""Issue 13 against the real kube-apiserver: plan-shaping fields are immutable (CEL transition
rules), the generated status schema and printer columns are served, and the operator's Event
poster aggregates repeats into one Event object."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from e2e.harness.cluster import Cluster
from e2e.harness.operatorkit import apply, importjob
from importwaves.k8s.crd import GROUP, PLURAL, VERSION
from importwaves.k8s.events import EventPoster, KubeEvent, ObjectRef

pytestmark = pytest.mark.e2e


def _refused(cluster: Cluster, body: dict[str, Any]) -> str:
    r = cluster.kubectl(
        "apply", "--validate=strict", "-f", "-", input=yaml.safe_dump(body), check=False
    )
    assert r.returncode != 0, f"accepted:\n{r.stdout}"
    return str(r.stderr)


def _delete(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("-n", namespace, "delete", "importjob", name, "--wait=false", check=False)
    cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "importjob",
        name,
        "--type=merge",
        "-p",
        json.dumps({"metadata": {"finalizers": None}}),
        check=False,
    )


def test_record_and_derived_types_are_immutable_once_set(
    k8s_cluster: Cluster, crds: None, namespace: str
) -> None:
    body = importjob("planned", namespace, "acme")
    apply(k8s_cluster, body)
    try:
        batch = copy.deepcopy(body)
        batch["spec"]["recordTypes"][1]["batchSize"] = 7
        err = _refused(k8s_cluster, batch)
        assert "spec.recordTypes" in err and "recordTypes is immutable" in err, err

        added = copy.deepcopy(body)
        added["spec"]["recordTypes"].append({"name": "Extra", "recordTypeId": -99, "batchSize": 10})
        err = _refused(k8s_cluster, added)
        assert "recordTypes is immutable" in err, err

        derived = copy.deepcopy(body)
        derived["spec"]["derivedTypes"][0]["batchSize"] = 3
        err = _refused(k8s_cluster, derived)
        assert "spec.derivedTypes" in err and "derivedTypes is immutable" in err, err

        dropped = copy.deepcopy(body)
        dropped["spec"].pop("derivedTypes")
        err = _refused(k8s_cluster, dropped)
        assert "derivedTypes is immutable" in err, err

        got = json.loads(
            k8s_cluster.kubectl("-n", namespace, "get", "importjob", "planned", "-o", "json").stdout
        )
        assert got["spec"]["recordTypes"] == body["spec"]["recordTypes"]
        # runtime fields still change, and so does the new retry back-off
        body["spec"]["parallelism"] = 7
        body["spec"]["retryBackoff"] = {"baseSeconds": 2, "capSeconds": 30}
        assert apply(k8s_cluster, body, check=False).returncode == 0
        got = json.loads(
            k8s_cluster.kubectl("-n", namespace, "get", "importjob", "planned", "-o", "json").stdout
        )
        assert got["spec"]["retryBackoff"] == {"baseSeconds": 2, "capSeconds": 30}
    finally:
        _delete(k8s_cluster, namespace, "planned")


def test_status_fields_and_printer_columns_are_served(
    k8s_cluster: Cluster, crds: None, namespace: str
) -> None:
    """A status written through the status subresource keeps every modelled field, and
    `kubectl get` shows READY, STATUS, PROGRESS, ACTIVE, FAILED (and -o wide MESSAGE, STARTED,
    DURATION) from it."""
    from kubernetes import client

    from importwaves.engine.model import MAIN, JobStatus, Outcome, Snapshot, WaveState
    from importwaves.k8s.status import JobView, compute_status

    apply(k8s_cluster, importjob("shown", namespace, "acme"))
    try:
        from datetime import UTC, datetime

        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        wave = WaveState(
            1,
            -2,
            "Customer",
            MAIN,
            total=4,
            completed=1,
            processing=2,
            pending=1,
            first_dispatched_at=t0,
            rows_staged=400,
            rows_written=100,
            rows_planned=400,
        )
        snap = Snapshot("j", JobStatus.RUNNING, False, 4, (wave,))
        status = compute_status(
            None,
            generation=1,
            now="2026-01-01T00:00:05Z",
            view=JobView("j", snap, Outcome.IN_PROGRESS, ""),
            problem=None,
        )
        with k8s_cluster.api_client() as api:
            client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                "shown",
                {"status": status},
                _content_type="application/merge-patch+json",
            )
        got = json.loads(
            k8s_cluster.kubectl("-n", namespace, "get", "importjob", "shown", "-o", "json").stdout
        )
        assert got["status"] == status  # nothing pruned
        wide = k8s_cluster.kubectl("-n", namespace, "get", "importjob", "shown", "-o", "wide")
        header, row = wide.stdout.splitlines()[:2]
        print(f"\n{wide.stdout}")
        assert header.split()[:9] == [
            "NAME",
            "READY",
            "STATUS",
            "PROGRESS",
            "ACTIVE",
            "FAILED",
            "WAITING",
            "AGE",
            "MESSAGE",
        ]
        assert header.split()[-2:] == ["STARTED", "DURATION"]
        assert row.split()[:6] == ["shown", "False", "Running", "25%", "2", "0"]
        assert "Wave 1 (Customer): 1/4 batch(es) completed, 2 running" in row
        narrow = k8s_cluster.kubectl("-n", namespace, "get", "importjob", "shown").stdout
        assert "MESSAGE" not in narrow.splitlines()[0]
    finally:
        _delete(k8s_cluster, namespace, "shown")


def test_repeated_events_are_one_aggregated_event(k8s_cluster: Cluster, namespace: str) -> None:
    from kubernetes import client

    with k8s_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        poster = EventPoster(core)
        ref = ObjectRef(namespace, "agg", "00000000-0000-0000-0000-000000000001")
        same = KubeEvent("Warning", "BatchFailed", "batch Customer-000001 failed: boom")
        for _ in range(4):
            poster.post(ref, [same])
        poster.post(ref, [KubeEvent("Normal", "WaveDispatched", "dispatched 1 batch(es)")])
        events = core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=agg"
        ).items
        by_reason = {e.reason: e for e in events}
        assert sorted(e.reason for e in events) == ["BatchFailed", "WaveDispatched"]
        failed = by_reason["BatchFailed"]
        assert failed.count == 4
        assert failed.source.component == "importwaves"
        assert failed.reporting_component == "importwaves"
        assert failed.last_timestamp >= failed.first_timestamp
        assert by_reason["WaveDispatched"].count == 1
        # an aggregated Event deleted meanwhile (expired): the next repeat creates a new one
        core.delete_namespaced_event(failed.metadata.name, namespace)
        poster.post(ref, [same])
        again = [
            e
            for e in core.list_namespaced_event(
                namespace, field_selector="involvedObject.name=agg"
            ).items
            if e.reason == "BatchFailed"
        ]
        assert [e.count for e in again] == [1]
