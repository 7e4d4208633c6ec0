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

#: Longest pod-failure text taken from a Job's condition (it is stored as the batch's error).
MAX_JOB_MESSAGE = 1000

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


def build_job(
    owner: Owner,
    batch: BatchDispatch,
    *,
    conn_env: dict[str, str] | None = None,
    active_deadline: int = 0,
) -> dict[str, Any]:
    """The worker Job of one dispatch. `conn_env`: the IMPORTWAVES_* connection settings
    (timeouts, keepalives) the worker's connections use; `active_deadline`: the Job's
    activeDeadlineSeconds unless `spec.worker.activeDeadlineSeconds` says otherwise (0: none)."""
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
        *({"name": k, "value": v} for k, v in sorted((conn_env or {}).items())),
        # IMPORTWAVES_* names are refused in worker.env (CEL and spec.py); filtered here too
        *(e for e in owner.worker.env if not str(e.get("name", "")).startswith("IMPORTWAVES_")),
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
    deadline = owner.worker.activeDeadlineSeconds or active_deadline
    job_spec: dict[str, Any] = {
        # The engine retries (a new dispatch, a new Job); the Job itself never does.
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if deadline:
        # a worker that hangs (a stalled database, a stopped process) is ended by the Job
        # controller; the engine sees the failed Job and retries under a new dispatch
        job_spec["activeDeadlineSeconds"] = int(deadline)
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
        "spec": job_spec,
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
    #: uid and name of the Job's controller owner (an ImportJob), "" when it has none
    owner_uid: str = ""
    owner_name: str = ""


def controller_owner(meta: dict[str, Any]) -> tuple[str, str]:
    """(name, uid) of the ImportJob that controls a Job, ("", "") if none does."""
    refs = meta.get("ownerReferences")
    for ref in refs if isinstance(refs, list) else []:
        if (
            isinstance(ref, dict)
            and ref.get("kind") == KIND
            and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")
            and ref.get("controller") is True
        ):
            return str(ref.get("name") or ""), str(ref.get("uid") or "")
    return "", ""


def _seq(raw: Any) -> int | None:
    text = str(raw).strip() if raw is not None else ""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:  # ASCII digits, a bigint
        return None
    return int(text)


def read_job(job: dict[str, Any], owner_uid: str | None = None) -> JobResult | None:
    """Parse a batch/v1 Job (a dict as the API returns it); None if it is not one of ours.

    Annotations are anyone's to write who may edit Jobs: they are trusted only when the Job's
    controller ownerReference is an ImportJob (with uid `owner_uid` when given), and parsed
    defensively (a missing, empty or non-numeric dispatch sequence makes the Job not ours)."""
    meta = job.get("metadata") or {}
    ann = meta.get("annotations") or {}
    if not isinstance(ann, dict):
        return None
    job_id, batch_id = ann.get(ANN_JOB_ID), ann.get(ANN_BATCH)
    if not isinstance(job_id, str) or not job_id or not isinstance(batch_id, str) or not batch_id:
        return None
    seq = _seq(ann.get(ANN_SEQ))
    if seq is None:
        return None
    owner_name, uid = controller_owner(meta)
    if not uid or (owner_uid is not None and uid != owner_uid):
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
        job_id=job_id,
        batch_id=batch_id,
        dispatch_seq=seq,
        finished=done or failed,
        succeeded=done and not failed,
        message=message[:MAX_JOB_MESSAGE],
        owner_uid=uid,
        owner_name=owner_name,
    )


def needs_polling(status: dict[str, Any], annotations: dict[str, str]) -> bool:
    """Whether the timer reconciles an ImportJob: not when it is Completed or Failed, unless
    one of the operator's annotations awaits handling (kopf ignores this operator's own
    annotation prefix in its diffs, so the timer is what notices them). A spec change or a Job
    event still reconciles a finished ImportJob."""
    if str(status.get("summary") or "") not in ("Completed", "Failed"):
        return True
    return any(
        annotations.get(key) and annotations.get(key) != status.get(handled)
        for key, handled in (
            (ANN_RECONCILE, "handledReconcile"),
            (ANN_RETRY_FAILED, "handledRetryFailed"),
        )
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
