"""Wave Job builder and Job/pod readers (pure: no API server)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from importwaves.launch.kubejobs import (
    ANN_JOB_ID,
    ENV_COMMAND,
    LABEL_IMPORTJOB,
    LABEL_INDEX,
    LABEL_MANAGED,
    LABEL_OWNER_UID,
    LABEL_RECORD_TYPE,
    LABEL_WAVE,
    MAX_BACKOFF_LIMIT,
    MAX_POD_MESSAGE,
    MIN_JOB_TTL_SECONDS,
    POOLED_MODULE,
    backoff_limit,
    build_wave_job,
    job_name,
    label_value,
    owner_label,
    read_wave_job,
    read_worker_pod,
)
from importwaves.launch.port import LaunchTarget, WorkerGroup
from importwaves.spec import WorkerPod

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
#: ImportJob names are DNS-1123 subdomains (lowercase alphanumerics, '-' and '.', <= 253).
OWNER_NAMES = st.from_regex(r"\A[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
UID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def target(name: str = "demo-import", **worker: Any) -> LaunchTarget:
    return LaunchTarget(
        "kubernetes",
        namespace="imports",
        owner_name=name,
        owner_uid=UID,
        secret_name="demo-tenant-db",
        secret_key="dsn",
        worker=WorkerPod(image="importwaves:0.1.0", **worker).model_dump(mode="json"),
    )


GROUP = WorkerGroup(
    job_id="imports.demo-import", wave_number=2, record_type_name="SalesOrder", size=4
)


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- names ---------------------------------------------------------------------------------------
def test_job_name_reads_as_importjob_record_type_wave_and_index() -> None:
    assert job_name("demo-import", "SalesOrder", 2, 1) == "demo-import-salesorder-w2-1"
    assert job_name("demo-import", "SalesOrder", 2, 3) == "demo-import-salesorder-w2-3"
    assert job_name("a.b", "Transaction Line", 10, 1) == "a-b-transaction-line-w10-1"


@given(
    name=OWNER_NAMES,
    record_type=st.text(min_size=0, max_size=80),
    wave=st.integers(0, 10**6),
    index=st.integers(1, 10**6),
)
def test_job_name_is_a_dns_label_of_at_most_63(
    name: str, record_type: str, wave: int, index: int
) -> None:
    n = job_name(name, record_type, wave, index)
    assert len(n) <= 63, n
    assert DNS1123_LABEL.match(n), n
    assert n.endswith(f"-w{wave}-{index}")


def test_long_names_are_cut_with_a_digest_and_stay_distinct() -> None:
    base = "x" * 60
    a, b = job_name(base + "a", "Order", 1, 1), job_name(base + "b", "Order", 1, 1)
    assert a != b and len(a) == 63 and a.startswith("x" * 20)
    short = job_name("imp", "Order", 1, 1)
    assert short == "imp-order-w1-1"  # no digest when it fits


@given(name=OWNER_NAMES)
def test_owner_label_is_a_valid_label_value(name: str) -> None:
    value = owner_label(name)
    assert len(value) <= 63 and LABEL_VALUE.match(value), value
    if len(name) <= 63:
        assert value == name  # short names read as themselves in `kubectl get jobs -l`


@given(text=st.text(max_size=100))
def test_label_value_of_any_text(text: str) -> None:
    value = label_value(text)
    assert len(value) <= 63 and LABEL_VALUE.match(value), value


def test_backoff_limit_is_bounded() -> None:
    assert [backoff_limit(n) for n in (1, 4, 100)] == [1, 4, MAX_BACKOFF_LIMIT]


# -- build_wave_job ------------------------------------------------------------------------------
def test_wave_job_metadata_and_labels() -> None:
    job = build_wave_job(target(), "demo", GROUP, 1)
    meta = job["metadata"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert meta["name"] == "demo-import-salesorder-w2-1"
    assert meta["namespace"] == "imports"
    labels = {
        LABEL_MANAGED: "importwaves",
        LABEL_IMPORTJOB: "demo-import",
        LABEL_OWNER_UID: UID,
        LABEL_WAVE: "2",
        LABEL_RECORD_TYPE: "SalesOrder",
        LABEL_INDEX: "1",
    }
    assert meta["labels"] == labels
    # the pods carry the same labels and the job id (observe reads them)
    assert job["spec"]["template"]["metadata"]["labels"] == labels
    assert job["spec"]["template"]["metadata"]["annotations"][ANN_JOB_ID] == GROUP.job_id
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "importwaves.io/v1alpha1",
            "kind": "ImportJob",
            "name": "demo-import",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_wave_job_is_a_work_queue_of_pooled_workers() -> None:
    spec = build_wave_job(target(), "demo", GROUP, 1, keep_failed_seconds=7200)["spec"]
    assert spec["parallelism"] == 4
    assert "completions" not in spec
    assert spec["backoffLimit"] == backoff_limit(4) == 4
    assert spec["ttlSecondsAfterFinished"] == 7200
    short = build_wave_job(target(), "demo", GROUP, 1, keep_failed_seconds=0)["spec"]
    assert short["ttlSecondsAfterFinished"] == MIN_JOB_TTL_SECONDS
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [c] = pod["containers"]
    assert c["command"] == ["python", "-m", POOLED_MODULE]
    assert "args" not in c
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_wave_job_needs_a_wave() -> None:
    with pytest.raises(ValueError, match="names its wave"):
        build_wave_job(target(), "demo", WorkerGroup("j", None, "x", 1), 1)


def test_wave_job_env_contract() -> None:
    # An IMPORTWAVES_* entry in worker.env (refused by the CRD and the spec, but the builder
    # filters it too) could carry a DSN in clear or shadow the contract's variables.
    clear = {"name": "IMPORTWAVES_DSN", "value": "postgresql://u:pw@db/tenant"}
    shadow = {"name": "IMPORTWAVES_WAVE", "value": "99"}
    t = target()
    worker = {**t.worker, "env": [{"name": "EXTRA", "value": "1"}, clear, shadow]}
    t = LaunchTarget(**{**t.to_json(), "worker": worker})
    job = build_wave_job(t, "demo", GROUP, 1, conn_env={"IMPORTWAVES_CONNECT_TIMEOUT": "5"})
    env = env_of(job)
    assert env["IMPORTWAVES_DSN"] == {"secretKeyRef": {"name": "demo-tenant-db", "key": "dsn"}}
    assert env["IMPORTWAVES_TENANT"] == "demo"
    assert env["IMPORTWAVES_JOB_ID"] == GROUP.job_id
    assert env["IMPORTWAVES_WAVE"] == "2"
    assert env["IMPORTWAVES_WORKER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["IMPORTWAVES_CONNECT_TIMEOUT"] == "5"
    assert env["EXTRA"] == "1"
    assert ENV_COMMAND not in env  # the reference worker runs in-process
    names = [e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names))
    assert "postgresql://" not in str(job)
    assert "99" not in str(env["IMPORTWAVES_WAVE"])


def test_custom_command_is_handed_to_the_pooled_worker() -> None:
    job = build_wave_job(
        target(command=["sh", "-c"], args=["echo boom >&2; exit 1"]), "d", GROUP, 1
    )
    env = env_of(job)
    assert json.loads(env[ENV_COMMAND]) == ["sh", "-c", "echo boom >&2; exit 1"]
    # the container still runs the pooled worker, which runs the command per batch
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == POOLED_MODULE


def test_wave_job_restricted_security_context() -> None:
    pod = build_wave_job(target(), "demo", GROUP, 1)["spec"]["template"]["spec"]
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


def test_wave_job_worker_settings() -> None:
    t = target(
        resources={"limits": {"cpu": "1"}},
        serviceAccountName="importer",
        nodeSelector={"pool": "imports"},
        tolerations=[{"key": "k", "operator": "Exists"}],
        activeDeadlineSeconds=60,
    )
    job = build_wave_job(t, "demo", GROUP, 1, active_deadline=600)
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "importwaves:0.1.0"
    assert c["resources"] == {"limits": {"cpu": "1"}}
    assert pod["serviceAccountName"] == "importer"
    assert pod["nodeSelector"] == {"pool": "imports"}
    assert pod["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert job["spec"]["activeDeadlineSeconds"] == 60
    plain = build_wave_job(target(), "demo", GROUP, 1, active_deadline=600)
    assert plain["spec"]["activeDeadlineSeconds"] == 600
    assert "activeDeadlineSeconds" not in build_wave_job(target(), "demo", GROUP, 1)["spec"]
    ps = plain["spec"]["template"]["spec"]
    assert not {"serviceAccountName", "nodeSelector", "tolerations"} & set(ps)
    assert "resources" not in ps["containers"][0]


# -- read_wave_job -------------------------------------------------------------------------------
def with_conditions(*conds: tuple[str, str]) -> dict[str, Any]:
    job = build_wave_job(target(), "demo", GROUP, 3)
    job["status"] = {
        "conditions": [
            {"type": t, "status": s, "lastTransitionTime": "2026-01-01T00:00:00Z"} for t, s in conds
        ]
    }
    return job


@pytest.mark.parametrize(
    ("conds", "finished", "failed"),
    [
        ([], False, False),
        ([("Complete", "True")], True, False),
        ([("SuccessCriteriaMet", "True")], False, False),
        ([("Failed", "True")], True, True),
        ([("FailureTarget", "True")], False, False),
        ([("Complete", "False"), ("Failed", "False")], False, False),
        ([("Suspended", "True")], False, False),
    ],
)
def test_read_wave_job(conds: list[tuple[str, str]], finished: bool, failed: bool) -> None:
    j = read_wave_job(with_conditions(*conds), UID)
    assert j is not None
    assert (j.name, j.job_id, j.wave, j.index) == (
        "demo-import-salesorder-w2-3",
        GROUP.job_id,
        2,
        3,
    )
    assert (j.finished, j.failed) == (finished, failed)
    assert bool(j.finished_at) == finished


def test_read_wave_job_trusts_only_its_controller() -> None:
    job = with_conditions()
    assert read_wave_job(job, "another-uid") is None
    assert read_wave_job(job, "") is None
    job["metadata"]["ownerReferences"][0]["controller"] = False
    assert read_wave_job(job, UID) is None
    bad = with_conditions()
    bad["metadata"]["labels"][LABEL_WAVE] = "two"
    assert read_wave_job(bad, UID) is None
    no_id = with_conditions()
    del no_id["metadata"]["annotations"][ANN_JOB_ID]
    assert read_wave_job(no_id, UID) is None


# -- read_worker_pod -----------------------------------------------------------------------------
def pod(phase: str, **state: Any) -> dict[str, Any]:
    job = build_wave_job(target(), "demo", GROUP, 1)
    tmpl = job["spec"]["template"]["metadata"]
    return {
        "metadata": {"name": "demo-import-salesorder-w2-1-abcde", **tmpl},
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "worker", "state": state}] if state else [],
        },
    }


def test_a_running_pod_is_alive() -> None:
    w = read_worker_pod(pod("Running", running={"startedAt": "x"}), GROUP.job_id)
    assert w is not None
    assert (w.worker_id, w.job_id, w.wave_number, w.alive) == (
        "demo-import-salesorder-w2-1-abcde",
        GROUP.job_id,
        2,
        True,
    )
    pending = read_worker_pod(pod("Pending"), GROUP.job_id)
    assert pending is not None and pending.alive


def test_a_failed_pod_brings_its_termination_message() -> None:
    p = pod("Failed", terminated={"exitCode": 1, "reason": "Error", "message": "boom: upstream"})
    w = read_worker_pod(p, GROUP.job_id)
    assert w is not None and not w.alive
    assert (w.exit_code, w.message) == (1, "boom: upstream")


def test_a_pod_message_is_cut_from_the_front_and_scrubbed() -> None:
    long = "x" * 5000 + " postgresql://u:hunter2secret@db/t final words"
    w = read_worker_pod(
        pod("Failed", terminated={"exitCode": 1, "reason": "Error", "message": long}),
        GROUP.job_id,
    )
    assert w is not None
    assert len(w.message) <= MAX_POD_MESSAGE and w.message.endswith("final words")
    assert "hunter2secret" not in w.message


def test_ended_pods_without_a_message() -> None:
    other = pod("Succeeded", terminated={"exitCode": 0, "reason": "Completed"})
    assert read_worker_pod(other, "imports.another-import") is None  # another job's pod
    ok = read_worker_pod(
        pod("Succeeded", terminated={"exitCode": 0, "reason": "Completed"}), GROUP.job_id
    )
    assert ok is not None and (ok.alive, ok.exit_code, ok.message) == (False, 0, "")
    oom = read_worker_pod(
        pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"}), GROUP.job_id
    )
    assert oom is not None and (oom.exit_code, oom.message) == (137, "OOMKilled")
    never = read_worker_pod(
        pod("Failed", waiting={"reason": "CreateContainerConfigError", "message": "no secret"}),
        GROUP.job_id,
    )
    assert never is not None and never.exit_code is None
    assert never.message == "CreateContainerConfigError: no secret"
    evicted = pod("Failed")
    evicted["status"].update(reason="DeadlineExceeded", message="Pod was active too long")
    w = read_worker_pod(evicted, GROUP.job_id)
    assert w is not None and w.message == "DeadlineExceeded: Pod was active too long"


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_a_pending_pod_is_alive_not_started_with_the_kubelets_reason_and_its_age() -> None:
    p = pod(
        "Pending",
        waiting={
            "reason": "CreateContainerConfigError",
            "message": "container has runAsNonRoot and image will run as root",
        },
    )
    p["metadata"]["creationTimestamp"] = "2026-01-01T11:59:30Z"
    p["metadata"]["labels"]["batch.kubernetes.io/job-name"] = "demo-import-salesorder-w2-1"
    w = read_worker_pod(p, GROUP.job_id, NOW)
    assert w is not None and w.alive and not w.started
    assert (w.waiting, w.waiting_message, w.age, w.launch) == (
        "CreateContainerConfigError",
        "container has runAsNonRoot and image will run as root",
        30.0,
        "demo-import-salesorder-w2-1",
    )


def test_an_unscheduled_pod_waits_with_the_schedulers_reason_and_secrets_are_scrubbed() -> None:
    p = pod("Pending")
    p["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3"}
    ]
    w = read_worker_pod(p, GROUP.job_id, NOW)
    assert w is not None and (w.started, w.waiting, w.waiting_message) == (
        False,
        "Unschedulable",
        "0/3",
    )
    leak = pod("Pending", waiting={"reason": "ErrImagePull", "message": "postgresql://u:pw9x@h/d"})
    w = read_worker_pod(leak, GROUP.job_id, NOW)
    assert w is not None and "pw9x" not in w.waiting_message


def test_a_running_pod_says_how_long_it_has_run() -> None:
    w = read_worker_pod(
        pod("Running", running={"startedAt": "2026-01-01T11:58:00Z"}), GROUP.job_id, NOW
    )
    assert w is not None and w.started and w.running_for == 120.0


def test_a_pod_that_ended_without_running_says_so() -> None:
    p = pod(
        "Failed",
        terminated={
            "exitCode": 128,
            "reason": "CreateContainerConfigError",
            "message": "container has runAsNonRoot and image will run as root",
        },
    )
    w = read_worker_pod(p, GROUP.job_id, NOW)
    assert w is not None and not w.alive and not w.started
    assert w.waiting == "CreateContainerConfigError"
    assert w.message == (
        "CreateContainerConfigError: container has runAsNonRoot and image will run as root"
    )
    ran = read_worker_pod(
        pod("Failed", terminated={"exitCode": 1, "reason": "Error", "message": "boom"}),
        GROUP.job_id,
        NOW,
    )
    assert ran is not None and ran.started and ran.waiting == ""


# -- the operator's worker idle setting ----------------------------------------------------------
def test_wave_job_carries_the_operators_worker_idle_seconds() -> None:
    from importwaves.launch.kubejobs import ENV_IDLE
    from importwaves.worker_pool import ENV_POOL, PoolSettings

    assert ENV_POOL["idle"] == ENV_IDLE  # the name the pooled worker reads
    for seconds, text in ((3, "3"), (2.5, "2.5"), (30.0, "30"), (600, "600")):
        env = env_of(build_wave_job(target(), "demo", GROUP, 1, worker_idle_seconds=seconds))
        assert env[ENV_IDLE] == text
        # ... which the pooled worker in the pod reads back as the same number of seconds
        plain = {k: v for k, v in env.items() if isinstance(v, str)}
        pod = PoolSettings.from_env({**plain, "IMPORTWAVES_DSN": "postgresql://db/x"})
        assert pod.idle_seconds == float(seconds)
    # none given: the worker's own default (30 s)
    assert ENV_IDLE not in env_of(build_wave_job(target(), "demo", GROUP, 1))
    # spec.worker.env cannot set it (refused by the CRD and the spec; filtered here too)
    t = target()
    worker = {**t.worker, "env": [{"name": ENV_IDLE, "value": "99999"}]}
    t = LaunchTarget(**{**t.to_json(), "worker": worker})
    job = build_wave_job(t, "demo", GROUP, 1, worker_idle_seconds=3)
    names = [e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert names.count(ENV_IDLE) == 1 and env_of(job)[ENV_IDLE] == "3"


def test_operator_setting_reaches_the_worker_pods_it_creates(monkeypatch: Any) -> None:
    """IMPORTWAVES_WORKER_IDLE_SECONDS of the operator (the chart's operator.workerIdleSeconds)
    is in the env of the wave Job its launcher creates; unset, 30 s; not above 0, refused."""
    from kubernetes import client

    from importwaves.k8s.operator import ImportJobOperator
    from importwaves.settings import Settings

    monkeypatch.setenv("IMPORTWAVES_WORKER_IDLE_SECONDS", "4")
    op = ImportJobOperator(Settings(), client.ApiClient())
    created: list[dict[str, Any]] = []
    monkeypatch.setattr(op.launcher, "_jobs", lambda target: [])
    monkeypatch.setattr(
        op.launcher.batch, "create_namespaced_job", lambda ns, body: created.append(body)
    )
    try:
        assert op.launcher.ensure(target(), "demo", [GROUP]) == []
    finally:
        op.close()
    [job] = created
    assert env_of(job)["IMPORTWAVES_WORKER_IDLE_SECONDS"] == "4"

    monkeypatch.delenv("IMPORTWAVES_WORKER_IDLE_SECONDS")
    assert Settings().worker_idle_seconds == 30.0
    for bad in ("0", "-1", "nan"):
        monkeypatch.setenv("IMPORTWAVES_WORKER_IDLE_SECONDS", bad)
        with pytest.raises(ValueError, match="IMPORTWAVES_WORKER_IDLE_SECONDS must be"):
            Settings()
