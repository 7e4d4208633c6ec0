"""Worker pods that start slowly or never (issues 12/13), in process mode (no image needed).

* A worker pod that can never start (here: an image name the kubelet cannot parse, so the pod
  waits in InvalidImageName, as a real kubelet keeps it) is a launch problem: the batches'
  attempts fail with the pod, the kubelet's reason and its message; the ImportJob says so in its
  conditions, a Warning LaunchFailed Event and `kubectl describe`, without a secret; once the
  image is fixed, `retry-failed` completes the import on a new Job (the stuck one is gone).
* Worker pods slower to start than the claim timeout cost no attempt: with `retries: 0` and
  a pod start latency above `claimTimeoutSeconds` (the defaults otherwise), every batch
  completes in its first attempt.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from importwaves.k8s.crd import ImportJobSpec
from importwaves.verify import verify_import

from .harness.cluster import Cluster
from .harness.localkubelet import LocalKubelet
from .harness.operatorkit import (
    Harness,
    OperatorProcess,
    Tenant,
    apply,
    conditions,
    create_secret,
    created_jobs,
    importjob,
    is_true,
    small_spec,
    watch_jobs,
)

BAD_IMAGE = "Importwaves Not An Image"
KUBELET_SAYS = f'couldn\'t parse image name "{BAD_IMAGE}": invalid reference format'


def test_a_worker_pod_that_cannot_start_is_reported_and_retry_after_the_fix_completes(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
    local_kubelet: LocalKubelet,
) -> None:
    ns, name = namespace, "no-start"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"nostart_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=20)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    body = importjob(
        name,
        ns,
        t.name,
        **small_spec(retries=1, worker={"image": BAD_IMAGE, "command": ["importwaves", "worker"]}),
    )
    with k8s_cluster.api_client() as api:
        jobs = watch_jobs(api, ns)
        try:
            apply(k8s_cluster, body)
            st = h.wait(name, lambda s: s.get("summary") == "Failed", "summary Failed", 120)
            with h.explained():
                failed = conditions(st)["Failed"]
                assert failed["status"] == "True", failed
                msg = failed["message"]
                assert "launch failed: worker pod " in msg and " cannot start: " in msg, msg
                assert "InvalidImageName" in msg and KUBELET_SAYS in msg, msg
                assert f"{name}-customer-w1-" in msg, msg  # names the pod
                rows = t.batches(job_id)
                first = [b for b in rows if b["wave_number"] == 1]
                assert first and all(b["status"] == "failed" for b in first), first
                assert all(b["attempts"] == 2 for b in first), first  # retries=1: two attempts
                assert all("InvalidImageName" in b["last_error"] for b in first)
                # no batch of a later wave was dispatched or counted
                assert all(b["attempts"] == 0 for b in rows if b["wave_number"] != 1)
                launch = [e for e in h.events(name) if e.get("reason") == "LaunchFailed"]
                assert launch, h.event_reasons(name)
                assert all(e["type"] == "Warning" for e in launch)
                assert any(
                    "wave 1 (Customer)" in e["message"] and KUBELET_SAYS in e["message"]
                    for e in launch
                ), launch
                described = k8s_cluster.kubectl("-n", ns, "describe", "importjob", name).stdout
                assert "LaunchFailed" in described and "InvalidImageName" in described
                password = t.dsn.split("@")[0].rsplit(":", 1)[-1]
                for text in (described, msg, *[e["message"] for e in launch]):
                    assert t.dsn not in text and (len(password) < 4 or password not in text)
                # the stuck pods' Jobs were deleted once their problem was recorded
                h.wait_for(
                    lambda: (
                        not any(
                            j["metadata"]["name"].startswith(f"{name}-customer-w1-")
                            for j in h.jobs()
                        )
                    ),
                    "the stuck Jobs to be deleted",
                    60,
                )

            # Fix the image, ask for a retry: a new Job with the fixed pod settings completes.
            k8s_cluster.kubectl(
                "-n",
                ns,
                "patch",
                "importjob",
                name,
                "--type=merge",
                "-p",
                '{"spec": {"worker": {"image": "importwaves:fixed"}}}',
            )
            k8s_cluster.kubectl(
                "-n", ns, "annotate", "importjob", name, "importwaves.io/retry-failed=fixed-1"
            )
            st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed after the fix", 120)
        finally:
            jobs.stop()
    with h.explained():
        assert st["summary"] == "Completed"
        progressing = conditions(st)["Progressing"]
        assert "cannot be started" not in progressing["message"], progressing
        with t.connect() as conn:
            v = verify_import(
                conn, job_id, ImportJobSpec.model_validate(body["spec"]).engine_spec()
            )
        assert v.ok, v.failures()
        made = created_jobs(jobs)
        assert [j.wave for j in made].count(1) >= 2, made  # the stuck ones, then a fixed one


def test_worker_pods_slower_than_the_claim_timeout_cost_no_attempt(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
    local_kubelet: LocalKubelet,
) -> None:
    ns, name = namespace, "slow-pods"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"slowpod_{uuid.uuid4().hex[:8]}")
    data = t.generate(job_id, orders=200)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    # claimTimeoutSeconds 5 (its minimum); every pod waits 8 s in ContainerCreating; retries 0:
    # one counted attempt would fail its batch and the import
    body = importjob(
        name, ns, t.name, **small_spec(retries=0, staleAfterSeconds=60, claimTimeoutSeconds=5)
    )
    old, local_kubelet.start_latency = local_kubelet.start_latency, 8.0
    try:
        apply(k8s_cluster, body)
        st = h.wait(name, lambda s: s.get("summary") in ("Completed", "Failed"), "the end", 240)
    finally:
        local_kubelet.start_latency = old
    with h.explained():
        assert st["summary"] == "Completed", st
        rows = t.batches(job_id)
        assert rows and all(b["status"] == "completed" for b in rows)
        assert {b["attempts"] for b in rows} == {1}, [
            (b["batch_id"], b["attempts"], b["last_error"]) for b in rows if b["attempts"] != 1
        ]
        # the pods were slower than the claim timeout: batches were claimed later than that
        waits = t.query(
            "SELECT extract(epoch FROM started_at - dispatched_at)::float AS s "
            "FROM wave_batches WHERE job_id = %s",
            (job_id,),
        )
        assert max(w["s"] for w in waits) > 5, waits
        # the operator's sweeps (every second) let them wait: none released or counted
        waited = op.log_events("unclaimed_batch_released") + op.log_events("stuck_batch_requeued")
        assert not waited, waited
        assert t.target_counts(job_id)["transaction_lines"] == data.lines, data
