"""Kubernetes adapter of the launcher port: one work-queue Job per wave (see launch/kubejobs.py).

It decides nothing: the engine (`Engine.sync_workers`) says which waves need workers (`ensure`),
reads what runs (`observe`) and says which ended workers it has recorded (`discard`). Where the
workers run (namespace, owning ImportJob, Secret, pod settings) comes with every call in the
job's `LaunchTarget`, stored with the job in the database, and every decision reads the Jobs and
pods selected by the owning ImportJob's uid, so two ImportJobs with the same `importId` in two
namespaces never see each other's Jobs. The one thing remembered is a naming hint: the highest
Job index used per (ImportJob uid, wave), so a wave's next Job takes the next number even when
the earlier ones were already deleted (after a restart, numbering resumes from the Jobs that
exist).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from importwaves.launch.kubejobs import (
    WaveJob,
    build_wave_job,
    owner_selector,
    pod_job_name,
    read_wave_job,
    read_worker_pod,
)
from importwaves.launch.port import (
    LaunchProblem,
    LaunchSeen,
    LaunchTarget,
    Observation,
    WorkerGroup,
    WorkerSeen,
)
from importwaves.log import event

log = logging.getLogger("importwaves.launch.kubernetes")

#: What a call to the API server raises when it answers with an error or cannot be reached.
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)

#: Longest API refusal text kept in a LaunchProblem (it is shown in status and Events).
MAX_PROBLEM = 1000
#: (ImportJob uid, wave) pairs whose last Job index is remembered (bounded; a forgotten one
#: only lets a later Job reuse a deleted Job's number).
INDEXES_KEPT = 4096


class KubernetesLauncher:
    per_wave = True
    #: seconds the engine's dispatch hot path may reuse an observation (two LISTs) of a job's
    #: workers (Engine._recent_observation); a sync always observes anew
    observation_ttl = 2.0

    def __init__(
        self,
        api: client.ApiClient,
        *,
        conn_env: dict[str, str] | None = None,
        active_deadline: int = 0,
        keep_failed_seconds: int = 3600,
        worker_idle_seconds: float | None = None,
    ) -> None:
        self.api = api
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        #: IMPORTWAVES_* connection settings given to every worker pod
        self.conn_env = dict(conn_env or {})
        #: default activeDeadlineSeconds of worker Jobs (0: none)
        self.active_deadline = active_deadline
        #: the last failed Job of a wave is kept this long, so `kubectl logs` shows why
        self.keep_failed_seconds = keep_failed_seconds
        #: IMPORTWAVES_WORKER_IDLE_SECONDS of every worker pod (None: the worker's default)
        self.worker_idle_seconds = worker_idle_seconds
        self._last_index: OrderedDict[tuple[str, int | None], int] = OrderedDict()
        self._index_lock = threading.Lock()
        #: one lock per ImportJob (uid) around ensure's list-then-create: two syncs of the same
        #: ImportJob never both find a wave without a Job and start two (other ImportJobs never
        #: wait for it)
        self._ensure_locks: OrderedDict[str, threading.Lock] = OrderedDict()

    # -- the port --------------------------------------------------------------------------------
    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        """Start a wave's Job when none of that wave is active (the next index after its ended
        ones: the wave got work after its pods ended). An active Job is left alone."""
        if target.kind != "kubernetes" or not groups:
            return []
        with self._ensure_lock(target.owner_uid):
            return self._ensure(target, tenant, groups)

    def _ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        try:
            jobs = self._jobs(target)
        except API_ERRORS as exc:
            self._transient("ensure_list_failed", target, exc)
            return []
        problems = []
        for g in groups:
            mine = [j for j in jobs if j.job_id == g.job_id and j.wave == g.wave_number]
            if any(not j.finished for j in mine):
                continue
            index = self._next_index(target.owner_uid, g.wave_number, mine)
            body = build_wave_job(
                target,
                tenant,
                g,
                index,
                conn_env=self.conn_env,
                active_deadline=self.active_deadline,
                keep_failed_seconds=self.keep_failed_seconds,
                worker_idle_seconds=self.worker_idle_seconds,
            )
            try:
                self.batch.create_namespaced_job(target.namespace, body)  # type: ignore[arg-type]
            except ApiException as exc:
                if exc.status == 409:  # created meanwhile (another sync): it runs
                    continue
                if exc.status is not None and 400 <= exc.status < 500:
                    text = f"{exc.status} {exc.reason}: {_api_message(exc)}"
                    problems.append(
                        LaunchProblem(g, text[:MAX_PROBLEM], permanent=exc.status in (400, 422))
                    )
                else:  # the API server is unwell: the next sync tries again
                    self._transient("job_create_failed", target, exc)
                continue
            except API_ERRORS as exc:  # unreachable: the next sync tries again
                self._transient("job_create_failed", target, exc)
                continue
            self._created(target.owner_uid, g.wave_number, index)
            event(
                log,
                "wave_job_created",
                namespace=target.namespace,
                importjob=target.owner_name,
                job_id=g.job_id,
                wave=g.wave_number,
                job=body["metadata"]["name"],
                parallelism=g.size,
            )
        return problems

    def observe(self, target: LaunchTarget, tenant: str, job_id: str) -> Observation:
        """The job's worker pods, live and ended (with exit code and termination message)."""
        if target.kind != "kubernetes":
            return Observation((), complete=False)
        try:
            pods = self.core.list_namespaced_pod(
                target.namespace, label_selector=owner_selector(target)
            )
        except API_ERRORS as exc:
            self._transient("observe_failed", target, exc)
            return Observation((), complete=False)
        now = datetime.now(UTC)
        seen: list[WorkerSeen] = []
        for pod in pods.items:
            w = read_worker_pod(self._dict(pod), job_id, now)
            if w is not None:
                seen.append(w)
        try:
            jobs = [j for j in self._jobs(target) if j.job_id == job_id and not j.finished]
        except API_ERRORS as exc:
            self._transient("observe_failed", target, exc)
            return Observation(tuple(seen), complete=False)
        launches = tuple(
            LaunchSeen(j.wave, _age(j.created_at, now), j.name) for j in jobs if j.created_at
        )
        return Observation(tuple(seen), complete=True, launches=launches)

    def discard(
        self,
        target: LaunchTarget,
        tenant: str,
        job_id: str,
        worker_ids: Sequence[str],
        keep: Sequence[str] = (),
    ) -> None:
        """Delete the finished Jobs whose pods have all ended and been recorded, except, per
        wave, the newest one that failed or ran a batch whose last attempt failed (a pod in
        `keep`), while it finished less than `keep_failed_seconds` ago: `kubectl logs` on its
        pods shows why. Kubernetes deletes it after that (ttlSecondsAfterFinished) if no
        later sync does. An active Job is deleted only when its pods are all in `worker_ids` and
        one of them is waiting and cannot start (its launch problem recorded by the engine): the
        wave's next Job is made from the ImportJob's current pod settings."""
        if target.kind != "kubernetes":
            return
        try:
            jobs = [j for j in self._jobs(target) if j.job_id == job_id]
            if not jobs:
                return
            pods = self.core.list_namespaced_pod(
                target.namespace, label_selector=owner_selector(target)
            )
        except API_ERRORS as exc:
            self._transient("discard_list_failed", target, exc)
            return
        recorded, kept_pods = set(worker_ids), set(keep)
        pending: set[str] = set()  # Jobs with a pod the engine has not recorded the end of
        diagnose: set[str] = set()  # Jobs with a pod that ran a failed attempt
        stuck: set[str] = set()  # active Jobs with a pod that cannot start, recorded as such
        for pod in pods.items:
            body = self._dict(pod)
            w = read_worker_pod(body, job_id)
            if w is None:
                continue
            if w.alive and not w.started and w.worker_id in recorded:
                stuck.add(pod_job_name(body))
            if w.worker_id not in recorded or (w.alive and w.started):
                pending.add(pod_job_name(body))
            if w.worker_id in kept_pods:
                diagnose.add(pod_job_name(body))
        failed = [j for j in jobs if j.finished and (j.failed or j.name in diagnose)]
        for j in jobs:
            if j.name in pending or self._kept(j, failed):
                continue
            if not j.finished and j.name not in stuck:
                continue  # active: its pods run, or will, or its end is still to be marked
            try:
                self.batch.delete_namespaced_job(
                    j.name, target.namespace, propagation_policy="Background"
                )
            except API_ERRORS as exc:
                if getattr(exc, "status", None) != 404:
                    self._transient("job_delete_failed", target, exc)
                continue
            event(
                log,
                "wave_job_deleted",
                logging.DEBUG,
                namespace=target.namespace,
                job=j.name,
                failed=j.failed,
                finished=j.finished,
            )

    # -- helpers ---------------------------------------------------------------------------------
    def _ensure_lock(self, uid: str) -> threading.Lock:
        with self._index_lock:
            lock = self._ensure_locks.setdefault(uid, threading.Lock())
            self._ensure_locks.move_to_end(uid)
            while len(self._ensure_locks) > INDEXES_KEPT:
                self._ensure_locks.popitem(last=False)
        return lock

    def _next_index(self, uid: str, wave: int | None, jobs: Sequence[WaveJob]) -> int:
        """One more than the highest index that exists or was created (under the ImportJob's
        ensure lock; another operator's concurrent create of the same name gets AlreadyExists)."""
        with self._index_lock:
            remembered = self._last_index.get((uid, wave), 0)
        return max([j.index for j in jobs] + [remembered]) + 1

    def _created(self, uid: str, wave: int | None, index: int) -> None:
        key = (uid, wave)
        with self._index_lock:
            self._last_index[key] = max(index, self._last_index.get(key, 0))
            self._last_index.move_to_end(key)
            while len(self._last_index) > INDEXES_KEPT:
                self._last_index.popitem(last=False)

    def _kept(self, job: WaveJob, failed: Sequence[WaveJob]) -> bool:
        """The newest of its wave's failed Jobs, failed less than keep_failed_seconds ago."""
        if self.keep_failed_seconds <= 0 or job not in failed:
            return False
        if job.index != max(j.index for j in failed if j.wave == job.wave):
            return False
        if not job.finished_at:
            return True
        ended = datetime.fromisoformat(job.finished_at.replace("Z", "+00:00"))
        return (datetime.now(UTC) - ended).total_seconds() < self.keep_failed_seconds

    def _jobs(self, target: LaunchTarget) -> list[WaveJob]:
        found = self.batch.list_namespaced_job(
            target.namespace, label_selector=owner_selector(target)
        )
        out = []
        for obj in found.items:
            j = read_wave_job(self._dict(obj), target.owner_uid)
            if j is not None:
                out.append(j)
        return out

    def _dict(self, obj: Any) -> dict[str, Any]:
        """A kubernetes-client model as the API's own camelCase dict."""
        out: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return out

    @staticmethod
    def _transient(what: str, target: LaunchTarget, exc: Exception) -> None:
        event(
            log,
            what,
            logging.WARNING,
            namespace=target.namespace,
            importjob=target.owner_name,
            status=getattr(exc, "status", None),
            error=str(getattr(exc, "reason", None) or type(exc).__name__),
        )


def _age(stamp: str, now: datetime) -> float:
    try:
        made = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return float("inf")  # unknown: never young
    return max(0.0, (now - made).total_seconds())


def _api_message(exc: ApiException) -> str:
    try:
        body: Any = json.loads(exc.body or "{}")
        return str(body.get("message", exc.body))
    except ValueError:
        return str(exc.body)
