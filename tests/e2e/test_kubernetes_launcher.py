"""The Kubernetes adapter of the launcher port against the real API server, Job controller and
local kubelet, without an operator: ensure starts one Job per wave and no second one while it is
active, the next index after it ended; observe reports ended pods with exit code and termination
message; discard keeps only the newest failed Job of a wave, for keep_failed_seconds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from importwaves.launch.kubernetes import KubernetesLauncher
from importwaves.launch.port import LaunchTarget, WorkerGroup, WorkerSeen

from .harness.cluster import Cluster
from .harness.localkubelet import LocalKubelet
from .harness.operatorkit import apply, create_secret, importjob, small_spec
from .harness.waits import wait_for

JOB_ID = "launcher-test"


@pytest.fixture
def target(k8s_cluster: Cluster, crds: None, namespace: str) -> Iterator[LaunchTarget]:
    """An ImportJob (no operator runs: it only owns the Jobs) and a Secret whose DSN the pooled
    worker refuses at once (it exits 2 with its reason on stderr)."""
    create_secret(k8s_cluster, namespace, "bad-db", "not a dsn")
    apply(k8s_cluster, importjob("owner", namespace, "t1", secret="bad-db", **small_spec()))
    with k8s_cluster.api_client() as api:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "importwaves.io", "v1alpha1", namespace, "importjobs", "owner"
        )
    yield LaunchTarget(
        "kubernetes",
        namespace=namespace,
        owner_name="owner",
        owner_uid=obj["metadata"]["uid"],
        secret_name="bad-db",
        secret_key="dsn",
        worker={"image": "importwaves:test"},
    )


def _jobs(launcher: KubernetesLauncher, t: LaunchTarget) -> list[Any]:
    return sorted(launcher._jobs(t), key=lambda j: j.index)


def _ended(launcher: KubernetesLauncher, t: LaunchTarget, n: int) -> list[WorkerSeen]:
    seen = launcher.observe(t, "t1", JOB_ID)
    assert seen.complete
    ended = [w for w in seen.workers if not w.alive]
    return ended if len(ended) >= n else []


def test_ensure_observe_discard_on_the_real_cluster(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, target: LaunchTarget
) -> None:
    t = target
    group = WorkerGroup(JOB_ID, 1, "Customer", 1)
    with k8s_cluster.api_client() as api:
        launcher = KubernetesLauncher(api, keep_failed_seconds=3600)
        assert launcher.ensure(t, "t1", [group]) == []
        assert launcher.ensure(t, "t1", [group]) == []  # active: no second Job
        [first] = _jobs(launcher, t)
        assert (first.name, first.wave, first.index) == ("owner-customer-w1-1", 1, 1)

        # backoffLimit 1 for one worker: two pods fail (bad DSN), the Job fails
        wait_for(lambda: [j for j in _jobs(launcher, t) if j.failed], 90, what="Job 1 failed")
        ended = wait_for(lambda: _ended(launcher, t, 2), 30, what="2 ended pods")
        assert {w.exit_code for w in ended} == {2}, ended
        assert all(w.wave_number == 1 and w.job_id == JOB_ID for w in ended)
        # the termination message is the end of the pod's log (FallbackToLogsOnError)
        assert all("bad worker settings" in w.message or "DSN" in w.message for w in ended), [
            w.message for w in ended
        ]
        assert all("not a dsn" not in w.message for w in ended)  # no secret in the message

        # the wave still has work: its next Job
        assert launcher.ensure(t, "t1", [group]) == []
        assert [j.index for j in _jobs(launcher, t)] == [1, 2]
        wait_for(lambda: all(j.failed for j in _jobs(launcher, t)), 90, what="Job 2 failed as well")
        ids = [w.worker_id for w in wait_for(lambda: _ended(launcher, t, 4), 30, what="4 pods")]
        # every pod recorded: the older failed Job goes, the newest failed one is kept
        launcher.discard(t, "t1", JOB_ID, ids)
        wait_for(lambda: [j.index for j in _jobs(launcher, t)] == [2], 30, what="Job 1 deleted")
        launcher.discard(t, "t1", JOB_ID, ids)
        assert [j.index for j in _jobs(launcher, t)] == [2]
        # an ended pod not yet recorded keeps its Job whatever the keep time
        impatient = KubernetesLauncher(api, keep_failed_seconds=0)
        impatient.discard(t, "t1", JOB_ID, ids[:1])
        assert [j.index for j in _jobs(launcher, t)] == [2]
        impatient.discard(t, "t1", JOB_ID, ids)
        wait_for(lambda: not _jobs(launcher, t), 30, what="the kept Job deleted (keep 0)")
        # numbering goes on after the deletions
        assert launcher.ensure(t, "t1", [group]) == []
        assert [j.index for j in _jobs(launcher, t)] == [3]
        print(f"\nwave Jobs: {first.name}, then -2, -3; ended pods seen: {len(ids)}")


def test_a_pod_that_cannot_start_is_seen_waiting_and_its_active_job_discarded(
    k8s_cluster: Cluster, local_kubelet: LocalKubelet, target: LaunchTarget
) -> None:
    """observe reports a pod that waits (InvalidImageName) as alive, not started, with the
    kubelet's reason and message, its Job as a launch in progress; discard deletes that active
    Job only once the pod is named as recorded."""
    from dataclasses import replace

    t = replace(target, worker={"image": "Not An Image"})
    group = WorkerGroup(JOB_ID, 1, "Customer", 1)
    with k8s_cluster.api_client() as api:
        launcher = KubernetesLauncher(api)
        assert launcher.ensure(t, "t1", [group]) == []
        [job] = _jobs(launcher, t)

        def waiting() -> Any:
            seen = launcher.observe(t, "t1", JOB_ID)
            stuck = [w for w in seen.workers if w.waiting == "InvalidImageName"]
            return (seen, stuck[0]) if stuck else None

        seen, w = wait_for(waiting, 60, what="the pod waiting in InvalidImageName")
        assert seen.complete and w.alive and not w.started and w.launch == job.name
        assert 'couldn\'t parse image name "Not An Image"' in w.waiting_message
        assert w.age is not None and 0 <= w.age < 120
        assert [(x.wave_number, x.name) for x in seen.launches] == [(1, job.name)]
        launcher.discard(t, "t1", JOB_ID, [])  # not recorded: the active Job stays
        assert [j.name for j in _jobs(launcher, t)] == [job.name]
        launcher.discard(t, "t1", JOB_ID, [w.worker_id])
        wait_for(lambda: not _jobs(launcher, t), 30, what="the stuck Job deleted")
        assert launcher.ensure(t, "t1", [group]) == []
        assert [j.index for j in _jobs(launcher, t)] == [2]
