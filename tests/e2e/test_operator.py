"""The operator end to end: `importwaves run` against the real kube-apiserver, worker pods run by
the local kubelet, imports into the real test PostgreSQL (issue 4).

Each test starts its own operator scoped to its namespace (`--namespace`), so tests never see
each other's objects; the cluster, the local kubelet and PostgreSQL are shared by the session.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from importwaves.k8s.crd import ImportJobSpec
from importwaves.verify import verify_import

from .harness.cluster import Cluster
from .harness.operatorkit import (
    EXAMPLES,
    Harness,
    OperatorProcess,
    Tenant,
    conditions,
    created_jobs,
    created_pods,
    deleted_unfinished,
    example_importjob,
    is_true,
    overlapping_jobs,
    status_history,
    watch_importjobs,
    watch_jobs,
    watch_pods,
)


def completed(st: dict[str, Any]) -> bool:
    return is_true(st, "Completed")


def finished(st: dict[str, Any]) -> bool:
    return st.get("summary") in ("Completed", "Failed", "Invalid")


def assert_verified(t: Tenant, job_id: str, spec: dict[str, Any]) -> None:
    with t.connect() as conn:
        v = verify_import(conn, job_id, ImportJobSpec.model_validate(spec).engine_spec())
    assert v.ok, f"verification of {job_id} in {t.name} failed: {v.failures()}"


@pytest.fixture
def examples_namespace(k8s_cluster: Cluster) -> Iterator[str]:
    """The examples' namespace `imports`, applied from examples/namespace.yaml."""
    k8s_cluster.kubectl("apply", "-f", str(EXAMPLES / "namespace.yaml"))
    try:
        yield "imports"
    finally:
        k8s_cluster.kubectl("delete", "namespace", "imports", "--wait=false", check=False)


