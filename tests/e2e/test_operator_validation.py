"""What the API server refuses (OpenAPI schema + CEL from crds/importjob.yaml), with a message
naming the field, and what only the operator can refuse (a dependency cycle: Invalid=True)."""

from __future__ import annotations

import copy
import functools
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from .harness.cluster import Cluster
from .harness.operatorkit import (
    Harness,
    OperatorProcess,
    apply,
    conditions,
    importjob,
    is_true,
)
from .harness.waits import wait_for


def manifest(namespace: str, name: str = "bad") -> dict[str, Any]:
    return importjob(name, namespace, "acme")


def _set(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    *parents, last = path.split(".")
    node: Any = body
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return body


_DELETE = object()

# (id, path to change, value, what stderr must name)
INVALID: list[tuple[str, str, Any, list[str]]] = [
    ("missing-tenant", "spec.tenant", _DELETE, ["spec.tenant", "Required value"]),
    ("missing-database", "spec.database", _DELETE, ["spec.database", "Required value"]),
    ("threshold-0", "spec.completionThreshold", 0, ["spec.completionThreshold", "1"]),
    ("threshold-101", "spec.completionThreshold", 101, ["spec.completionThreshold", "100"]),
    ("batch-size--1", "spec.recordTypes.0.batchSize", -1, ["spec.recordTypes[0].batchSize"]),
    ("parallelism-0", "spec.parallelism", 0, ["spec.parallelism"]),
    ("tenant-pattern", "spec.tenant", "Acme-Corp", ["spec.tenant", "should match"]),
    (
        "reserved-tenant",
        "spec.tenant",
        "pg_acme",
        ["spec.tenant", "tenant: pg_acme is a reserved schema name"],
    ),
    (
        "reserved-worker-env",
        "spec.worker",
        {"env": [{"name": "LOG_LEVEL", "value": "x"}, {"name": "IMPORTWAVES_DSN", "value": "x"}]},
        ["spec.worker.env", "worker.env: IMPORTWAVES_DSN: IMPORTWAVES_* variables are reserved"],
    ),
    (
        "backoff-cap-below-base",
        "spec.retryBackoff",
        {"baseSeconds": 10, "capSeconds": 5},
        ["spec.retryBackoff", "retryBackoff: capSeconds (5) must be at least baseSeconds (10)"],
    ),
    ("backoff-negative", "spec.retryBackoff", {"baseSeconds": -1}, ["spec.retryBackoff"]),
    ("unknown-field", "spec.bogus", 1, ['unknown field "spec.bogus"']),
    (
        "unknown-nested-field",
        "spec.recordTypes.0.bogus",
        1,
        ['unknown field "spec.recordTypes[0].bogus"'],
    ),
    (
        "inline-dsn",
        "spec.database.dsn",
        "postgresql://u:p@h/db",
        ['unknown field "spec.database.dsn"'],
    ),
    ("no-record-types", "spec.recordTypes", [], ["spec.recordTypes"]),
    (
        "duplicate-type-name",
        "spec.recordTypes.1.name",
        "Customer",
        ["spec.recordTypes[1]", "Duplicate value"],
    ),
    (
        "duplicate-type-id",
        "spec.recordTypes.1.recordTypeId",
        -2,
        [
            "spec.recordTypes",
            "recordTypes: recordTypeId -2 is used by both Customer and SalesOrder; "
            "recordTypeId values must be unique",
        ],
    ),
    (
        "unknown-derived-parent",
        "spec.derivedTypes.0.parentTypes",
        ["Invoice"],
        [
            "spec.derivedTypes",
            "derivedTypes: TransactionLine lists a parent type that is not a main record "
            "type; every parentTypes entry must name a main record type",
        ],
    ),
    (
        "unknown-main-parent",
        "spec.recordTypes.1.parentTypes",
        ["Vendor"],
        [
            "spec.recordTypes",
            "recordTypes: SalesOrder lists a parent type that is not a main record type; "
            "every parentTypes entry must name a main record type",
        ],
    ),
]


# (field path for `kubectl explain importjob.<path>`, what its description must say)
EXPLAIN: list[tuple[str, list[str]]] = [
    (
        "spec.completionThreshold",
        ["1..100", "default 100", "parent batches", "derived"],
    ),
    ("spec.parallelism", ["1..1000", "default 4"]),
    ("spec.retries", ["0..100", "default 3"]),
    ("spec.staleAfterSeconds", ["5..86400", "default 300"]),
    ("spec.recordTypes.batchSize", ["1..100000", "default 1000"]),
    ("spec.derivedTypes.recordTypeId", ["default -13"]),
    ("spec.worker.image", ["default importwaves:"]),
    ("spec.retryBackoff.baseSeconds", ["0..3600", "default 1", "doubled"]),
    ("spec.retryBackoff.capSeconds", ["0..86400", "default 60"]),
]


def test_kubectl_explain_states_range_default_and_meaning(k8s_cluster: Cluster, crds: None) -> None:
    """What a user reads with the real kubectl: the API server publishes the CRD's OpenAPI a
    moment after it is established, so wait until explain knows the field."""
    from importlib.metadata import version

    def explain(path: str) -> str | None:
        r = k8s_cluster.kubectl("explain", f"importjob.{path}", check=False)
        return r.stdout if r.returncode == 0 else None

    for path, words in EXPLAIN:
        text = wait_for(
            functools.partial(explain, path), timeout=60, what=f"kubectl explain {path}"
        )
        flat = " ".join(text.split())
        for word in words:
            assert word in flat, f"{word!r} not in `kubectl explain importjob.{path}`:\n{text}"
    image = k8s_cluster.kubectl("explain", "importjob.spec.worker.image").stdout
    assert f"importwaves:{version('importwaves')}" in image, image


@pytest.mark.parametrize(
    ("path", "value", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_manifest_is_rejected_naming_the_field(
    k8s_cluster: Cluster, crds: None, namespace: str, path: str, value: Any, expected: list[str]
) -> None:
    body = _set(manifest(namespace), path, value)
    r = k8s_cluster.kubectl(
        "apply", "--validate=strict", "-f", "-", input=yaml.safe_dump(body), check=False
    )
    assert r.returncode != 0, f"accepted:\n{r.stdout}"
    for text in expected:
        assert text in r.stderr, f"{text!r} not in stderr:\n{r.stderr}"
    got = k8s_cluster.kubectl("-n", namespace, "get", "importjob", "bad", check=False)
    assert got.returncode != 0 and "NotFound" in got.stderr


def test_immutable_fields_refuse_updates(k8s_cluster: Cluster, crds: None, namespace: str) -> None:
    body = manifest(namespace)
    apply(k8s_cluster, body)
    for path, value, text in (
        ("spec.tenant", "other", "tenant is immutable (was acme, now other)"),
        ("spec.importId", "another-import", "importId is immutable"),
    ):
        r = apply(k8s_cluster, _set(body, path, value), check=False)
        assert r.returncode != 0, f"{path} change accepted"
        assert path in r.stderr and text in r.stderr, r.stderr
    # Mutable fields may change.
    r = apply(k8s_cluster, _set(body, "spec.parallelism", 8), check=False)
    assert r.returncode == 0, r.stderr
    k8s_cluster.kubectl("-n", namespace, "delete", "importjob", "bad", "--wait=false")
    # (no operator runs here: drop kopf's finalizer if it was ever added)
    k8s_cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "importjob",
        "bad",
        "--type=merge",
        "-p",
        json.dumps({"metadata": {"finalizers": None}}),
        check=False,
    )


def test_dependency_cycle_passes_the_api_and_is_reported_invalid(
    k8s_cluster: Cluster,
    namespace: str,
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    """CEL only checks that every parent names a main type; a cycle A -> B -> A needs a graph
    walk, so the operator reports it: Invalid=True naming recordTypes.parentTypes."""
    ns, name = namespace, "cycle"
    body = importjob(
        name,
        ns,
        f"cyc_{uuid.uuid4().hex[:6]}",
        recordTypes=[
            {"name": "A", "recordTypeId": 1, "parentTypes": ["B"]},
            {"name": "B", "recordTypeId": 2, "parentTypes": ["A"]},
        ],
        derivedTypes=[],
    )
    r = apply(k8s_cluster, body, check=False)
    assert r.returncode == 0, f"the API server now rejects cycles itself:\n{r.stderr}"
    op = operator(ns)
    h = harness(ns, [op], [])
    st = h.wait(name, lambda s: is_true(s, "Invalid"), "Invalid=True", 60)
    with h.explained():
        inv = conditions(st)["Invalid"]
        assert inv["reason"] == "InvalidSpec"
        assert inv["message"].startswith("recordTypes.parentTypes: dependency cycle"), inv
        assert "A -> B -> A" in inv["message"]
        assert st["summary"] == "Invalid"
        assert inv["observedGeneration"] == 1
        assert "DatabaseReady" not in conditions(st)  # nothing touched a database
        h.wait_for(
            lambda: "InvalidSpec" in h.event_reasons(name), "a Warning event InvalidSpec", 20
        )
        assert not h.jobs()
        # recordTypes shape the plan: the API server refuses to change them in place (CEL);
        # the ImportJob is fixed by re-creating it. Invalid clears; the Secret is missing next.
        fixed = copy.deepcopy(body)
        fixed["spec"]["recordTypes"] = [
            {"name": "A", "recordTypeId": 1},
            {"name": "B", "recordTypeId": 2, "parentTypes": ["A"]},
        ]
        r = apply(k8s_cluster, fixed, check=False)
        assert r.returncode != 0 and "recordTypes is immutable" in r.stderr, r.stderr
        k8s_cluster.kubectl("-n", ns, "delete", "importjob", name, "--timeout=30s")
        apply(k8s_cluster, fixed)
        st = h.wait(
            name,
            lambda s: (
                s.get("observedGeneration") == 1
                and "DatabaseReady" in conditions(s)
                and not is_true(s, "Invalid")
            ),
            "Invalid=False for the re-created ImportJob",
            30,
        )
        assert conditions(st)["DatabaseReady"]["reason"] == "SecretMissing"
        assert st["summary"] == "Blocked"
