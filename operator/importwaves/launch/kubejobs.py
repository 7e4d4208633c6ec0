"""Pure builders and readers of worker Jobs and pods (no API calls); used by launch/kubernetes.py.

One batch/v1 Job per wave, in the work-queue pattern: `parallelism` pods of the pooled worker
(`python -m importwaves.worker_pool`), no `completions`. Each pod claims dispatched batches of its
wave from the database (FOR UPDATE SKIP LOCKED, under each batch's fencing token) and exits 0
when the wave has nothing left it may run; once one pod has exited 0 and the others have ended,
the Job is Complete. The engine, not the Job controller, decides what is dispatched, counts
attempts and fences: a pod that crashed mid-batch loses only that batch's claim (the engine sees
the pod end through `observe` and requeues or fails the batch).

Why the one-Job-per-batch mode is gone (issue 12): it cost a Job, a pod and two Events per batch
(10,000 batches: 10,000 pod starts, each seconds on a real cluster), its deterministic per-
dispatch names existed to fence stale workers, which the claim under `dispatch_seq` now does
for every worker, and it needed an operator-side sync of its own (record each finished Job,
re-create missing ones). Per-wave pooled Jobs do the same work with Jobs <= waves + restarts and
pods <= waves x parallelism + restarts, through the one engine-owned lifecycle.

`backoffLimit`: the Job controller replaces a pod that exits non-zero (a crash: the engine has
already counted the claimed batch's attempt) at most `backoff_limit(size)` times per Job, so one
crashed worker does not end its wave's pool and a crash loop (a broken image or command) ends
the Job instead of running forever; the engine starts the next Job of the wave if work remains.
Replacements come after the Job controller's pod back-off (10 s, 20 s, ... up to 6 min): while
it lasts the wave has no live worker, and a dispatch nobody claims within the import's claim
timeout is released without costing an attempt (the engine's rule, engine/workers.py
`plan_unclaimed`); a pod that cannot start (its waiting reason will not resolve by itself) is a
launch problem (`start_problem`).

`activeDeadlineSeconds` (spec.worker, else the operator's default) now bounds a wave's whole
pool, not one batch: a wave running longer has its pods ended and its next Job started, the
batches in flight requeued.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from importwaves import redact
from importwaves.launch.port import LaunchTarget, WorkerGroup, WorkerSeen

GROUP = "importwaves.io"
VERSION = "v1alpha1"
KIND = "ImportJob"

LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_IMPORTJOB = f"{GROUP}/importjob"
#: the ImportJob's uid: selects exactly one ImportJob's Jobs and pods (a name can be reused)
LABEL_OWNER_UID = f"{GROUP}/owner-uid"
LABEL_WAVE = f"{GROUP}/wave"
LABEL_RECORD_TYPE = f"{GROUP}/record-type"
#: the Job's index among its wave's Jobs (1, 2, ...: the wave got work after its pods ended)
LABEL_INDEX = f"{GROUP}/job-index"
ANN_JOB_ID = f"{GROUP}/job-id"
ANN_TENANT = f"{GROUP}/tenant"

#: the module the worker pods run (the pooled worker of issue 12)
POOLED_MODULE = "importwaves.worker_pool"
#: the command a spec names when it names none: the reference worker, run in-process by the
#: pooled worker; any other command is run by the pooled worker per batch as a subprocess
DEFAULT_COMMAND = ("importwaves", "worker")
#: env of a worker pod: a custom command (JSON array of command + args)
ENV_COMMAND = "IMPORTWAVES_WORKER_COMMAND"
ENV_WORKER_ID = "IMPORTWAVES_WORKER_ID"
#: env of a worker pod: seconds with nothing to claim before it exits (the operator's setting)
ENV_IDLE = "IMPORTWAVES_WORKER_IDLE_SECONDS"
ENV_WAVE = "IMPORTWAVES_WAVE"
ENV_DSN = "IMPORTWAVES_DSN"
ENV_TENANT = "IMPORTWAVES_TENANT"
ENV_JOB_ID = "IMPORTWAVES_JOB_ID"

#: Longest termination message taken from a pod (it becomes the batch's recorded error).
MAX_POD_MESSAGE = 1000
#: Most restarts of crashed pods one wave Job allows, whatever its parallelism.
MAX_BACKOFF_LIMIT = 6
#: Finished Jobs nobody deleted (the operator was down, the import ended) are garbage-collected
#: by Kubernetes after the failed-Job keep time, and never sooner than this (the engine must
#: have read a failed pod's termination message first).
MIN_JOB_TTL_SECONDS = 60

_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_part(text: str) -> str:
    """`text` lowercased with every run of other characters made one '-' (DNS-1123)."""
    return _NOT_DNS.sub("-", text.lower()).strip("-")


def job_name(owner_name: str, record_type: str, wave: int, index: int) -> str:
    """`<importjob>-<recordtype>-w<wave>-<n>`, a DNS-1123 label of at most 63 characters (it is
    the pods' job-name label and their names' prefix). When too long, the readable head is cut
    and a digest of the whole head keeps different names different."""
    tail = f"-w{wave}-{index}"
    head = "-".join(p for p in (dns_part(owner_name), dns_part(record_type)) if p) or "import"
    if len(head) + len(tail) <= 63:
        return head + tail
    keep = 63 - len(tail) - 9
    return f"{head[:keep].rstrip('-')}-{_digest(head)}{tail}"


def label_value(text: str) -> str:
    """`text` as a label value (at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends): itself
    when it is one, else a cleaned prefix and a digest of the whole."""
    clean = _NOT_LABEL.sub("-", text).strip("-_.")
    if clean == text and len(text) <= 63:
        return text
    return f"{clean[:54].rstrip('-_.')}-{_digest(text)}".lstrip("-")


def owner_label(owner_name: str) -> str:
    """The ImportJob's name as a label value (ImportJob names may have up to 253 characters)."""
    return label_value(owner_name)


