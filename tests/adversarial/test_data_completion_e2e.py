"""Adversarial cases for data-level completion on the real API server (issue 11): the operator as
a subprocess, worker pods run by the test cluster's local kubelet as local processes, the tenant
in the session's PostgreSQL (the e2e kit, tests/e2e/harness/operatorkit.py).

- a `spec.worker.command` that exits 0 and writes nothing: the ImportJob never reports
  Completed; each Job's success is a failed attempt and the import ends Failed;
- an importId with no staging rows: Invalid=True, reason NoStagingRecords, never Completed;
- derived rows with a NULL or unknown parent: Invalid=True, reason UncoveredStagingRows with the
  count and first ids; with `uncoveredRows: Skip` the import completes and `status.rows` reports
  the skipped count.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from e2e.conftest import (  # noqa: F401
    crds,
    harness,
    k8s_cluster,
    local_kubelet,
    namespace,
    operator,
    tenant_db,
)

# The e2e fixtures (cluster, local kubelet, namespace, operator, tenant, harness), shared with
# tests/e2e; imported here so these cases live in tests/adversarial.
from e2e.harness.cluster import Cluster
from e2e.harness.operatorkit import (
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
    status_history,
    watch_importjobs,
    watch_jobs,
)
from importwaves.engine.listener import EXIT_WITHOUT_COMPLETION

pytestmark = pytest.mark.e2e


def test_worker_command_that_exits_0_and_writes_nothing_is_never_completed(
    k8s_cluster: Cluster,  # noqa: F811
    namespace: str,  # noqa: F811
    tenant_db: Callable[[str], Tenant],  # noqa: F811
    operator: Callable[..., OperatorProcess],  # noqa: F811
    harness: Callable[..., Harness],  # noqa: F811
) -> None:
    ns, name = namespace, "exits-0"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"exit0_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=20)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    spec = small_spec(retries=2, worker={"image": "busybox", "command": ["sh", "-c", "exit 0"]})
    with k8s_cluster.api_client() as api:
        rec = watch_importjobs(api, ns)
        jobs = watch_jobs(api, ns)
        try:
            apply(k8s_cluster, importjob(name, ns, t.name, **spec))
            st = h.wait(name, lambda s: s.get("summary") == "Failed", "summary Failed", 120)
        finally:
            rec.stop()
            jobs.stop()
    with h.explained():
        history = status_history(rec, name)
        assert history, "no status was ever recorded"
        assert not any(is_true(s, "Completed") for s in history), "Completed was reported"
        assert not any(s.get("summary") == "Completed" for s in history)
        failed = conditions(st)["Failed"]
        assert failed["status"] == "True"
        assert "worker exited 0 without recording its completion" in failed["message"], failed
        [bad] = [b for b in t.batches(job_id) if b["status"] == "failed"]
        assert bad["record_type_id"] == -2  # the first wave never got through
        assert bad["attempts"] == 3
        assert bad["last_error"] == EXIT_WITHOUT_COMPLETION
        tries = [j for j in created_jobs(jobs) if j.wave == 1]
        assert tries, "no worker Job for wave 1"
        assert bad["dispatch_seq"] == 3  # three dispatches, each claimed and run, none completed
        assert {b["status"] for b in t.batches(job_id) if b["record_type_id"] != -2} == {"pending"}
        assert t.target_counts(job_id) == {
            "customers": 0,
            "transactions": 0,
            "transaction_lines": 0,
        }
        print(
            f"exit-0 worker on the cluster: {len(tries)} wave Job(s), 3 attempts, "
            "0 batches completed, "
            f"summary {st['summary']}"
        )


def test_import_id_with_no_staging_rows_is_invalid_never_completed(
    k8s_cluster: Cluster,  # noqa: F811
    namespace: str,  # noqa: F811
    tenant_db: Callable[[str], Tenant],  # noqa: F811
    operator: Callable[..., OperatorProcess],  # noqa: F811
    harness: Callable[..., Harness],  # noqa: F811
) -> None:
    ns, name = namespace, "typo"
    t = tenant_db(f"typo_{uuid.uuid4().hex[:8]}")
    t.generate("the-real-import", orders=50)  # staged, under another import id
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    body = importjob(name, ns, t.name, importId="the-reel-import", **small_spec())
    with k8s_cluster.api_client() as api:
        rec = watch_importjobs(api, ns)
        try:
            apply(k8s_cluster, body)
            st = h.wait(
                name,
                lambda s: conditions(s).get("Invalid", {}).get("reason") == "NoStagingRecords",
                "Invalid=True NoStagingRecords",
                90,
            )
            r = k8s_cluster.kubectl(
                "-n", ns, "wait", "--for=condition=Completed", f"importjob/{name}",
                "--timeout=5s", check=False, timeout=30,
            )  # fmt: skip
        finally:
            rec.stop()
    with h.explained():
        assert r.returncode != 0, "kubectl wait --for=condition=Completed succeeded"
        inv = conditions(st)["Invalid"]
        assert inv["status"] == "True"
        assert "'the-reel-import'" in inv["message"] and f"'{t.name}'" in inv["message"], inv
        assert st["summary"] == "Invalid"
        done = conditions(st)["Completed"]
        assert (done["status"], done["reason"]) == ("False", "NoStagingRecords")
        assert st["rows"]["Customer"] == {"staged": 0, "imported": 0, "skipped": 0}
        assert not any(is_true(s, "Completed") for s in status_history(rec, name))
        assert t.batches("the-reel-import") == []
        print(f"no staging rows on the cluster: Invalid/{inv['reason']}: {inv['message']}")


@pytest.mark.parametrize("policy", ["Fail", "Skip"])
def test_derived_rows_with_unknown_parent_block_or_are_skipped(
    k8s_cluster: Cluster,  # noqa: F811
    namespace: str,  # noqa: F811
    tenant_db: Callable[[str], Tenant],  # noqa: F811
    operator: Callable[..., OperatorProcess],  # noqa: F811
    harness: Callable[..., Harness],  # noqa: F811
    policy: str,
) -> None:
    ns, name = namespace, f"orphans-{policy.lower()}"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"orph_{uuid.uuid4().hex[:8]}")
    data = t.generate(job_id, orders=100)
    with t.connect() as conn:
        conn.execute(
            "INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload) "
            'VALUES (%s, -13, 800001, NULL, \'{"amount": "1.00"}\'), '
            '(%s, -13, 800002, 424242, \'{"amount": "2.00"}\')',
            (job_id, job_id),
        )
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    body = importjob(name, ns, t.name, **small_spec(), uncoveredRows=policy)
    with k8s_cluster.api_client() as api:
        rec = watch_importjobs(api, ns)
        try:
            apply(k8s_cluster, body)
            if policy == "Fail":
                st = h.wait(
                    name,
                    lambda s: (
                        conditions(s).get("Invalid", {}).get("reason") == "UncoveredStagingRows"
                    ),
                    "Invalid=True UncoveredStagingRows",
                    90,
                )
            else:
                st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed", 120)
        finally:
            rec.stop()
    with h.explained():
        history = status_history(rec, name)
        if policy == "Fail":
            inv = conditions(st)["Invalid"]
            assert inv["status"] == "True"
            assert "2 staging row(s)" in inv["message"], inv
            assert "TransactionLine (-13): 2 row(s)" in inv["message"]
            assert "first ids 800001, 800002" in inv["message"]
            assert st["summary"] == "Invalid"
            assert not any(is_true(s, "Completed") for s in history)
            assert t.batches(job_id) == []
            print(f"orphans on the cluster (Fail): {inv['message']}")
        else:
            assert st["summary"] == "Completed"
            assert st["rows"]["TransactionLine"] == {
                "staged": data.lines + 2,
                "imported": data.lines,
                "skipped": 2,
            }
            assert st["rows"]["Customer"] == {
                "staged": data.customers,
                "imported": data.customers,
                "skipped": 0,
            }
            assert "(2 skipped)" in conditions(st)["Completed"]["message"]
            assert t.target_counts(job_id)["transaction_lines"] == data.lines
            print(f"orphans on the cluster (Skip): rows {st['rows']}")
