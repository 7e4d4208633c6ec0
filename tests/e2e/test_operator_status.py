"""Issue 13 on the real cluster: one status truth (a refused spec change never flaps and never
shows with Completed), deleting an ImportJob cancels its database job and a re-apply resumes
at once, and an operator without a peering object works standalone and says so."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from .harness.cluster import Cluster
from .harness.operatorkit import (
    Harness,
    OperatorProcess,
    Tenant,
    apply,
    conditions,
    create_secret,
    importjob,
    is_true,
    small_spec,
    status_history,
    watch_importjobs,
)


def test_a_refused_spec_change_holds_until_completion_without_flapping(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    """uncoveredRows (plan-shaping, not refused by CEL) changed mid-run: the engine refuses it
    and records the refusal in the job row, so every status writer (reconcile, Job events)
    reports Invalid=True SpecChangeRefused until the import completes; then Completed=True with
    Invalid=False (SpecChangeNotApplied), never both True; one aggregated warning Event."""
    ns, name = namespace, "refused"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"ref_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=200)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    body = importjob(name, ns, t.name, **small_spec(50, 50, 400, hold=0.5))
    with k8s_cluster.api_client() as api:
        rec = watch_importjobs(api, ns)
        try:
            apply(k8s_cluster, body)
            h.wait(name, lambda s: s.get("summary") == "Running", "Running", 60)
            body["spec"]["uncoveredRows"] = "Skip"
            apply(k8s_cluster, body)
            st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed", 180)
            time.sleep(2)  # more timer ticks and Job events: the final status must hold
        finally:
            rec.stop()
    with h.explained():
        history = [s for s in status_history(rec, name) if s.get("conditions")]
        summaries = [s.get("summary") for s in history]
        refused_at = next(
            i
            for i, s in enumerate(history)
            if conditions(s).get("Invalid", {}).get("reason") == "SpecChangeRefused"
        )
        done_at = next(i for i, s in enumerate(history) if is_true(s, "Completed"))
        # from the refusal to the completion: Invalid, every status, whoever wrote it
        for s in history[refused_at:done_at]:
            inv = conditions(s)["Invalid"]
            assert (inv["status"], inv["reason"]) == ("True", "SpecChangeRefused"), summaries
            assert s["summary"] == "Invalid", summaries
        assert set(summaries[done_at:]) == {"Completed"}, summaries
        assert not any(is_true(s, "Invalid") and is_true(s, "Completed") for s in history)
        final = conditions(h.status(name))
        assert final["Invalid"]["status"] == "False"
        assert final["Invalid"]["reason"] == "SpecChangeNotApplied"
        assert "uncoveredRows cannot change" in final["Invalid"]["message"]
        assert st["summary"] == "Completed"
        refusals = [e for e in h.events(name) if e["reason"] == "SpecChangeRefused"]
        assert len(refusals) == 1, refusals  # one object; repeats only bump its count
        assert refusals[0]["type"] == "Warning"


def test_delete_cancels_the_database_job_and_a_reapply_resumes_at_once(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    ns, name = namespace, "again"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"del_{uuid.uuid4().hex[:8]}")
    data = t.generate(job_id, orders=200)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    body = importjob(name, ns, t.name, **small_spec(50, 50, 400, hold=3))
    apply(k8s_cluster, body)

    def out(bs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [b for b in bs if b["status"] in ("dispatched", "processing")]

    h.wait_for(lambda: len(out(t.batches(job_id))) >= 2, ">= 2 batches handed to workers", 60)
    r = k8s_cluster.kubectl("-n", ns, "delete", "importjob", name, "--timeout=30s", check=False)
    if r.returncode != 0:
        h.fail(f"kubectl delete importjob failed: {r.stderr}")
    with h.explained():
        job = t.query(
            "SELECT status, status_code, status_reason FROM import_jobs WHERE job_id = %s",
            (job_id,),
        )[0]
        assert (job["status"], job["status_code"]) == ("cancelled", "ImportJobDeleted"), job
        assert f"{ns}/{name} was deleted" in job["status_reason"]
        # released to pending, data kept (a worker mid-transaction may still finish its batch)
    h.wait_for(lambda: not out(t.batches(job_id)), "no batch left handed to a worker", 15)
    released = [b for b in t.batches(job_id) if "was deleted" in (b["last_error"] or "")]
    assert released, t.batches(job_id)

    t0 = time.monotonic()
    apply(k8s_cluster, body)
    h.wait_for(lambda: out(t.batches(job_id)), "a batch dispatched again after the re-apply", 10)
    resumed = time.monotonic() - t0
    st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed after the re-apply", 180)
    with h.explained():
        assert resumed < 10, resumed
        assert t.target_counts(job_id) == {
            "customers": data.customers,
            "transactions": data.orders,
            "transaction_lines": data.lines,
        }
        assert st["progress"] == "100%"
        assert t.scalar("SELECT status FROM import_jobs WHERE job_id = %s", (job_id,)) == (
            "completed"
        )


def test_without_a_peering_object_the_operator_runs_standalone_and_warns(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    ns, name = namespace, "unpeered"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"peer_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=50)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = OperatorProcess(
        k8s_cluster,
        [ns],
        k8s_cluster.workdir / "operator" / f"unpeered-{uuid.uuid4().hex[:6]}.log",
        {"IMPORTWAVES_PEERING": f"nosuch-{uuid.uuid4().hex[:6]}"},
        standalone=False,
    ).start()
    try:
        h = harness(ns, [op], [t])
        apply(k8s_cluster, importjob(name, ns, t.name, **small_spec()))
        h.wait(name, lambda s: is_true(s, "Completed"), "Completed without peering", 120)
        with h.explained():
            log = op.log()
            assert "running STANDALONE" in log, op.log_tail()
            assert "KopfPeering 'nosuch-" in log and f"in namespace(s) {ns}" in log
    finally:
        k8s_cluster.kubectl("-n", ns, "delete", "importjobs", "--all", "--timeout=30s", check=False)
        op.stop()