def backoff_limit(size: int) -> int:
    """Crashed pods one wave Job replaces: one per worker slot, capped (see the module doc)."""
    return max(1, min(size, MAX_BACKOFF_LIMIT))


def owner_selector(target: LaunchTarget) -> str:
    return f"{LABEL_OWNER_UID}={target.owner_uid}"


def custom_command(worker: dict[str, Any]) -> list[str] | None:
    """The command + args the pooled worker runs per batch, None for the reference worker."""
    command = [str(c) for c in worker.get("command") or DEFAULT_COMMAND]
    args = [str(a) for a in worker.get("args") or []]
    if tuple(command) == DEFAULT_COMMAND and not args:
        return None
    return command + args


def build_wave_job(
    target: LaunchTarget,
    tenant: str,
    group: WorkerGroup,
    index: int,
    *,
    conn_env: dict[str, str] | None = None,
    active_deadline: int = 0,
    keep_failed_seconds: int = 3600,
    worker_idle_seconds: float | None = None,
    python: str = "python",
) -> dict[str, Any]:
    """The work-queue Job of one wave (`group.wave_number`), the `index`-th of that wave.
    `conn_env`: the IMPORTWAVES_* connection settings (timeouts, keepalives) of the workers'
    connections; `active_deadline`: activeDeadlineSeconds unless the spec's worker says (0:
    none); `keep_failed_seconds`: how long a failed Job is kept for `kubectl logs`;
    `worker_idle_seconds`: how long a pooled worker waits with nothing to claim before it exits
    (the operator's setting; None: the worker's default, 30 s)."""
    if group.wave_number is None:
        raise ValueError("a Kubernetes worker group names its wave (per_wave launcher)")
    worker = dict(target.worker or {})
    wave = int(group.wave_number)
    labels = {
        LABEL_MANAGED: "importwaves",
        LABEL_IMPORTJOB: owner_label(target.owner_name),
        LABEL_OWNER_UID: target.owner_uid,
        LABEL_WAVE: str(wave),
        LABEL_RECORD_TYPE: label_value(group.record_type_name or "unknown"),
        LABEL_INDEX: str(index),
    }
    annotations = {ANN_JOB_ID: group.job_id, ANN_TENANT: tenant}
    env: list[dict[str, Any]] = [
        {
            "name": ENV_DSN,
            "valueFrom": {
                "secretKeyRef": {"name": target.secret_name, "key": target.secret_key or "dsn"}
            },
        },
        {"name": ENV_TENANT, "value": tenant},
        {"name": ENV_JOB_ID, "value": group.job_id},
        {"name": ENV_WAVE, "value": str(wave)},
        {"name": ENV_WORKER_ID, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    command = custom_command(worker)
    if command is not None:
        env.append({"name": ENV_COMMAND, "value": json.dumps(command)})
    env += [{"name": k, "value": v} for k, v in sorted((conn_env or {}).items())]
    if worker_idle_seconds is not None:
        env.append({"name": ENV_IDLE, "value": f"{worker_idle_seconds:g}"})
    # IMPORTWAVES_* names are refused in worker.env (CEL and spec.py); filtered here too
    env += [
        e
        for e in worker.get("env") or []
        if isinstance(e, dict) and not str(e.get("name", "")).startswith("IMPORTWAVES_")
    ]
    container: dict[str, Any] = {
        "name": "worker",
        "image": str(worker.get("image") or "importwaves"),
        "command": [python, "-m", POOLED_MODULE],
        "env": env,
        # a failed worker's last log lines become its termination message: the batch's error
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if worker.get("resources"):
        container["resources"] = dict(worker["resources"])
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
    }
    if worker.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = str(worker["serviceAccountName"])
    if worker.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(worker["nodeSelector"])
    if worker.get("tolerations"):
        pod_spec["tolerations"] = list(worker["tolerations"])
    job_spec: dict[str, Any] = {
        "parallelism": max(1, int(group.size)),
        "backoffLimit": backoff_limit(group.size),
        "ttlSecondsAfterFinished": max(MIN_JOB_TTL_SECONDS, int(keep_failed_seconds)),
        "template": {
            "metadata": {"labels": labels, "annotations": annotations},
            "spec": pod_spec,
        },
    }
    deadline = worker.get("activeDeadlineSeconds") or active_deadline
    if deadline:
        # a pool that hangs (a stalled database, a stopped process) is ended by the Job
        # controller; the engine sees its pods end and requeues their batches
        job_spec["activeDeadlineSeconds"] = int(deadline)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(target.owner_name, group.record_type_name, wave, index),
            "namespace": target.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": target.owner_name,
                    "uid": target.owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": job_spec,
    }


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


@dataclass(frozen=True)
class WaveJob:
    """A wave Job as the launcher sees it."""

    name: str
    job_id: str
    wave: int
    index: int
    finished: bool
    failed: bool
    #: when it finished (the Complete/Failed condition's lastTransitionTime), "" while active
    finished_at: str = ""
    #: when it was created (metadata.creationTimestamp), "" when unknown
    created_at: str = ""


def _int(raw: Any) -> int | None:
    text = str(raw).strip() if raw is not None else ""
    if text.startswith("-"):
        rest = text[1:]
        return -int(rest) if rest.isascii() and rest.isdigit() and len(rest) <= 18 else None
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def read_wave_job(job: dict[str, Any], owner_uid: str) -> WaveJob | None:
    """Parse a batch/v1 Job (a dict as the API returns it); None unless it is a wave Job whose
    controller ownerReference is the ImportJob with uid `owner_uid` (labels and annotations are
    anyone's to write who may edit Jobs: trusted only then, and parsed defensively)."""
    meta = job.get("metadata") or {}
    _, uid = controller_owner(meta)
    if not owner_uid or uid != owner_uid:
        return None
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    if not isinstance(labels, dict) or not isinstance(ann, dict):
        return None
    wave, index, job_id = (
        _int(labels.get(LABEL_WAVE)),
        _int(labels.get(LABEL_INDEX)),
        ann.get(ANN_JOB_ID),
    )
    if wave is None or index is None or not isinstance(job_id, str) or not job_id:
        return None
    conds = {
        c.get("type"): c
        for c in (job.get("status") or {}).get("conditions") or []
        if isinstance(c, dict) and c.get("status") == "True"
    }
    end = conds.get("Failed") or conds.get("Complete") or {}
    return WaveJob(
        name=str(meta.get("name") or ""),
        job_id=job_id,
        wave=wave,
        index=index,
        finished="Complete" in conds or "Failed" in conds,
        failed="Failed" in conds,
        finished_at=str(end.get("lastTransitionTime") or ""),
        created_at=str(meta.get("creationTimestamp") or ""),
    )


#: Terminated reasons of a container that never ran (its start failed): the pod ended without
#: its worker process (a real kubelet reports StartError; the e2e local kubelet in container mode
#: ends a pod it cannot honour with the reason it would have waited with).
NEVER_RAN = frozenset(
    {
        "CreateContainerConfigError",
        "CreateContainerError",
        "StartError",
        "ContainerCannotRun",
        "RunContainerError",
        "InvalidImageName",
        "ErrImageNeverPull",
        "ErrImagePull",
        "ImagePullBackOff",
    }
)


def _time(raw: Any) -> datetime | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None


def _since(raw: Any, now: datetime) -> float | None:
    at = _time(raw)
    return None if at is None else max(0.0, (now - at).total_seconds())


def read_worker_pod(
    pod: dict[str, Any], job_id: str, now: datetime | None = None
) -> WorkerSeen | None:
    """A worker pod of job `job_id` as the engine sees it (None if it is not one): alive until
    it reached Succeeded or Failed; then its exit code and its termination message (with
    FallbackToLogsOnError: the tail of its log when it failed without writing one), or the
    kubelet's reason when the container never ran. While alive and not running yet (Pending),
    `started` is False with the kubelet's waiting reason and message (or the scheduler's, when
    it is not scheduled); `age` and `running_for` are measured against `now` (default: now)."""
    meta = pod.get("metadata") or {}
    ann, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    if not isinstance(ann, dict) or not isinstance(labels, dict) or ann.get(ANN_JOB_ID) != job_id:
        return None
    name = str(meta.get("name") or "")
    if not name:
        return None
    now = now or datetime.now(UTC)
    wave = _int(labels.get(LABEL_WAVE))
    age = _since(meta.get("creationTimestamp"), now)
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    statuses = [cs for cs in status.get("containerStatuses") or [] if isinstance(cs, dict)]
    first = (statuses[0].get("state") or {}) if statuses else {}
    if phase not in ("Succeeded", "Failed"):
        running = first.get("running")
        if isinstance(running, dict) or first.get("terminated"):
            return WorkerSeen(
                name,
                job_id,
                wave,
                alive=True,
                age=age,
                running_for=_since((running or {}).get("startedAt"), now),
                launch=pod_job_name(pod),
            )
        wait = first.get("waiting") or {}
        reason, text = str(wait.get("reason") or ""), str(wait.get("message") or "")
        if not wait:  # not scheduled yet, or no container status yet
            sched = next(
                (
                    c
                    for c in status.get("conditions") or []
                    if isinstance(c, dict) and c.get("type") == "PodScheduled"
                ),
                {},
            )
            if sched.get("status") == "False":
                reason, text = str(sched.get("reason") or ""), str(sched.get("message") or "")
        return WorkerSeen(
            name,
            job_id,
            wave,
            alive=True,
            started=False,
            waiting=reason,
            waiting_message=_tail(redact.scrub(text), MAX_POD_MESSAGE),
            age=age,
            launch=pod_job_name(pod),
        )
    exit_code: int | None = None
    message = ""
    never_ran = ""
    never_text = ""
    for cs in statuses:
        state = cs.get("state") or {}
        term = state.get("terminated") or {}
        wait = state.get("waiting") or {}
        if term:
            exit_code = _int(term.get("exitCode"))
            text = str(term.get("message") or "").strip()
            reason = str(term.get("reason") or "")
            if reason in NEVER_RAN:
                never_ran, never_text = reason, text
                message = ": ".join(p for p in (reason, text) if p)
            elif text:
                message = text
            elif reason and reason not in ("Completed", "Error"):
                message = reason
        elif wait:
            never_ran = str(wait.get("reason") or "") or "ContainerCreating"
            never_text = str(wait.get("message") or "")
            message = ": ".join(
                p for p in (str(wait.get("reason") or ""), str(wait.get("message") or "")) if p
            )
        break
    if not message and phase == "Failed":
        # the pod ended without its container ending (evicted, deadline exceeded, deleted)
        message = ": ".join(
            p for p in (str(status.get("reason") or ""), str(status.get("message") or "")) if p
        )
    if exit_code is None and phase == "Succeeded":
        exit_code = 0
    return WorkerSeen(
        name,
        job_id,
        wave,
        alive=False,
        exit_code=exit_code,
        message=_tail(redact.scrub(message), MAX_POD_MESSAGE),
        started=not never_ran,
        waiting=never_ran,
        waiting_message=_tail(redact.scrub(never_text), MAX_POD_MESSAGE),
        age=age,
        launch=pod_job_name(pod),
    )


def _tail(text: str, limit: int) -> str:
    """The last `limit` characters of a message (a log's end says why it failed)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3) :]


def pod_job_name(pod: dict[str, Any]) -> str:
    """The name of the Job that made a pod ('' if none)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return str(labels.get("batch.kubernetes.io/job-name") or labels.get("job-name") or "")
