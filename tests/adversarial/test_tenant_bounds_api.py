"""Tenants are bound, by the API server itself (the CRD's CEL rules): a reserved schema name, a
`worker.env` entry overriding what the operator sets (a literal DSN in the Job spec), and a change
of `spec.database` once the ImportJob exists are refused with a message that says why."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from e2e.harness.cluster import Cluster
from e2e.harness.operatorkit import apply, importjob


def _refused(cluster: Cluster, body: dict[str, Any]) -> str:
    r = cluster.kubectl(
        "apply", "--validate=strict", "-f", "-", input=yaml.safe_dump(body), check=False
    )
    assert r.returncode != 0, f"accepted:\n{r.stdout}"
    return str(r.stderr)


@pytest.mark.parametrize("tenant", ["public", "information_schema", "pg_catalog", "pg_toast"])
def test_reserved_tenant_names_are_refused(
    k8s_cluster: Cluster, crds: None, namespace: str, tenant: str
) -> None:
    err = _refused(k8s_cluster, importjob("reserved", namespace, tenant))
    print(f"\n{tenant}: {err.strip()}")
    # the CEL messageExpression names the refused tenant
    assert "spec.tenant" in err and f"{tenant} is a reserved schema name" in err, err


@pytest.mark.parametrize("var", ["IMPORTWAVES_DSN", "IMPORTWAVES_TENANT", "IMPORTWAVES_JOB_ID"])
def test_worker_env_cannot_set_importwaves_variables(
    k8s_cluster: Cluster, crds: None, namespace: str, var: str
) -> None:
    body = importjob("envy", namespace, "acme")
    body["spec"]["worker"] = {
        "image": "importwaves:test",
        "command": ["importwaves", "worker"],
        "env": [
            {"name": "HARMLESS", "value": "1"},
            {"name": var, "value": "postgresql://other:pw@db/other"},
        ],
    }
    err = _refused(k8s_cluster, body)
    print(f"\n{var}: {err.strip()}")
    assert "spec.worker.env" in err and "IMPORTWAVES_* variables are reserved" in err, err
    # other variables stay allowed
    body["spec"]["worker"]["env"] = [{"name": "HARMLESS", "value": "1"}]
    assert apply(k8s_cluster, body, check=False).returncode == 0


def test_database_is_immutable_once_created(
    k8s_cluster: Cluster, crds: None, namespace: str
) -> None:
    body = importjob("moving", namespace, "acme")
    apply(k8s_cluster, body)
    try:
        for change in ({"secretName": "another-db"}, {"key": "other-dsn"}):
            moved = copy.deepcopy(body)
            moved["spec"]["database"].update(change)
            err = _refused(k8s_cluster, moved)
            print(f"\n{change}: {err.strip()}")
            assert "spec.database" in err and "database is immutable" in err, err
        got = json.loads(
            k8s_cluster.kubectl("-n", namespace, "get", "importjob", "moving", "-o", "json").stdout
        )
        assert got["spec"]["database"] == body["spec"]["database"]
        # a mutable field still changes
        body["spec"]["parallelism"] = 7
        assert apply(k8s_cluster, body, check=False).returncode == 0
    finally:
        k8s_cluster.kubectl(
            "-n", namespace, "delete", "importjob", "moving", "--wait=false", check=False
        )
        k8s_cluster.kubectl(
            "-n",
            namespace,
            "patch",
            "importjob",
            "moving",
            "--type=merge",
            "-p",
            json.dumps({"metadata": {"finalizers": None}}),
            check=False,
        )
