"""Two ImportJobs with the same `importId` in two namespaces (issue 12): each job's launch target
(namespace, owner, Secret) is stored with the job in its own tenant database, so each launches
its worker Jobs only in its own namespace, owned by itself, with its own Secret; nothing is
kept in a launcher-side dict keyed by the job id alone (which flipped ownership before)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client

from importwaves.k8s.crd import ImportJobSpec
from importwaves.verify import verify_import

from .harness.cluster import Cluster
from .harness.operatorkit import (
    Harness,
    OperatorProcess,
    Tenant,
    apply,
    create_secret,
    created_jobs,
    importjob,
    is_true,
    small_spec,
    watch_jobs,
)


def test_same_import_id_in_two_namespaces_launches_each_in_its_own(
    k8s_cluster: Cluster,
    namespace: str,
    other_namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    import_id = "shared-import"
    sides = []
    for ns, secret in ((namespace, "db-a"), (other_namespace, "db-b")):
        t = tenant_db(f"ns_{uuid.uuid4().hex[:8]}")
        t.generate(import_id, orders=120)
        create_secret(k8s_cluster, ns, secret, t.dsn)
        body = importjob(
            "same", ns, t.name, secret=secret, importId=import_id, **small_spec(hold=0.2)
        )
        sides.append((ns, secret, t, body))
    op = operator([namespace, other_namespace])
    with k8s_cluster.api_client() as api:
        recorders = {ns: watch_jobs(api, ns) for ns, *_ in sides}
        try:
            for _, _, _, body in sides:
                apply(k8s_cluster, body)
            for ns, _, t, _ in sides:
                h = harness(ns, [op], [t])
                h.wait("same", lambda s: is_true(s, "Completed"), "Completed", 120)
        finally:
            for r in recorders.values():
                r.stop()
        custom = client.CustomObjectsApi(api)
        uids = {
            ns: custom.get_namespaced_custom_object(
                "importwaves.io", "v1alpha1", ns, "importjobs", "same"
            )["metadata"]["uid"]
            for ns, *_ in sides
        }
    assert uids[namespace] != uids[other_namespace]
    for ns, secret, t, body in sides:
        made = created_jobs(recorders[ns])
        print(f"\n{ns}: {len(made)} worker Jobs: {[j.name for j in made]}")
        assert {j.wave for j in made} == {1, 2, 3}, made
        for _, obj in recorders[ns].snapshot():
            meta = obj["metadata"]
            if "importwaves.io/owner-uid" not in (meta.get("labels") or {}):
                continue
            # owned by this namespace's ImportJob, reading this namespace's Secret
            assert meta["namespace"] == ns, meta
            [ref] = meta["ownerReferences"]
            assert (ref["name"], ref["uid"]) == ("same", uids[ns]), ref
            assert meta["labels"]["importwaves.io/owner-uid"] == uids[ns]
            env = _env(obj)
            assert env["IMPORTWAVES_DSN"] == {"secretKeyRef": {"name": secret, "key": "dsn"}}
            assert env["IMPORTWAVES_TENANT"] == t.name
            assert env["IMPORTWAVES_JOB_ID"] == import_id
        with t.connect() as conn:
            stored = conn.execute(
                "SELECT launch_target FROM import_jobs WHERE job_id = %s", (import_id,)
            ).fetchone()
            v = verify_import(
                conn, import_id, ImportJobSpec.model_validate(body["spec"]).engine_spec()
            )
        target = stored["launch_target"] if isinstance(stored, dict) else stored[0]
        assert (target["namespace"], target["owner_uid"], target["secret_name"]) == (
            ns,
            uids[ns],
            secret,
        )
        assert v.ok, v.failures()


def _env(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_two_operators_watching_different_namespaces_keep_to_their_own(
    k8s_cluster: Cluster,
    namespace: str,
    other_namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
) -> None:
    """Sharding beyond one operator (issue 16): two releases, each watching its own namespaces
    (`watchNamespaces`), run side by side; each reconciles and launches only its own
    ImportJobs, and neither touches (or even names) the other's."""
    sides = []
    for ns in (namespace, other_namespace):
        t = tenant_db(f"shard_{uuid.uuid4().hex[:8]}")
        t.generate(f"{ns}.shard", orders=60)
        create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
        sides.append((ns, t, operator(ns)))
    for ns, t, _ in sides:
        apply(k8s_cluster, importjob("shard", ns, t.name, **small_spec(hold=0.0)))
    for ns, t, op in sides:
        harness(ns, [op], [t]).wait("shard", lambda s: is_true(s, "Completed"), "Completed", 120)
    for (ns, _, op), (theirs, _, _) in zip(sides, reversed(sides), strict=True):
        submitted = {r.get("job_id") for r in op.log_events("job_submitted")}
        assert submitted == {f"{ns}.shard"}, submitted
        assert theirs not in op.log(), f"the operator of {ns} mentions {theirs}"
