"""ImportJob lifecycle on the real cluster: deletion (garbage collection of its Jobs, tenant data
kept), a missing Secret (Blocked, then proceeds), the manual reconcile annotation, long names."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from importwaves.k8s.crd import ImportJobSpec
from importwaves.verify import verify_import

from .harness.cluster import Cluster
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
from .harness.waits import wait_for

SMALL = small_spec(100, 50)


def test_deleting_an_importjob_removes_its_jobs_and_keeps_tenant_data(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    """Workers that import their batch and then linger (sleep) keep their Jobs alive; deleting
    the ImportJob deletes them through ownerReferences (the garbage collector), their pods too,
    and leaves every imported row and the engine's bookkeeping in the tenant database."""
    ns, name = namespace, "deleted"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"gc_{uuid.uuid4().hex[:8]}")
    data = t.generate(job_id, orders=300)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    lingering = {
        "image": "importwaves:test",
        "command": ["sh", "-c", 'importwaves worker; rc=$?; sleep 120 & wait "$!"; exit "$rc"'],
    }
    apply(k8s_cluster, importjob(name, ns, t.name, **{**SMALL, "worker": lingering}))

    def live_jobs() -> list[str]:
        return [j["metadata"]["name"] for j in h.jobs()]

    # Wave 1 imported by a Job still alive, wave 2 under way with live Jobs.
    h.wait_for(
        lambda: (
            t.target_counts(job_id)["customers"] == data.customers
            and t.target_counts(job_id)["transactions"] > 0
            and len(live_jobs()) >= 2
        ),
        "customers imported, some sales orders imported, >= 2 live (wave) Jobs",
        60,
    )
    with h.explained():
        obj = h.get(name)
        assert obj is not None
        uid = obj["metadata"]["uid"]
        for j in h.jobs():
            refs = j["metadata"]["ownerReferences"]
            assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [
                ("ImportJob", name, uid, True)
            ]
        before = t.target_counts(job_id)
        batches_before = len(t.batches(job_id))

    r = k8s_cluster.kubectl("-n", ns, "delete", "importjob", name, "--timeout=30s", check=False)
    if r.returncode != 0:
        h.fail(f"kubectl delete importjob failed: {r.stderr}")
    h.wait_for(lambda: not live_jobs(), "the garbage collector to delete the Jobs", 60)
    h.wait_for(lambda: not h.pods(), "the worker pods to be deleted", 60)
    time.sleep(2)  # nothing left to import anything
    with h.explained():
        after = t.target_counts(job_id)
        assert after["customers"] == data.customers
        for table, n in before.items():
            assert after[table] >= n, (table, before, after)
        # Completions reach the operator at commit (NOTIFY), so the import may have gone on
        # (derived batches created) between `before` and the deletion; none are lost.
        batches_after = len(t.batches(job_id))
        assert batches_after >= batches_before
        assert t.scalar("SELECT count(*) FROM import_jobs WHERE job_id = %s", (job_id,)) == 1
        assert t.scalar("SELECT count(*) FROM staging_records WHERE job_id = %s", (job_id,)) == (
            data.customers + data.orders + data.lines
        )
        assert after == t.target_counts(job_id)  # stable: no worker is left
        assert len(t.batches(job_id)) == batches_after  # and no operator acts on it
        assert h.get(name) is None


