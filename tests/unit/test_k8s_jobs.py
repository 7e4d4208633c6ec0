"""Worker Job builder and reader (pure: no API server)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from importwaves.k8s.crd import DatabaseRef
from importwaves.k8s.jobs import (
    ANN_BATCH,
    ANN_JOB_ID,
    ANN_SECRET,
    ANN_SECRET_KEY,
    ANN_SEQ,
    ANN_TENANT,
    JOB_TTL_SECONDS,
    LABEL_IMPORTJOB,
    LABEL_MANAGED,
    LABEL_WAVE,
    Owner,
    build_job,
    job_name,
    owner_label,
    read_job,
)
from importwaves.launch.base import BatchDispatch
from importwaves.spec import WorkerPod

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
#: ImportJob names are DNS-1123 subdomains (lowercase alphanumerics, '-' and '.', <= 253).
OWNER_NAMES = st.from_regex(r"\A[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")


def owner(name: str = "demo-import", **worker: Any) -> Owner:
    return Owner(
        namespace="imports",
        name=name,
        uid="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        tenant="demo",
        database=DatabaseRef(secretName="demo-tenant-db", key="dsn"),
        worker=WorkerPod(image="importwaves:0.1.0", **worker),
    )


BATCH = BatchDispatch(
    job_id="demo-import",
    batch_id="w2-SalesOrder-00000000000000000003",
    wave_number=2,
    record_type_id=-30,
    dispatch_seq=7,
    attempt=1,
)


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- names ---------------------------------------------------------------------------------------
def test_job_name_is_deterministic_and_carries_the_fencing_token() -> None:
    a = job_name("demo-import", BATCH.batch_id, 7)
    assert a == job_name("demo-import", BATCH.batch_id, 7)
    assert a.startswith("demo-import-") and a.endswith("-7")
    assert job_name("demo-import", BATCH.batch_id, 8) != a
    assert job_name("demo-import", "w2-SalesOrder-00000000000000000004", 7) != a
    assert job_name("other-import", BATCH.batch_id, 7) != a


@given(name=OWNER_NAMES, batch=st.text(min_size=1, max_size=80), seq=st.integers(0, 10**12))
def test_job_name_is_a_dns_label_of_at_most_63(name: str, batch: str, seq: int) -> None:
    n = job_name(name, batch, seq)
    assert len(n) <= 63, n
    assert DNS1123_LABEL.match(n), n


@pytest.mark.parametrize("name", ["a" * 36, "a" * 35 + "-b", "x" * 253, "a.b-c.d", "a" * 35 + "."])
def test_job_name_edge_cases(name: str) -> None:
    n = job_name(name, "b", 2**40)
    assert len(n) <= 63 and DNS1123_LABEL.match(n), n


def test_long_owner_names_stay_distinct() -> None:
    base = "x" * 60
    assert job_name(base + "a", "b", 1) != job_name(base + "b", "b", 1)
    assert owner_label(base + "aaaa") != owner_label(base + "aaab")


@given(name=OWNER_NAMES)
def test_owner_label_is_a_valid_label_value(name: str) -> None:
    value = owner_label(name)
    assert len(value) <= 63 and LABEL_VALUE.match(value), value
    if len(name) <= 63:
        assert value == name  # short names read as themselves in `kubectl get jobs -l`


# -- build_job -----------------------------------------------------------------------------------
def test_build_job_metadata() -> None:
    job = build_job(owner(), BATCH)
    meta = job["metadata"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert meta["name"] == job_name("demo-import", BATCH.batch_id, 7)
    assert meta["namespace"] == "imports"
    assert meta["labels"] == {
        LABEL_MANAGED: "importwaves",
        LABEL_IMPORTJOB: "demo-import",
        LABEL_WAVE: "2",
    }
    # the pod template carries the same labels (`kubectl get pods -l` finds a wave's pods)
    assert job["spec"]["template"]["metadata"]["labels"] == {
        LABEL_MANAGED: "importwaves",
        LABEL_IMPORTJOB: "demo-import",
        LABEL_WAVE: "2",
    }
    assert meta["annotations"] == {
        ANN_JOB_ID: "demo-import",
        ANN_BATCH: BATCH.batch_id,
        ANN_SEQ: "7",
        ANN_TENANT: "demo",
        ANN_SECRET: "demo-tenant-db",
        ANN_SECRET_KEY: "dsn",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "importwaves.io/v1alpha1",
            "kind": "ImportJob",
            "name": "demo-import",
            "uid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_build_job_long_owner_name_has_valid_labels() -> None:
    name = "a-very-long-importjob-name." + "x" * 200
    job = build_job(owner(name), BATCH)
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        for value in labels.values():
            assert len(value) <= 63 and LABEL_VALUE.match(value), value
    assert job["metadata"]["labels"][LABEL_IMPORTJOB] == owner_label(name)
    assert job["metadata"]["ownerReferences"][0]["name"] == name  # the full name
    assert DNS1123_LABEL.match(job["metadata"]["name"])


def test_build_job_spec_never_retries_itself() -> None:
    spec = build_job(owner(), BATCH)["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == JOB_TTL_SECONDS
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_build_job_env_contract() -> None:
    # An IMPORTWAVES_* entry in worker.env (refused by the CRD and the spec, but the builder
    # filters it too) could carry a DSN in clear or shadow the contract's variables.
    clear = {"name": "IMPORTWAVES_DSN", "value": "postgresql://u:pw@db/tenant"}
    shadow = {"name": "IMPORTWAVES_BATCH_ID", "value": "someone-elses-batch"}
    job = build_job(owner(env=[{"name": "EXTRA", "value": "1"}, clear, shadow]), BATCH)
    env = env_of(job)
    assert env["IMPORTWAVES_DSN"] == {"secretKeyRef": {"name": "demo-tenant-db", "key": "dsn"}}
    assert env["IMPORTWAVES_TENANT"] == "demo"
    assert env["IMPORTWAVES_JOB_ID"] == "demo-import"
    assert env["IMPORTWAVES_BATCH_ID"] == BATCH.batch_id
    assert env["IMPORTWAVES_DISPATCH_SEQ"] == "7"
    assert env["EXTRA"] == "1"
    names = [e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names))
    # The DSN never appears in the Job in clear, even when worker.env tried to put it there.
    assert "postgresql://" not in str(job)
    assert "someone-elses-batch" not in str(job)


def test_build_job_restricted_security_context() -> None:
    pod = build_job(owner(), BATCH)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_build_job_worker_settings() -> None:
    o = owner(
        command=["python", "-m", "importwaves.worker"],
        args=["--x"],
        resources={"limits": {"cpu": "1"}},
        serviceAccountName="importer",
        nodeSelector={"pool": "imports"},
        tolerations=[{"key": "k", "operator": "Exists"}],
    )
    pod = build_job(o, BATCH)["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert (c["image"], c["command"], c["args"]) == (
        "importwaves:0.1.0",
        ["python", "-m", "importwaves.worker"],
        ["--x"],
    )
    assert c["resources"] == {"limits": {"cpu": "1"}}
    assert pod["serviceAccountName"] == "importer"
    assert pod["nodeSelector"] == {"pool": "imports"}
    assert pod["tolerations"] == [{"key": "k", "operator": "Exists"}]
    plain = build_job(owner(), BATCH)["spec"]["template"]["spec"]
    assert not {"serviceAccountName", "nodeSelector", "tolerations"} & set(plain)
    assert "resources" not in plain["containers"][0]


# -- read_job ------------------------------------------------------------------------------------
def with_conditions(*conds: tuple[str, str], **extra: Any) -> dict[str, Any]:
    job = build_job(owner(), BATCH)
    job["status"] = {
        "conditions": [{"type": t, "status": s, **extra} for t, s in conds],
    }
    return job


def test_read_job_running() -> None:
    r = read_job(build_job(owner(), BATCH))
    assert r is not None
    assert (r.job_id, r.batch_id, r.dispatch_seq) == ("demo-import", BATCH.batch_id, 7)
    assert r.name == job_name("demo-import", BATCH.batch_id, 7)
    assert (r.finished, r.succeeded) == (False, False)


@pytest.mark.parametrize(
    ("conds", "finished", "succeeded"),
    [
        ([("Complete", "True")], True, True),
        ([("SuccessCriteriaMet", "True")], True, True),
        ([("SuccessCriteriaMet", "True"), ("Complete", "True")], True, True),
        ([("Failed", "True")], True, False),
        ([("FailureTarget", "True")], True, False),
        ([("FailureTarget", "True"), ("Failed", "True")], True, False),
        ([("Complete", "False"), ("Failed", "False")], False, False),
        ([("Suspended", "True")], False, False),
    ],
)
def test_read_job_conditions(conds: list[tuple[str, str]], finished: bool, succeeded: bool) -> None:
    r = read_job(with_conditions(*conds, reason="BackoffLimitExceeded", message="limit"))
    assert r is not None
    assert (r.finished, r.succeeded) == (finished, succeeded)


def test_read_job_failure_message_names_the_reason() -> None:
    r = read_job(
        with_conditions(
            ("Failed", "True"),
            reason="BackoffLimitExceeded",
            message="Job has reached the specified backoff limit",
        )
    )
    assert r is not None
    assert r.message == (
        "pod failed: BackoffLimitExceeded: Job has reached the specified backoff limit"
    )


def test_read_job_ignores_jobs_that_are_not_ours() -> None:
    assert read_job({"metadata": {"name": "x", "annotations": {}}}) is None
    assert read_job({"metadata": {"name": "x"}}) is None
    job = build_job(owner(), BATCH)
    del job["metadata"]["annotations"][ANN_JOB_ID]
    assert read_job(job) is None


def test_read_job_of_the_api_shape() -> None:
    """As the API returns it (sanitized client model): no status yet, or status without
    conditions."""
    job = build_job(owner(), BATCH)
    job["status"] = {}
    r = read_job(job)
    assert r is not None and not r.finished
    job["status"] = {"active": 1, "conditions": None}
    r = read_job(job)
    assert r is not None and not r.finished


def test_pod_failure_message_carries_the_kubelets_reason() -> None:
    from importwaves.k8s.jobs import pod_failure_message

    msg = "container has runAsNonRoot and image will run as root (pod: ...)"
    pod = {
        "status": {
            "containerStatuses": [
                {
                    "name": "worker",
                    "state": {
                        "terminated": {
                            "exitCode": 128,
                            "reason": "CreateContainerConfigError",
                            "message": msg,
                        }
                    },
                }
            ]
        }
    }
    assert pod_failure_message(pod) == (
        f"container worker: CreateContainerConfigError (exit code 128): {msg}"
    )
    waiting = {
        "status": {
            "containerStatuses": [
                {
                    "name": "w",
                    "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "not present"}},
                }
            ]
        }
    }
    assert pod_failure_message(waiting) == "container w: ErrImageNeverPull: not present"
    plain = {
        "status": {
            "containerStatuses": [
                {"name": "w", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}
            ]
        }
    }
    assert pod_failure_message(plain) is None
    assert pod_failure_message({"status": {}}) is None