def test_examples_run_to_completion(
    k8s_cluster: Cluster,
    examples_namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    """kubectl apply of the examples: the import passes through DerivedPending=True, ends
    Completed=True, the target tables verify, printer columns and `kubectl wait` work."""
    ns = examples_namespace
    manifest = example_importjob()
    assert manifest["metadata"]["namespace"] == ns
    name, job_id = manifest["metadata"]["name"], manifest["spec"]["importId"]
    t = tenant_db(manifest["spec"]["tenant"])
    data = t.generate(job_id, orders=2000)
    k8s_cluster.kubectl(
        "-n", ns, "create", "secret", "generic", "demo-tenant-db", f"--from-literal=dsn={t.dsn}"
    )
    op = operator(ns)
    h = harness(ns, [op], [t])
    with k8s_cluster.api_client() as api:
        rec = watch_importjobs(api, ns)
        jobs = watch_jobs(api, ns)
        pods = watch_pods(api, ns)
        try:
            k8s_cluster.kubectl("apply", "-f", str(EXAMPLES / "importjob.yaml"))
            r = k8s_cluster.kubectl(
                "-n",
                ns,
                "wait",
                "--for=condition=Completed",
                f"importjob/{name}",
                "--timeout=120s",
                check=False,
                timeout=150,
            )
            if r.returncode != 0:
                h.fail(f"kubectl wait exited {r.returncode}: {r.stdout}{r.stderr}")
            time.sleep(3)  # a few more timer ticks and Job events: Completed must stay
        finally:
            rec.stop()
            jobs.stop()
            pods.stop()

    with h.explained():
        st = h.status(name)
        assert st["summary"] == "Completed"
        conds = conditions(st)
        assert conds["Completed"]["status"] == "True"
        assert conds["Completed"]["reason"] == "AllWavesCompleted"
        assert conds["DerivedPending"]["status"] == "False"
        assert conds["Failed"]["status"] == "False"
        assert conds["Invalid"]["status"] == "False"
        assert conds["DatabaseReady"]["status"] == "True"
        assert st["waves"] == {"done": 3, "total": 3}
        assert st["batches"] == {"done": 9, "total": 9}, st
        assert st["jobId"] == job_id
        assert st["observedGeneration"] == 1

        # It passed through DerivedPending=True (derived batches pending or active), and
        # only after the main waves, and Completed only after that.
        history = status_history(rec, name)
        assert not rec.errors, rec.errors
        summaries = [s.get("summary") for s in history]
        dp = [i for i, s in enumerate(history) if is_true(s, "DerivedPending")]
        assert dp, f"DerivedPending=True never observed; summaries seen: {summaries}"
        for i in dp:  # derived batches pending/active, or parents awaiting their creation
            msg = conditions(history[i])["DerivedPending"]["message"]
            assert history[i].get("derivedPending", 0) > 0 or "awaiting" in msg, history[i]
        first_done = next(i for i, s in enumerate(history) if completed(s))
        assert max(dp) < first_done
        assert not any(is_true(s, "Completed") and is_true(s, "DerivedPending") for s in history)
        after = [s.get("summary") for s in history[first_done:]]
        assert set(after) == {"Completed"}, f"status left Completed: {summaries}"
        assert "Running" in summaries[: dp[0] + 1]
        assert summaries[-1] == "Completed"
        assert_verified(t, job_id, manifest["spec"])
        counts = t.target_counts(job_id)
        assert counts == {
            "customers": data.customers,
            "transactions": data.orders,
            "transaction_lines": data.lines,
        }

        # The STATUS sequence never goes back (no flapping): Pending, Running while the main
        # waves run, DerivedPending when only derived work is left, then Completed.
        order = ["Pending", "Running", "DerivedPending", "Completed"]
        ranks = [order.index(x) for x in summaries if x]
        assert ranks == sorted(ranks), f"STATUS went back: {summaries}"
        # PROGRESS: a total fixed at planning (rows staged), so the figure never goes down.
        totals = {s["rowsToImport"] for s in history if "rowsToImport" in s and s.get("jobId")}
        assert totals == {data.customers + data.orders + data.lines}, totals
        imported = [s["rowsImported"] for s in history if "rowsImported" in s]
        assert imported == sorted(imported), imported
        for s in history:
            if s.get("conditions"):
                prog = conditions(s)["Progressing"]
                assert prog["message"].strip(), s
        assert st["startTime"] and st["completionTime"] and st["duration"]
        assert st["progress"] == "100%"

        # Printer columns.
        out = k8s_cluster.kubectl("-n", ns, "get", "importjobs").stdout.splitlines()
        assert re.split(r"\s{2,}", out[0].strip()) == [
            "NAME",
            "READY",
            "STATUS",
            "PROGRESS",
            "ACTIVE",
            "FAILED",
            "WAITING",
            "AGE",
        ], out
        assert out[1].split()[:6] == [name, "True", "Completed", "100%", "0", "0"], out
        wide = k8s_cluster.kubectl("-n", ns, "get", "importjobs", "-o", "wide").stdout
        assert re.split(r"\s{2,}", wide.splitlines()[0].strip())[-3:] == [
            "MESSAGE",
            "STARTED",
            "DURATION",
        ], wide
        assert st["duration"] in wide.splitlines()[1]
        short = k8s_cluster.kubectl("-n", ns, "get", "ij", name).stdout
        assert "Completed" in short

        reasons = h.event_reasons(name)
        assert "WaveDispatched" in reasons, reasons
        assert "CompletionGuard" in reasons, reasons
        assert any("wave 3 (TransactionLine, derived)" in m for m in reasons["WaveDispatched"])
        assert any("wave 2 (SalesOrder)" in m for m in reasons["WaveDispatched"]), reasons
        # once per import, from one reporting component
        assert len(reasons.get("ImportCompleted", [])) == 1, reasons
        events = h.events(name)
        assert {(e.get("source") or {}).get("component") for e in events} == {"importwaves"}
        assert "JobsAdopted" not in reasons, reasons
        # One work-queue Job per wave (pooled workers), named for the ImportJob, record type
        # and wave; each deleted only after it finished (its pods' ends recorded): none left.
        h.wait_for(lambda: not h.jobs(), "the finished worker Jobs to be deleted", timeout=30)
        # ... the last of them without the tenant's engine: it is evicted at completion and not
        # made again to delete a Job of the Completed import (before: 5 engines for this run).
        # A timer tick that read the status just before Completed may make it once more.
        created = [e for e in op.log_events("tenant_engine_created") if e["tenant"] == t.name]
        evicted = [e for e in op.log_events("tenant_engine_evicted") if e["tenant"] == t.name]
        assert len(created) == len(evicted) and 1 <= len(created) <= 2, (created, evicted)
        made = created_jobs(jobs)
        workers = created_pods(pods)
        spec = ImportJobSpec.model_validate(manifest["spec"])
        waves = len(spec.recordTypes) + len(spec.derivedTypes)
        restarts = sum(1 for j in made if j.index > 1)
        print(
            f"\nworker objects for {len(t.batches(job_id))} batches in {waves} waves: "
            f"{len(made)} Jobs ({restarts} restarted), {len(workers)} pods: "
            + ", ".join(j.name for j in made)
        )
        assert {j.wave for j in made} == set(range(1, waves + 1)), made
        assert len(made) <= waves + restarts
        assert all(j.name == f"{name}-{j.record_type.lower()}-w{j.wave}-{j.index}" for j in made)
        assert len(workers) <= waves * spec.parallelism + restarts * spec.parallelism, workers
        assert not overlapping_jobs(jobs), overlapping_jobs(jobs)
        assert not deleted_unfinished(jobs), deleted_unfinished(jobs)

        # `kubectl wait` on an already completed import returns at once.
        again = k8s_cluster.kubectl(
            "-n", ns, "wait", "--for=condition=Completed", f"importjob/{name}", "--timeout=5s"
        )
        assert again.returncode == 0
