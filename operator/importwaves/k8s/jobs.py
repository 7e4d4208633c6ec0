"""Pure builders for worker Jobs (no API calls), and how to read a finished Job.

Why one Job per dispatched batch, in a bounded window, rather than one Indexed Job per wave:
the engine, not the Job controller, owns retries, fencing and parallelism. Each dispatch of a
batch carries a fencing token (`dispatch_seq`) that is part of the Job's deterministic name, so a
retry is a new Job that a stale pod of the old dispatch cannot complete, and AlreadyExists means
"already launched". At most `spec.parallelism` Jobs are active for an ImportJob at any moment (the
coordinator never dispatches more), and the operator deletes each Job as soon as its result is
recorded, so the number of live API objects is bounded by the window, not by the wave's size. An
Indexed Job per wave would create fewer objects, but its indexes cannot be fenced per attempt,
derived waves grow while parents progress (a fixed `completions` cannot), and a per-index retry
policy would duplicate the engine's attempts accounting.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from importwaves.k8s.crd import GROUP, KIND, VERSION, DatabaseRef
from importwaves.launch.base import BatchDispatch
from importwaves.spec import WorkerPod
from importwaves.worker import ENV

LABEL_IMPORTJOB = f"{GROUP}/importjob"
LABEL_WAVE = f"{GROUP}/wave"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
ANN_JOB_ID = f"{GROUP}/job-id"
ANN_BATCH = f"{GROUP}/batch-id"
ANN_SEQ = f"{GROUP}/dispatch-seq"
ANN_TENANT = f"{GROUP}/tenant"
ANN_SECRET = f"{GROUP}/secret"
ANN_SECRET_KEY = f"{GROUP}/secret-key"
ANN_RECONCILE = f"{GROUP}/reconcile"
ANN_RETRY_FAILED = f"{GROUP}/retry-failed"

#: Finished Jobs the operator could not delete are garbage-collected by Kubernetes after this.
JOB_TTL_SECONDS = 3600


@dataclass(frozen=True)
class Owner:
    """The ImportJob a worker Job belongs to."""

    namespace: str
    name: str
    uid: str
    tenant: str
    database: DatabaseRef
    worker: WorkerPod


def job_name(owner_name: str, batch_id: str, dispatch_seq: int) -> str:
    """Deterministic DNS-1123 label of at most 63 characters (it becomes a pod label value and
    the prefix of pod names, which are also host names: no dots)."""
    digest = hashlib.sha256(f"{owner_name}/{batch_id}".encode()).hexdigest()[:10]
    head = owner_name[:36].replace(".", "-").rstrip("-")
    return f"{head}-{digest}-{dispatch_seq}"


def owner_label(owner_name: str) -> str:
    """The ImportJob's name as a label value (at most 63 characters; ImportJob names may have
    up to 253): the name itself when it fits, else a prefix and a digest of the whole name."""
    if len(owner_name) <= 63:
        return owner_name
    digest = hashlib.sha256(owner_name.encode()).hexdigest()[:10]
    return f"{owner_name[:52].rstrip('-.')}-{digest}"


def build_job(owner: Owner, batch: BatchDispatch) -> dict[str, Any]:
    labels = {
        LABEL_MANAGED: "importwaves",
        LABEL_IMPORTJOB: owner_label(owner.name),
        LABEL_WAVE: str(batch.wave_number),
    }
    env: list[dict[str, Any]] = [
        {
            "name": ENV["dsn"],
            "valueFrom": {
                "secretKeyRef": {"name": owner.database.secretName, "key": owner.database.key}
            },
        },
        {"name": ENV["tenant"], "value": owner.tenant},
        {"name": ENV["job_id"], "value": batch.job_id},
        {"name": ENV["batch_id"], "value": batch.batch_id},
        {"name": ENV["dispatch_seq"], "value": str(batch.dispatch_seq)},
        *owner.worker.env,
    ]
    container: dict[str, Any] = {
        "name": "worker",
        "image": owner.worker.image,
        "command": list(owner.worker.command),
        "args": list(owner.worker.args),
        "env": env,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if owner.worker.resources:
        container["resources"] = dict(owner.worker.resources)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
    }
    if owner.worker.serviceAccountName:
        pod_spec["serviceAccountName"] = owner.worker.serviceAccountName
    if owner.worker.nodeSelector:
        pod_spec["nodeSelector"] = dict(owner.worker.nodeSelector)
    if owner.worker.tolerations:
        pod_spec["tolerations"] = list(owner.worker.tolerations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(owner.name, batch.batch_id, batch.dispatch_seq),
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": {
                ANN_JOB_ID: batch.job_id,
                ANN_BATCH: batch.batch_id,
                ANN_SEQ: str(batch.dispatch_seq),
                ANN_TENANT: owner.tenant,
                ANN_SECRET: owner.database.secretName,
                ANN_SECRET_KEY: owner.database.key,
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": owner.name,
                    "uid": owner.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            # The engine retries (a new dispatch, a new Job); the Job itself never does.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


@dataclass(frozen=True)
class JobResult:
    """A worker Job as the engine sees it."""

    name: str
    job_id: str
    batch_id: str
    dispatch_seq: int
    finished: bool
    succeeded: bool
    message: str


def read_job(job: dict[str, Any]) -> JobResult | None:
    """Parse a batch/v1 Job (a dict as the API returns it); None if it is not one of ours."""
    meta = job.get("metadata") or {}
    ann = meta.get("annotations") or {}
    if ANN_BATCH not in ann or ANN_JOB_ID not in ann:
        return None
    conds = {
        c.get("type"): c
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }
    done = "Complete" in conds or "SuccessCriteriaMet" in conds
    failed = "Failed" in conds or "FailureTarget" in conds
    cond = conds.get("Failed") or conds.get("FailureTarget") or {}
    message = f"pod failed: {cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip()
    return JobResult(
        name=meta.get("name", ""),
        job_id=ann[ANN_JOB_ID],
        batch_id=ann[ANN_BATCH],
        dispatch_seq=int(ann.get(ANN_SEQ, "0")),
        finished=done or failed,
        succeeded=done and not failed,
        message=message,
    )


def pod_failure_message(pod: dict[str, Any]) -> str | None:
    """Why a worker pod failed, from its container's state as the kubelet reported it: the
    reason and message of a `terminated` (or still `waiting`) state, e.g.
    "CreateContainerConfigError: container has runAsNonRoot and image will run as root ...".
    None when the pod says nothing beyond an exit code."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        for kind in ("terminated", "waiting"):
            st = state.get(kind) or {}
            reason, message = st.get("reason") or "", (st.get("message") or "").strip()
            if message or (reason and reason not in ("Error", "Completed")):
                exit_code = f" (exit code {st['exitCode']})" if "exitCode" in st else ""
                return f"container {cs.get('name')}: {reason}{exit_code}: {message[:500]}".rstrip(
                    ": "
                )
    return None
