"""Worker failures on the real cluster: retried as new Jobs (new fencing token), then the batch
is failed and the ImportJob says why (bad staging data fails at once: it would fail every
attempt); `importwaves.io/retry-failed` after fixing the data completes the import."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable

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
    deleted_unfinished,
    importjob,
    is_true,
    small_spec,
    watch_jobs,
)


def test_bad_row_fails_at_once_and_retry_failed_completes(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    ns, name = namespace, "bad-data"
    job_id = f"{ns}.{name}"  # no importId: the default id
    t = tenant_db(f"fail_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=300)
    with t.connect() as conn:
        conn.execute(
            'UPDATE staging_records SET payload = payload || \'{"amount": "oops"}\' '
            "WHERE job_id = %s AND record_type_id = -30 AND record_id = 150",
            (job_id,),
        )
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    body = importjob(name, ns, t.name, **small_spec(retries=1))
    with k8s_cluster.api_client() as api:
        jobs = watch_jobs(api, ns)
        try:
            apply(k8s_cluster, body)
            st = h.wait(name, lambda s: s.get("summary") == "Failed", "summary Failed", 90)
            with h.explained():
                failed = conditions(st)["Failed"]
                assert (failed["status"], failed["reason"]) == ("True", "BatchesFailed")
                assert "1 batch(es) failed after their last attempt" in failed["message"]
                assert "record 150: amount is not a number" in failed["message"], failed
                assert "importwaves.io/retry-failed" in failed["message"]
                assert st["failedBatches"] == 1
                assert not is_true(st, "Completed")
                [bad] = [b for b in t.batches(job_id) if b["status"] == "failed"]
                assert bad["record_type_id"] == -30
                # bad staging data is not retried (retries=1 is not used up)
                assert bad["attempts"] == 1
                assert bad["last_error"].startswith("non-retryable: BatchDataError")
                assert "record 150" in bad["last_error"]
                tries = [j for j in created_jobs(jobs) if j.batch_id == bad["batch_id"]]
                # One Job for the one attempt.
                assert sorted(j.dispatch_seq for j in tries) == [1], tries
                # Nothing was imported for the failed batch; the others were.
                assert t.scalar("SELECT count(*) FROM transactions WHERE id = 150") == 0
                assert t.scalar("SELECT count(*) FROM transaction_lines") == 0

            # Fix the row, ask for a retry of the failed batches: the import completes.
            with t.connect() as conn:
                conn.execute(
                    'UPDATE staging_records SET payload = payload || \'{"amount": "1.50"}\' '
                    "WHERE job_id = %s AND record_type_id = -30 AND record_id = 150",
                    (job_id,),
                )
            k8s_cluster.kubectl(
                "-n", ns, "annotate", "importjob", name, "importwaves.io/retry-failed=fix-1"
            )
            st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed after retry", 90)
        finally:
            jobs.stop()
    with h.explained():
        assert st["summary"] == "Completed"
        assert st["handledRetryFailed"] == "fix-1"
        assert conditions(st)["Failed"]["status"] == "False"
        assert st["failedBatches"] == 0
        reasons = h.event_reasons(name)
        assert reasons.get("RetryFailed") == ["requeued 1 failed batch(es)"], reasons
        with t.connect() as conn:
            v = verify_import(
                conn, job_id, ImportJobSpec.model_validate(body["spec"]).engine_spec()
            )
        assert v.ok, v.failures()
        # The retried batch ran as a second Job with a second fencing token; no Job twice.
        made = created_jobs(jobs)
        per_dispatch = Counter((j.batch_id, j.dispatch_seq) for j in made)
        assert max(per_dispatch.values()) == 1, per_dispatch
        assert sorted(j.dispatch_seq for j in made if j.batch_id == bad["batch_id"]) == [1, 2]
        assert not deleted_unfinished(jobs), deleted_unfinished(jobs)


def test_worker_pod_that_exits_1_is_retried_then_failed(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    """A worker that fails without touching the database (here: exit 1): the operator records
    the failed pod as the attempt, re-dispatches, and fails the batch after `retries`."""
    ns, name = namespace, "exits-1"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"exit_{uuid.uuid4().hex[:8]}")
    t.generate(job_id, orders=20)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    spec = small_spec(retries=2, worker={"image": "busybox", "command": ["sh", "-c", "exit 1"]})
    with k8s_cluster.api_client() as api:
        jobs = watch_jobs(api, ns)
        try:
            apply(k8s_cluster, importjob(name, ns, t.name, **spec))
            st = h.wait(name, lambda s: s.get("summary") == "Failed", "summary Failed", 90)
        finally:
            jobs.stop()
    with h.explained():
        failed = conditions(st)["Failed"]
        assert failed["status"] == "True"
        assert "pod failed" in failed["message"], failed
        [bad] = [b for b in t.batches(job_id) if b["status"] == "failed"]
        assert bad["record_type_id"] == -2  # the first wave never got through
        assert bad["attempts"] == 3
        assert bad["last_error"].startswith("pod failed"), bad
        tries = sorted(j.dispatch_seq for j in created_jobs(jobs) if j.batch_id == bad["batch_id"])
        assert tries == [1, 2, 3], created_jobs(jobs)
        assert not deleted_unfinished(jobs), deleted_unfinished(jobs)
        assert t.target_counts(job_id) == {
            "customers": 0,
            "transactions": 0,
            "transaction_lines": 0,
        }
        # Failed Jobs were recorded and deleted.
        h.wait_for(lambda: not h.jobs(), "the failed worker Jobs to be deleted", timeout=30)
