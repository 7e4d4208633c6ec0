"""The local kubelet: Job pods really run as local processes; the Job controller decides."""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from .cluster import Cluster
from .localkubelet import NODE_NAME, LocalKubelet
from .waits import job_condition, wait_for, wait_job_finished


def _job(name: str, script: str, backoff_limit: int = 0, **container: Any) -> dict[str, Any]:
    """A plain Job, as the operator would create it: no toleration, no node selector."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "example.invalid/ignored:latest",
                            "command": ["sh", "-c", script],
                            **container,
                        }
                    ],
                }
            },
        },
    }


def _job_pods(core: Any, namespace: str, job: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items)


def test_job_with_secret_env_completes_and_writes_file(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": "creds"}, "stringData": {"foo": "s3cr3t value"}}
        )
        env = [{"name": "FOO", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "foo"}}}]
        batch.create_namespaced_job(
            namespace, _job("writer", 'echo "$FOO" > file; exit 0', env=env)
        )
        job = wait_job_finished(batch, namespace, "writer")
        assert job_condition(job) == "Complete", job.status
        assert job.status.succeeded == 1
        (pod,) = _job_pods(core, namespace, "writer")
        assert pod.spec.node_name == NODE_NAME
        assert pod.status.phase == "Succeeded"
        term = pod.status.container_statuses[0].state.terminated
        assert (term.exit_code, term.reason) == (0, "Completed")
        out = local_kubelet.pod_dir(namespace, pod.metadata.name) / "file"
        assert out.read_text() == "s3cr3t value\n"


def test_failing_pod_fails_job_per_backoff_limit(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        batch.create_namespaced_job(
            namespace, _job("failer", "echo boom >&2; exit 1", backoff_limit=1)
        )
        job = wait_job_finished(batch, namespace, "failer", timeout=120)
        assert job_condition(job) == "Failed", job.status
        reasons = [c.reason for c in job.status.conditions if c.type == "Failed"]
        assert reasons == ["BackoffLimitExceeded"]
        assert job.status.failed == 2  # the first try + backoffLimit=1 retry
        pods = _job_pods(core, namespace, "failer")
        assert len(pods) == 2
        for pod in pods:
            assert pod.status.phase == "Failed"
            term = pod.status.container_statuses[0].state.terminated
            assert (term.exit_code, term.reason) == (1, "Error")
            assert local_kubelet.pod_log(namespace, pod.metadata.name) == "boom\n"


def test_on_failure_restarts_in_place(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        job = _job("flaky", "[ -f marker ] && exit 0; touch marker; exit 3", backoff_limit=2)
        job["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
        batch.create_namespaced_job(namespace, job)
        done = wait_job_finished(batch, namespace, "flaky")
        assert job_condition(done) == "Complete", done.status
        (pod,) = _job_pods(core, namespace, "flaky")
        cs = pod.status.container_statuses[0]
        assert cs.restart_count == 1
        assert cs.last_state.terminated.exit_code == 3
        assert cs.state.terminated.exit_code == 0


def test_env_sources_and_expansion(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "cfg"}, "data": {"MODE": "fast", "LEVEL": "3"}}
        )
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": "sec"}, "stringData": {"TOKEN": "t0k"}}
        )
        env = [
            {"name": "GREETING", "value": "hi-$(MODE)"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {
                "name": "LVL",
                "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "LEVEL"}},
            },
            {
                "name": "NOPE",
                "valueFrom": {"secretKeyRef": {"name": "missing", "key": "x", "optional": True}},
            },
        ]
        env_from = [
            {"configMapRef": {"name": "cfg"}},
            {"secretRef": {"name": "sec"}, "prefix": "S_"},
        ]
        script = (
            'echo "$GREETING $POD $NS $LVL $MODE $S_TOKEN ${NOPE-unset} $1"; '
            'command -v python >/dev/null && python -c "import sys; print(sys.prefix)"'
        )
        batch.create_namespaced_job(
            namespace,
            _job("envs", script, env=env, envFrom=env_from, args=["arg0", "$(MODE)-arg"]),
        )
        job = wait_job_finished(batch, namespace, "envs")
        assert job_condition(job) == "Complete", job.status
        (pod,) = _job_pods(core, namespace, "envs")
        lines = local_kubelet.pod_log(namespace, pod.metadata.name).splitlines()
        name = pod.metadata.name
        assert lines[0] == f"hi-fast {name} {namespace} 3 fast t0k unset fast-arg"
        # The project venv's bin comes first on PATH.
        assert lines[1] == local_kubelet.path_prefix[0].removesuffix("/bin")


def test_missing_secret_waits_then_runs(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "late", "key": "x"}}}]
        batch.create_namespaced_job(namespace, _job("late", 'test "$X" = ok', env=env))

        def waiting_reason() -> str | None:
            for pod in _job_pods(core, namespace, "late"):
                for cs in pod.status.container_statuses or []:
                    if cs.state and cs.state.waiting:
                        return str(cs.state.waiting.reason)
            return None

        assert wait_for(waiting_reason, 30) == "CreateContainerConfigError"
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": "late"}, "stringData": {"x": "ok"}}
        )
        job = wait_job_finished(batch, namespace, "late")
        assert job_condition(job) == "Complete", job.status


def test_pod_deletion_kills_process(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(
            namespace,
            {
                "metadata": {"name": "sleeper"},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "main",
                            "image": "ignored",
                            # `$$$$`: Kubernetes expands `$$` to `$`, so sh sees `$$`.
                            "command": ["sh", "-c", "echo $$$$ > pid; exec sleep 300"],
                        }
                    ],
                },
            },
        )

        def running() -> bool:
            return core.read_namespaced_pod("sleeper", namespace).status.phase == "Running"

        wait_for(running, 30, what="pod sleeper running")
        pid_file = local_kubelet.pod_dir(namespace, "sleeper") / "pid"
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10))
        t0 = time.monotonic()
        core.delete_namespaced_pod("sleeper", namespace)

        def gone() -> bool:
            names = [p.metadata.name for p in core.list_namespaced_pod(namespace).items]
            return "sleeper" not in names

        wait_for(gone, 30, what="pod sleeper deleted")
        assert time.monotonic() - t0 < 5  # SIGTERM ended `sleep` at once, no grace wait
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().split()[2]
        except FileNotFoundError:
            state = "gone"
        assert state in ("gone", "Z"), f"process {pid} still alive ({state})"


def test_fallback_to_logs_on_error_reports_the_log_tail(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        script = "echo starting; echo 'boom: cannot reach upstream API' >&2; exit 1"
        batch.create_namespaced_job(
            namespace,
            _job("tells", script, terminationMessagePolicy="FallbackToLogsOnError"),
        )
        batch.create_namespaced_job(namespace, _job("silent", "echo quiet >&2; exit 1"))
        for name in ("tells", "silent"):
            assert job_condition(wait_job_finished(batch, namespace, name)) == "Failed"
        (told,) = _job_pods(core, namespace, "tells")
        term = told.status.container_statuses[0].state.terminated
        assert term.exit_code == 1
        assert term.message == "starting\nboom: cannot reach upstream API"
        (quiet,) = _job_pods(core, namespace, "silent")
        assert quiet.status.container_statuses[0].state.terminated.message is None


def test_start_latency_keeps_a_pod_pending_that_long(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    latency = 2.0
    old, local_kubelet.start_latency = local_kubelet.start_latency, latency
    try:
        with k8s_cluster.api_client() as api:
            core = client.CoreV1Api(api)
            t0 = time.time()
            core.create_namespaced_pod(
                namespace,
                {
                    "metadata": {"name": "slowstart"},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "main",
                                "image": "ignored",
                                "command": ["sh", "-c", "date +%s.%N > started"],
                            }
                        ],
                    },
                },
            )

            def creating() -> bool:
                pod = core.read_namespaced_pod("slowstart", namespace)
                states = [cs.state for cs in pod.status.container_statuses or []]
                return any(s.waiting and s.waiting.reason == "ContainerCreating" for s in states)

            wait_for(creating, 30, interval=0.05, what="pod slowstart ContainerCreating")

            def succeeded() -> bool:
                pod = core.read_namespaced_pod("slowstart", namespace)
                return pod.status.phase == "Succeeded"

            wait_for(succeeded, 30, what="pod slowstart Succeeded")
            started = float((local_kubelet.pod_dir(namespace, "slowstart") / "started").read_text())
            delay = started - t0
            print(f"pod start latency {latency} s: container started {delay:.2f} s after create")
            assert delay >= latency, delay
            assert delay < latency + 10, delay
    finally:
        local_kubelet.start_latency = old


def test_an_invalid_image_name_keeps_the_pod_pending_until_deleted(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, namespace: str
) -> None:
    with k8s_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        pod = {
            "metadata": {"name": "badimage"},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 5,
                "containers": [{"name": "main", "image": "Not A Valid Image", "command": ["true"]}],
            },
        }
        core.create_namespaced_pod(namespace, pod)

        def waiting() -> Any:
            p = core.read_namespaced_pod("badimage", namespace)
            for cs in p.status.container_statuses or []:
                if cs.state and cs.state.waiting and cs.state.waiting.reason != "":
                    return p
            return None

        p = wait_for(waiting, 30, what="pod badimage waiting")
        wait = p.status.container_statuses[0].state.waiting
        assert p.status.phase == "Pending"
        assert wait.reason == "InvalidImageName"
        assert wait.message == (
            'Failed to apply default image tag "Not A Valid Image": couldn\'t parse image name '
            '"Not A Valid Image": invalid reference format'
        )
        assert not (local_kubelet.pod_dir(namespace, "badimage") / "main.log").exists()
        core.delete_namespaced_pod("badimage", namespace)

        def gone() -> bool:
            return "badimage" not in [
                x.metadata.name for x in core.list_namespaced_pod(namespace).items
            ]

        wait_for(gone, 30, what="pod badimage deleted")