def test_missing_secret_blocks_then_proceeds_and_manual_reconcile(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    ns, name = namespace, "needs-secret"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"sec_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=100)
    op = operator(ns)
    h = harness(ns, [op], [t])
    body = importjob(name, ns, t.name, secret="late-secret", **SMALL)
    apply(k8s_cluster, body)
    st = h.wait(
        name,
        lambda s: conditions(s).get("DatabaseReady", {}).get("status") == "False",
        "DatabaseReady=False",
        30,
    )
    with h.explained():
        db = conditions(st)["DatabaseReady"]
        assert db["reason"] == "SecretMissing"
        assert f"Secret {ns}/late-secret not found" in db["message"]
        assert st["summary"] == "Blocked"
        assert not is_true(st, "Invalid")
        assert "SecretMissing" in h.event_reasons(name)
        assert not h.jobs()
        # Nothing was written to the tenant database.
        assert t.scalar("SELECT count(*) FROM import_jobs") == 0

    create_secret(k8s_cluster, ns, "late-secret", t.dsn)
    st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed once the Secret exists", 60)
    with h.explained():
        db = conditions(st)["DatabaseReady"]
        assert (db["status"], db["reason"]) == ("True", "Connected")
        with t.connect() as conn:
            v = verify_import(
                conn, job_id, ImportJobSpec.model_validate(body["spec"]).engine_spec()
            )
        assert v.ok, v.failures()

    # The manual reconcile annotation: handled once per value, with an Event.
    k8s_cluster.kubectl("-n", ns, "annotate", "importjob", name, "importwaves.io/reconcile=r1")
    st = h.wait(name, lambda s: s.get("handledReconcile") == "r1", "handledReconcile=r1", 30)
    h.wait_for(
        lambda: len(h.event_reasons(name).get("ManualReconcile", [])) == 1,
        "one ManualReconcile event",
        20,
    )
    k8s_cluster.kubectl(
        "-n", ns, "annotate", "--overwrite", "importjob", name, "importwaves.io/reconcile=r2"
    )
    st = h.wait(name, lambda s: s.get("handledReconcile") == "r2", "handledReconcile=r2", 30)
    time.sleep(2)  # a few timer ticks: the same value is not handled again
    with h.explained():
        events = h.events(name)
        manual = [e for e in events if e["reason"] == "ManualReconcile"]
        assert sum(e.get("count", 1) for e in manual) == 2, manual
        assert all(e["type"] == "Normal" for e in manual)
        assert st["summary"] == "Completed"  # a reconcile of a completed import changes nothing


def test_long_dotted_name_runs(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    """ImportJob names may have 253 characters and dots; Job names and label values may not:
    an 80-character dotted name still gets valid worker Jobs and completes."""
    ns = namespace
    name = "quarterly.customer-and-order-import." + "x" * 30 + ".2026-q1"
    assert len(name) > 63
    job_id = "long-name-import"
    t = tenant_db(f"long_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=60)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    with k8s_cluster.api_client() as api:
        jobs = watch_jobs(api, ns)
        try:
            apply(k8s_cluster, importjob(name, ns, t.name, importId=job_id, **SMALL))
            st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed", 60)
        finally:
            jobs.stop()
    with h.explained():
        made = created_jobs(jobs)
        assert made and all(j.owner == name for j in made)
        assert all(len(j.name) <= 63 and "." not in j.name for j in made)
        assert st["batches"]["done"] == st["batches"]["total"] == len(t.batches(job_id))
        # one Job per wave, its name cut with a digest (the name itself is too long)
        assert {j.wave for j in made} == {1, 2, 3}, made
        assert all(j.name.startswith("quarterly-customer-and-order-import-") for j in made)
        assert all(j.name.endswith(f"-w{j.wave}-{j.index}") for j in made), made


def test_suspend_stops_new_jobs_and_resume_completes(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    ns, name = namespace, "suspended"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"susp_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=80)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    spec = small_spec(100, 20, parallelism=2, hold=0.5)
    body = importjob(name, ns, t.name, **spec)

    def patch_suspend(value: bool) -> None:
        k8s_cluster.kubectl(
            "-n",
            ns,
            "patch",
            "importjob",
            name,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"suspend": value}}),
        )

    with k8s_cluster.api_client() as api:
        jobs = watch_jobs(api, ns)
        try:
            apply(k8s_cluster, body)
            h.wait_for(
                lambda: any(
                    b["record_type_id"] == -30 and b["status"] == "completed"
                    for b in t.batches(job_id)
                ),
                "a SalesOrder batch completed",
                60,
                0.1,
            )
            patch_suspend(True)
            st = h.wait(name, lambda s: s.get("summary") == "Suspended", "summary Suspended", 30)
            with h.explained():
                assert is_true(st, "Suspended")
                assert st["observedGeneration"] == 2
                h.wait_for(lambda: not h.jobs(), "the in-flight Job to finish", 30)
                created = len(created_jobs(jobs))
                time.sleep(3)  # several timer ticks
                assert len(created_jobs(jobs)) == created, "a Job was created while suspended"
                assert any(b["status"] == "pending" for b in t.batches(job_id))
            patch_suspend(False)
            st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed after resume", 60)
        finally:
            jobs.stop()
    with h.explained():
        assert not is_true(st, "Suspended")
        assert st["observedGeneration"] == 3
        with t.connect() as conn:
            v = verify_import(
                conn, job_id, ImportJobSpec.model_validate(body["spec"]).engine_spec()
            )
        assert v.ok, v.failures()


def test_importjobs_with_the_legacy_kopf_finalizer_are_not_stuck(
    k8s_cluster: Cluster, namespace: str, operator: Callable[..., OperatorProcess]
) -> None:
    """ImportJobs from an operator version that used kopf's default finalizer: the one deleted
    while no operator ran goes away once this operator starts, the live one gets the
    importwaves.io/ finalizer instead and can be deleted."""
    from importwaves.k8s.handlers import FINALIZER, LEGACY_FINALIZER

    ns = namespace

    def get(name: str) -> dict[str, Any] | None:
        r = k8s_cluster.kubectl("-n", ns, "get", "importjob", name, "-o", "json", check=False)
        if r.returncode != 0:
            assert "NotFound" in r.stderr, r.stderr
            return None
        obj: dict[str, Any] = json.loads(r.stdout)
        return obj

    for name in ("legacy-live", "legacy-deleted"):
        body = importjob(name, ns, "legacy")
        body["metadata"]["finalizers"] = [LEGACY_FINALIZER]
        apply(k8s_cluster, body)
    k8s_cluster.kubectl("-n", ns, "delete", "importjob", "legacy-deleted", "--wait=false")
    held = get("legacy-deleted")
    assert held is not None and held["metadata"].get("deletionTimestamp"), held
    assert held["metadata"]["finalizers"] == [LEGACY_FINALIZER]

    op = operator(ns)
    try:
        wait_for(lambda: get("legacy-deleted") is None, 30, what="legacy-deleted to go away")
        wait_for(
            lambda: (get("legacy-live") or {}).get("metadata", {}).get("finalizers") == [FINALIZER],
            30,
            what=f"legacy-live to carry only {FINALIZER}",
        )
        r = k8s_cluster.kubectl(
            "-n", ns, "delete", "importjob", "legacy-live", "--timeout=30s", check=False
        )
        assert r.returncode == 0, r.stderr
        assert get("legacy-live") is None
    except AssertionError:
        print(op.log_tail(80))
        raise
    assert "removed the legacy finalizer" in op.log()
