"""What the operator does for an ImportJob; kopf handlers (k8s/handlers.py) only call this.

Level-based: every call re-reads the ImportJob's Secret and the tenant database and converges.
The operator calls only the engine's public API: `submit` (with the ImportJob's LaunchTarget:
namespace, owner, Secret and pod settings, stored with the job), `sync_workers` (the engine
reads the database and the Kubernetes launcher's observation of the worker pods, starts the
wave Jobs it needs, records lost workers and discards ended ones), `check` and `recovery`. A
worker Job's event is only a prompt to run that sync for the ImportJob controlling it. Status
and Events come back to the handler as data, to be written once.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import psycopg
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from importwaves import redact
from importwaves.db import migrate
from importwaves.db.queries import Q
from importwaves.engine import failures
from importwaves.engine.app import Engine, release_completed_workers
from importwaves.engine.budget import Budget
from importwaves.engine.capacity import CapacityKeeper
from importwaves.engine.coordinator import RunResult
from importwaves.engine.failures import FailedBatch
from importwaves.engine.jobrow import load_job
from importwaves.engine.jobs import SpecChangeRefused
from importwaves.engine.model import Outcome
from importwaves.engine.notify import HUBS, Completion, Registration, fingerprint
from importwaves.engine.snapshot import read_snapshot
from importwaves.flags import Flags
from importwaves.k8s.crd import GROUP, PLURAL, VERSION, DatabaseRef, ImportJobSpec
from importwaves.k8s.events import EventPoster, KubeEvent, ObjectRef
from importwaves.k8s.jobs import ANN_RECONCILE, REQUESTS, controller_owner
from importwaves.k8s.notices import Coalescer
from importwaves.k8s.status import (
    JobView,
    Problem,
    ProblemKind,
    compute_status,
    now_iso,
    status_patch,
)
from importwaves.launch.kubejobs import read_wave_job
from importwaves.launch.kubernetes import KubernetesLauncher
from importwaves.launch.port import LaunchProblem, LaunchTarget
from importwaves.log import event
from importwaves.settings import Settings
from importwaves.spec import ImportSpec, format_validation_error

log = logging.getLogger("importwaves.operator")

#: Imports whose CompletionGuard Event, and failed batches whose BatchFailed Event, this process
#: posted (bounded: a forgotten one costs one repeated Event).
REMEMBERED = 4096
#: Failed batches a run looks at for BatchFailed Events (the newest first).
MAX_FAILURE_EVENTS = 20


@dataclass
class ReconcileResult:
    status: dict[str, Any]
    events: list[KubeEvent] = field(default_factory=list)
    problem: Problem | None = None


#: An engine is keyed by where its DSN comes from and the tenant it serves.
EngineKey = tuple[str, str, str, str]  # namespace, Secret name, Secret key, tenant
#: A key whose database failed answers with that failure, without retrying, for this long.
FAILURE_HOLD_S = 3.0
#: Seconds an evicted or replaced engine stays open for the work already using it.
EVICT_GRACE_S = 30.0
#: ImportJob summaries after which its engine is released.
FINISHED_SUMMARIES = frozenset({"Completed", "Failed", "Deleted"})


@dataclass
class _Cached:
    engine: Engine
    fingerprint: str  # of the DSN it was made with (never the DSN itself)
    registration: Registration

    def close(self) -> None:
        self.registration.close()
        self.engine.close()


class Closer:
    """Runs the close of evicted engines after their grace, all on ONE thread (started on first
    use). A `threading.Timer` per eviction made a thread per evicted engine for its 30 s: the
    many-tenants bench had 370 of them alive at once (engines evicted, re-created by a late
    worker Job event, evicted again), each with its stack and thread state, and glibc keeps
    the stacks of ended threads (up to 40 MB) for reuse."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cv:
            if self._stopped:
                run_now = True
            else:
                run_now = False
                heapq.heappush(self._due, (time.monotonic() + delay, next(self._seq), fn))
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="engine-closer", daemon=True
                    )
                    self._thread.start()
                self._cv.notify()
        if run_now:
            _quietly(fn)

    def pending(self) -> int:
        with self._cv:
            return len(self._due)

    def close_all(self) -> None:
        """Run every pending close now (the operator stops); later ones run at once."""
        with self._cv:
            self._stopped = True
            due, self._due = self._due, []
            self._cv.notify()
        for _t, _n, fn in sorted(due):
            _quietly(fn)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cv.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._stopped:
                    return
                fn = heapq.heappop(self._due)[2]
            _quietly(fn)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # a close that failed must not stop the others
        log.exception("engine_close_failed")


class ProblemError(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


P = ParamSpec("P")
R = TypeVar("R")


def _one_per_importjob(
    fn: Callable[Concatenate[ImportJobOperator, P], R],
) -> Callable[Concatenate[ImportJobOperator, P], R]:
    """Never two calls of `fn` for one ImportJob (its `namespace` and `name` keywords) at once:
    the timer runs beside kopf's handlers."""

    @functools.wraps(fn)
    def serialized(self: ImportJobOperator, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._serial(str(kwargs["namespace"]), str(kwargs["name"])):
            return fn(self, *args, **kwargs)

    return serialized


class ImportJobOperator:
    def __init__(self, settings: Settings, api: client.ApiClient) -> None:
        self.settings = settings
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.launcher = KubernetesLauncher(
            api,
            conn_env=settings.conn.env(),
            active_deadline=settings.worker_active_deadline,
            keep_failed_seconds=settings.keep_failed_job_seconds,
            worker_idle_seconds=settings.worker_idle_seconds,
        )
        #: the batch slots every ImportJob of this operator shares (issue 16; None: no budget)
        self.capacity: CapacityKeeper | None = (
            CapacityKeeper(Budget(settings.budget_total, settings.budget_per_tenant))
            if settings.budget_total or settings.budget_per_tenant
            else None
        )
        #: engines by (namespace, Secret name, key, tenant); `_lock` guards only these dicts
        #: (never held around network work); one lock per key serialises that key's creation
        self._engines: dict[EngineKey, _Cached] = {}
        self._failures: dict[EngineKey, tuple[str, float, Problem]] = {}
        self._key_locks: dict[EngineKey, threading.Lock] = {}
        self._users: dict[tuple[str, str], EngineKey] = {}  # ImportJob -> the engine it uses
        self._closer = Closer()  # evicted engines closed after a grace, on one thread
        self._lock = threading.Lock()
        self._recorded_lock = threading.Lock()
        #: one reconcile at a time per ImportJob (namespace, name); `_lock` guards the dict
        self._reconciling: dict[tuple[str, str], threading.Lock] = {}
        #: request annotations acted on whose handled value the status may not show yet, per
        #: ImportJob: a reconcile started from an older body does not act on them twice
        self._acted: dict[tuple[str, str], dict[str, str]] = {}
        #: imports whose CompletionGuard Event this process posted (bounded)
        self._guarded: OrderedDict[str, None] = OrderedDict()
        #: failed batches (job, batch, attempts) whose BatchFailed Event it posted (bounded)
        self._failures_posted: OrderedDict[str, None] = OrderedDict()
        #: runs NOTIFY prompts off the LISTEN hub's thread (one tenant's slow database does not
        #: hold another's notifications)
        self._prompts = ThreadPoolExecutor(max_workers=4, thread_name_prefix="notified")
        #: one run at a time per job; the notices that arrive meanwhile go together to the next
        self._notices: Coalescer[tuple[int, str], tuple[Engine, Completion]] = Coalescer(
            self._prompts.submit, self._prompted
        )

    def close(self) -> None:
        with self._lock:
            cached = list(self._engines.values())
            self._engines.clear()
            self._users.clear()
        for c in cached:
            c.close()
        if self.capacity is not None:
            self.capacity.close()
        self._closer.close_all()  # the evicted engines' pools now
        HUBS.stop_idle()  # the LISTEN connections its engines left lingering
        self._prompts.shutdown(wait=False, cancel_futures=True)

    # -- the ImportJob reconcile ----------------------------------------------------------------
    def _serial(self, namespace: str, name: str) -> threading.Lock:
        with self._lock:
            return self._reconciling.setdefault((namespace, name), threading.Lock())

    @_one_per_importjob
    def reconcile(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        generation: int,
        spec: dict[str, Any],
        status: dict[str, Any],
        annotations: dict[str, str],
        cause: str,
    ) -> ReconcileResult:
        """One reconcile of an ImportJob (one at a time per ImportJob: `_one_per_importjob`)."""
        events: list[KubeEvent] = []
        problem: Problem | None = None
        old = dict(status or {})
        try:
            ij = ImportJobSpec.model_validate(dict(spec))
        except ValidationError as exc:
            problem = Problem(ProblemKind.INVALID_SPEC, format_validation_error(exc))
            return self._done(namespace, name, None, problem, events)
        job_id = ij.job_id(namespace, name)
        try:
            engine = self.engine_for(namespace, ij.database, ij.tenant, user=name)
        except ProblemError as exc:
            return self._done(namespace, name, None, exc.problem, events)
        source = _source(namespace, ij.database)
        try:
            engine.submit(
                job_id,
                ij.engine_spec(),
                target=launch_target(namespace, name, uid, ij),
                source=(uid, generation),
            )
        except SpecChangeRefused as exc:
            problem = Problem(ProblemKind.SPEC_CHANGE_REFUSED, str(exc))
        except psycopg.OperationalError as exc:
            return self._done(namespace, name, None, _db_problem(exc, source, engine.dsn), events)

        new_fields: dict[str, Any] = {}
        try:
            acted = self._acted.setdefault((namespace, name), {})
            for ann, handled in REQUESTS:
                value = annotations.get(ann)
                if not value or value == old.get(handled):
                    acted.pop(handled, None)  # the status records it: nothing to remember
                    continue
                if acted.get(handled) != value:  # not acted on since (this status is older)
                    events.append(self._request(ann, engine, job_id))
                    acted[handled] = value
                new_fields[handled] = value
            events += self._sync(engine, ij, job_id)
            sweep = engine.sweep(job_id, cause=cause)
            events += _recovery_events(
                sweep.actions
                if sweep.demoted or sweep.requeued or sweep.released or sweep.failed
                else []
            )
            if sweep.result is not None:
                events += self._events_for(sweep.result, old.get("summary"))
            engine.update_gauges()
            return self._done(
                namespace, name, lambda: self.view(engine, job_id), problem, events, new_fields
            )
        except psycopg.OperationalError as exc:
            return self._done(namespace, name, None, _db_problem(exc, source, engine.dsn), events)

    @staticmethod
    def _request(annotation: str, engine: Engine, job_id: str) -> KubeEvent:
        """Act on a request annotation's new value (k8s/jobs.py REQUESTS)."""
        if annotation == ANN_RECONCILE:
            swept = engine.sweep(job_id, cause="reconcile")
            return KubeEvent("Normal", "ManualReconcile", reconcile_message(swept.actions))
        retried = engine.retry_failed(job_id)
        return KubeEvent("Normal", "RetryFailed", f"requeued {retried.requeued} failed batch(es)")

    def _done(
        self,
        namespace: str,
        name: str,
        view_of: Callable[[], JobView | None] | None,
        problem: Problem | None,
        events: list[KubeEvent],
        extra: dict[str, Any] | None = None,
    ) -> ReconcileResult:
        written = self.write_status(namespace, name, view_of=view_of, problem=problem, extra=extra)
        new = written[1] if written else {}
        self._settle(namespace, name, new.get("summary") if written else "Deleted")
        if (
            problem is not None
            and not problem.is_spec  # the Invalid Warning is posted by the write (finish_events)
            and written
            and written[0].get("summary") != new.get("summary")
        ):
            events.append(KubeEvent("Warning", problem.kind.value, problem.message[:1000]))
        return ReconcileResult(new, events, problem)

    def write_status(
        self,
        namespace: str,
        name: str,
        *,
        view_of: Callable[[], JobView | None] | None,
        problem: Problem | None = None,
        extra: dict[str, Any] | None = None,
        attempts: int = 5,
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The only status writer. Read the object's resourceVersion, THEN the database, then
        patch with that resourceVersion as a precondition (409 -> start over): a status computed
        from an older database read can never overwrite a newer one. Writes only what changed.
        Returns (old status, new status), or None when the ImportJob is gone."""
        for _ in range(attempts):
            try:
                obj = cast(
                    dict[str, Any],
                    self.custom.get_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, name
                    ),
                )
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            meta, old = obj["metadata"], dict(obj.get("status") or {})
            view = view_of() if view_of is not None else None
            new = compute_status(
                old,
                generation=int(meta.get("generation") or 0),
                now=now_iso(),
                view=view,
                problem=problem,
            )
            new.update(extra or {})
            changed = status_patch(old, new)
            if not changed:
                return old, new
            try:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": changed},
                    _content_type="application/merge-patch+json",
                )
            except ApiException as exc:
                if exc.status == 409:
                    continue  # someone wrote in between: re-read both and try again
                if exc.status == 404:
                    return None
                raise
            self.post_events(
                ObjectRef(namespace, name, str(meta.get("uid") or "")), finish_events(old, new)
            )
            return old, new
        event(
            log,
            "status_write_gave_up",
            logging.WARNING,
            namespace=namespace,
            importjob=name,
            attempts=attempts,
        )
        return None

    def view(self, engine: Engine, job_id: str) -> JobView | None:
        with engine.pool.connection() as conn:
            loaded = load_job(conn, job_id)
            if loaded is None:
                return None
            job, spec = loaded
            snap = read_snapshot(conn, job, spec)
            failed = (
                conn.execute(Q("batches_failed"), {"job_id": job_id, "limit": 3}).fetchall()
                if any(w.failed for w in snap.waves)
                else []
            )
            retrying = (
                failures.retrying_batches(conn, job_id, limit=2)
                if job["status"] == "running" and any(w.pending for w in snap.waves)
                else []
            )
            launch = (
                conn.execute(Q("batch_launch_error_latest"), {"job_id": job_id}).fetchone()
                if job["status"] == "running"
                else None
            )
        outcome = {
            "completed": Outcome.COMPLETED,
            "failed": Outcome.FAILED,
            "suspended": Outcome.SUSPENDED,
            "invalid": Outcome.INVALID,
            "cancelled": Outcome.CANCELLED,
        }.get(job["status"], Outcome.IN_PROGRESS)
        return JobView(
            job_id,
            snap,
            outcome,
            job["status_reason"],
            job["last_dispatch_lag_seconds"],
            tuple(f"{r['batch_id']}: {r['last_error'] or 'no error recorded'}" for r in failed),
            job.get("status_code") or "",
            job.get("staging_report"),
            refusal=job.get("refusal") or "",
            finished_at=job.get("completed_at")
            or (job.get("updated_at") if job["status"] == "failed" else None),
            held=self.capacity.held(job_id) if self.capacity is not None else 0,
            retrying=tuple(f"{r.batch_id}: {r.error or 'no error recorded'}" for r in retrying),
            launch_error=str(launch["last_error"]) if launch else "",
        )

    # -- workers ---------------------------------------------------------------------------------
    def _sync(self, engine: Engine, ij: ImportJobSpec, job_id: str) -> list[KubeEvent]:
        """The engine's worker sync (it reads the database and the launcher's observation and
        decides; a pod's end is recorded there), then a BatchFailed Event for each batch that
        failed for good since this process last looked."""
        engine.sync_workers(job_id)
        return self._failure_events(engine, ij, job_id)

    def _launch_problems(
        self, job_id: str, target: LaunchTarget, problems: list[LaunchProblem]
    ) -> None:
        """Launch problems of a worker sync (whichever path ran it) as Warning Events on the
        ImportJob: LaunchFailed when the group's batches' attempt failed for it (permanent),
        LaunchProblem when it is retried (or other workers of the group run)."""
        if target.kind != "kubernetes":
            return
        events = [
            KubeEvent(
                "Warning",
                "LaunchFailed" if p.permanent else "LaunchProblem",
                launch_problem_message(p)[:1000],
            )
            for p in problems
        ]
        with contextlib.suppress(ApiException):
            self.post_events(target, events)

    def _nudged(self, engine: Engine, ij: ImportJobSpec, job_id: str) -> list[KubeEvent]:
        """A worker Job's prompt: the worker sync, then a coordinator check (a lost worker's
        batch went back to pending; a finished wave may open the next)."""
        events = self._sync(engine, ij, job_id)
        result = engine.check(job_id, cause="worker_event")
        return events + self._events_for(result, None)

    def _failure_events(self, engine: Engine, ij: ImportJobSpec, job_id: str) -> list[KubeEvent]:
        """A Warning BatchFailed Event for each failed attempt this process has not reported
        yet: a batch out of attempts, or one waiting for its retry (its back-off)."""
        out = []
        found = [(f, False) for f in engine.failed_batches(job_id, limit=MAX_FAILURE_EVENTS)]
        found += [(f, True) for f in engine.retrying_batches(job_id, limit=MAX_FAILURE_EVENTS)]
        for f, retried in found:
            # one Event per failed attempt: a batch's n-th failed attempt is reported once,
            # whether it is seen waiting for its retry or (its last) failed for good
            key = f"{job_id}\0{f.batch_id}\0{f.attempts}"
            with self._recorded_lock:
                if key in self._failures_posted:
                    continue
                self._failures_posted[key] = None
                while len(self._failures_posted) > REMEMBERED:
                    self._failures_posted.popitem(last=False)
            message = batch_retry_message(f, ij) if retried else batch_failed_message(f, ij)
            out.append(KubeEvent("Warning", "BatchFailed", message))
        return out

    def on_worker_job(self, job: dict[str, Any]) -> tuple[dict[str, Any], list[KubeEvent]] | None:
        """A worker Job changed (a pod started or ended): a prompt to run the worker sync of the
        ImportJob that controls it (its controller ownerReference, with a matching uid); the
        database decides what it means. Returns that ImportJob and the Events to post."""
        meta = job.get("metadata") or {}
        name, uid = controller_owner(meta)
        namespace = str(meta.get("namespace") or "")
        if not name or not uid or not namespace:
            return None
        try:
            obj = cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if (obj.get("metadata") or {}).get("uid") != uid:
            return None  # a Job of an earlier ImportJob of that name: garbage-collected
        if (obj.get("status") or {}).get("summary") == "Completed":
            self._completed_job(obj, job, namespace, name, uid)
            return obj, []
        try:
            ij = ImportJobSpec.model_validate(obj.get("spec") or {})
            engine = self.engine_for(namespace, ij.database, ij.tenant, user=name)
        except (ValidationError, ProblemError):
            return obj, []  # the ImportJob's own reconcile reports these
        job_id = ij.job_id(namespace, name)
        events: list[KubeEvent] = []
        with contextlib.suppress(psycopg.OperationalError):  # its own reconcile reports it
            events = self._nudged(engine, ij, job_id)
            written = self.write_status(namespace, name, view_of=lambda: self.view(engine, job_id))
            self._settle(namespace, name, written[1].get("summary") if written else "Deleted")
        return obj, events

    def _completed_job(
        self, obj: dict[str, Any], job: dict[str, Any], namespace: str, name: str, uid: str
    ) -> None:
        """A worker Job of an ImportJob whose status says Completed (written from the database,
        and final: a Completed job is never reopened). Nothing is left to run or record, so its
        ended Jobs go without its tenant's engine (which would be created again, pool, LISTEN
        and migration check, only to be evicted at once), and a Job still running is left
        until its own end's event. Worker Jobs send ~5 events each; most arrive after their
        import completed."""
        wave_job = read_wave_job(job, uid)
        if wave_job is None or not wave_job.finished:
            return
        try:
            ij = ImportJobSpec.model_validate(obj.get("spec") or {})
        except ValidationError:
            return
        target = launch_target(namespace, name, uid, ij)
        released = release_completed_workers(
            self.launcher, target, ij.tenant, ij.job_id(namespace, name)
        )
        event(
            log,
            "completed_workers_released",
            logging.DEBUG,
            namespace=namespace,
            importjob=name,
            workers=len(released),
        )

    def forget(self, spec: dict[str, Any], namespace: str, name: str) -> None:
        """A deleted ImportJob: cancel its database job (status `cancelled`, its dispatched and
        processing batches released to pending, data kept: re-applying the ImportJob reopens
        and resumes it), drop its Redis keys, and its engine when no other ImportJob uses it.
        A database or Secret problem is logged and never holds up the deletion."""
        with self._lock:
            self._reconciling.pop((namespace, name), None)
            self._acted.pop((namespace, name), None)
        try:
            ij = ImportJobSpec.model_validate(spec)
        except ValidationError:
            self.release(namespace, name)
            return
        job_id = ij.job_id(namespace, name)
        try:
            engine = self.engine_for(namespace, ij.database, ij.tenant)
            released = engine.cancel(job_id, f"its ImportJob {namespace}/{name} was deleted")
            if self.capacity is not None:
                self.capacity.forget(job_id)  # its slots go to whoever waits
            if released is not None:
                event(
                    log,
                    "importjob_deleted_job_cancelled",
                    namespace=namespace,
                    importjob=name,
                    job_id=job_id,
                    released=len(released),
                )
        except (ProblemError, psycopg.Error, RuntimeError) as exc:  # RuntimeError: SchemaNotReady
            event(
                log,
                "importjob_deleted_job_not_cancelled",
                logging.WARNING,
                namespace=namespace,
                importjob=name,
                job_id=job_id,
                error=exc.problem.message if isinstance(exc, ProblemError) else type(exc).__name__,
            )
        self.release(namespace, name)
        if self.settings.redis_url:
            Flags(self.settings.redis_url, ij.tenant).forget_job(job_id)

    # -- tenants -------------------------------------------------------------------------------
    def read_dsn(self, namespace: str, ref: DatabaseRef) -> str:
        try:
            secret = self.core.read_namespaced_secret(ref.secretName, namespace)
        except ApiException as exc:
            if exc.status in (403, 404):
                raise ProblemError(
                    Problem(
                        ProblemKind.SECRET_MISSING,
                        (
                            f"Secret {namespace}/{ref.secretName} "
                            + ("not found" if exc.status == 404 else "cannot be read (forbidden)")
                            + "; "
                            f"create it with key {ref.key!r} holding the tenant DSN."
                        ),
                    )
                ) from None
            raise
        raw = (secret.data or {}).get(ref.key)
        if not raw:
            raise ProblemError(
                Problem(
                    ProblemKind.SECRET_MISSING,
                    (
                        f"Secret {namespace}/{ref.secretName} has no key {ref.key!r} (the tenant "
                        "DSN)."
                    ),
                )
            )
        try:
            dsn = base64.b64decode(raw).decode().strip()
        except ValueError:  # binascii.Error, UnicodeDecodeError
            raise ProblemError(
                Problem(
                    ProblemKind.INVALID_DSN,
                    f"{_source(namespace, ref)} is not valid base64-encoded UTF-8 text",
                )
            ) from None
        redact.remember(dsn)
        return dsn

    def engine_for(
        self, namespace: str, ref: DatabaseRef, tenant: str, *, user: str | None = None
    ) -> Engine:
        """The engine of (namespace, Secret, key, tenant), created (migrating the tenant) on
        first use and replaced when the Secret's DSN changes. Only callers of the SAME key wait
        for each other: the shared lock guards dictionaries, never a connection. A key whose
        database just failed answers with that problem for a few seconds without trying again,
        so a stalled database does not occupy one handler thread per event. `user`: the
        ImportJob using it (its engine is evicted when all its users are finished or gone)."""
        key: EngineKey = (namespace, ref.secretName, ref.key, tenant)
        dsn = self.read_dsn(namespace, ref)
        fp = fingerprint(dsn)
        with self._lock:
            if user is not None:
                self._users[(namespace, user)] = key
            cached = self._engines.get(key)
            if cached is not None and cached.fingerprint == fp:
                return cached.engine
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                cached = self._engines.get(key)
                if cached is not None and cached.fingerprint == fp:
                    return cached.engine
                failed = self._failures.get(key)
            if failed is not None and failed[0] == fp and time.monotonic() < failed[1]:
                raise ProblemError(failed[2])
            try:
                fresh = self._create(namespace, ref, tenant, dsn, fp)
            except ProblemError as exc:
                with self._lock:
                    self._failures[key] = (fp, time.monotonic() + FAILURE_HOLD_S, exc.problem)
                raise
            with self._lock:
                self._failures.pop(key, None)
                old = self._engines.get(key)
                self._engines[key] = fresh
        if old is not None:
            event(
                log,
                "tenant_engine_replaced",
                logging.INFO,
                **_key_fields(key),
                reason="the Secret's DSN changed",
            )
            self._close_later(old)
        return fresh.engine

    def _create(self, namespace: str, ref: DatabaseRef, tenant: str, dsn: str, fp: str) -> _Cached:
        source = _source(namespace, ref)
        try:
            redact.check_dsn(dsn, source)
        except ValueError as exc:
            raise ProblemError(Problem(ProblemKind.INVALID_DSN, str(exc))) from None
        opts = self.settings.conn
        # The engine's handle on its database's shared pool (no connection yet): the migration
        # runs through it, so the operator holds no connection outside the pools and the LISTEN
        # hubs (issue 16: one migration connection per new engine, 3-5 at once per database).
        engine = Engine(
            dsn,
            tenant,
            redis_url=self.settings.redis_url,
            launcher=self.launcher,
            pool_size=self.settings.pool_size,
            flag_ttl=self.settings.flag_ttl,
            opts=opts,
            capacity=self.capacity,
        )
        try:
            # connect_errors: a refused connection is reported as the server said it (the
            # kind and reason), not as the pool's timeout
            with engine.pool.connection(connect_errors=True) as conn:
                applied = migrate.ensure(conn, tenant)
        except psycopg.OperationalError as exc:
            engine.close()
            raise ProblemError(_db_problem(exc, source, dsn)) from None
        except psycopg.Error as exc:
            engine.close()
            raise ProblemError(
                Problem(
                    ProblemKind.MIGRATION_FAILED,
                    f"migrating tenant {tenant!r} failed: {_sql_error(exc, dsn)}",
                )
            ) from None
        except BaseException:
            engine.close()
            raise
        if applied:
            event(
                log,
                "tenant_migrated",
                tenant=tenant,
                migrations=[f"{m.version:04d}_{m.name}" for m in applied],
            )
        engine.on_launch_problems = self._launch_problems
        # Completions arrive by NOTIFY the moment they commit (engine/notify.py), through one
        # LISTEN connection per database; Job events and the timer stay the backstops.
        try:
            reg = HUBS.register(
                dsn, tenant, functools.partial(self._on_notified, engine), opts=opts
            )
        except ValueError as exc:
            engine.close()
            raise ProblemError(Problem(ProblemKind.INVALID_DSN, f"{source}: {exc}")) from None
        event(
            log,
            "tenant_engine_created",
            logging.INFO,
            **_key_fields((namespace, ref.secretName, ref.key, tenant)),
        )
        return _Cached(engine, fp, reg)

    def release(self, namespace: str, name: str) -> None:
        """ImportJob `name` no longer needs its engine (finished or deleted): evict the engine
        (close its pool, leave the LISTEN hub) when no other ImportJob uses it."""
        with self._lock:
            key = self._users.pop((namespace, name), None)
            if key is None or key in self._users.values():
                return
            cached = self._engines.pop(key, None)
            self._failures.pop(key, None)
            self._key_locks.pop(key, None)
        if cached is not None:
            event(log, "tenant_engine_evicted", logging.INFO, **_key_fields(key))
            self._close_later(cached)

    def _close_later(self, cached: _Cached) -> None:
        """Close an engine no longer in the cache after a grace period: a reconcile or a
        NOTIFY prompt that took it a moment ago finishes its work first (closing under it would
        report a closed pool as a database problem)."""
        cached.registration.close()  # no more prompts for it
        self._closer.later(EVICT_GRACE_S, cached.engine.close)

    def engine_count(self) -> int:
        with self._lock:
            return len(self._engines)

    def _settle(self, namespace: str, name: str, summary: str | None) -> None:
        if summary in FINISHED_SUMMARIES:
            self.release(namespace, name)

    def _on_notified(self, engine: Engine, c: Completion) -> None:
        """A worker's completion committed: look at the database off the hub's thread, one run
        at a time per job (k8s/notices.py)."""
        with contextlib.suppress(RuntimeError):  # shutting down
            self._notices.put((id(engine), c.job_id), (engine, c))

    def _prompted(self, key: tuple[int, str], notices: list[tuple[Engine, Completion]]) -> None:
        """Completion notices of one job: let the coordinator look at the database once for all
        of them (a notice records nothing), dispatch what the recorded state unblocks, and report
        those as Events."""
        engine, c = notices[-1]
        try:
            result = engine.on_completions(c.job_id, [n.batch_id for _, n in notices])
            target = engine.launch_target(c.job_id)
        except psycopg.Error:
            return  # the level-based paths (Job events, the timer) retry
        if target.kind != "kubernetes":
            return
        events = self._events_for(result, None)
        self.post_events(target, events)
        changed = result.decision is not None and result.decision.job_status is not None
        if events or changed:
            # a wave started or the job's status changed (Completed the moment it is recorded,
            # not at the next timer tick): the same one status, written by this path too
            with contextlib.suppress(psycopg.Error, ApiException):
                ns, name = target.namespace, target.owner_name
                written = self.write_status(ns, name, view_of=lambda: self.view(engine, c.job_id))
                self._settle(ns, name, written[1].get("summary") if written else "Deleted")

    def _events_for(self, result: RunResult, old_summary: str | None) -> list[KubeEvent]:
        """The Events an engine run calls for, whichever path ran it (a reconcile, a Job event,
        a NOTIFY prompt). CompletionGuard once per import in this process: the run that first
        finds the main waves done with derived work left is any of those, and the status it
        would compare with may already say DerivedPending (written by another path in between),
        so the status alone missed it now and then."""
        out = []
        for e in _run_events(result, old_summary):
            if e.reason == "CompletionGuard":
                with self._recorded_lock:
                    if result.job_id in self._guarded:
                        continue
                    self._guarded[result.job_id] = None
                    while len(self._guarded) > REMEMBERED:
                        self._guarded.popitem(last=False)
            out.append(e)
        return out

    @functools.cached_property
    def poster(self) -> EventPoster:
        """The one Event poster (component importwaves, repeats aggregated: k8s/events.py)."""
        return EventPoster(self.core)

    def post_events(self, owner: LaunchTarget | ObjectRef, events: list[KubeEvent]) -> None:
        """Post Events about an ImportJob (every path: kopf handlers, Job events, prompts);
        `owner`: the ImportJob, or a launch target naming it."""
        if not events:
            return
        ref = (
            owner
            if isinstance(owner, ObjectRef)
            else ObjectRef(owner.namespace, owner.owner_name, owner.owner_uid)
        )
        self.poster.post(ref, events)


def _source(namespace: str, ref: DatabaseRef) -> str:
    return f"the tenant database in Secret {namespace}/{ref.secretName} key {ref.key!r}"


def _db_problem(exc: psycopg.Error, source: str, dsn: str = "") -> Problem:
    """A database problem named by where its DSN came from and its kind: never psycopg's text
    (its conninfo errors quote the DSN)."""
    d = redact.describe(exc, source, dsn)
    return Problem(ProblemKind(d.kind.value), f"{d.message}; retrying with back-off")


def _sql_error(exc: psycopg.Error, dsn: str) -> str:
    """A server-side SQL error's primary message (what the server said; scrubbed anyway)."""
    text = exc.diag.message_primary or type(exc).__name__
    return redact.scrub(f"{type(exc).__name__}: {text}", dsn)


def reconcile_message(actions: list[str]) -> str:
    """The ManualReconcile Event's message: one action per line (an action may itself contain
    "; ", so `importwaves reconcile --importjob` splits on newlines); cut at whole lines."""
    out: list[str] = []
    size = 0
    for a in actions or ["nothing to do"]:
        line = " ".join(a.split())  # an action's own newlines would split it
        if size + len(line) + 1 > 950:
            out.append(f"... {len(actions) - len(out)} more action(s)")
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)


def _recovery_events(actions: list[str]) -> list[KubeEvent]:
    return [KubeEvent("Warning", "RecoveryAction", a[:1000]) for a in actions]


def _run_events(result: RunResult, old_summary: str | None) -> list[KubeEvent]:
    out = []
    by_wave: dict[int, int] = {}
    for b in result.dispatched:
        if _starts_wave(result, b.wave_number):
            by_wave[b.wave_number] = by_wave.get(b.wave_number, 0) + 1
    for wave, n in sorted(by_wave.items()):
        out.append(
            KubeEvent(
                "Normal",
                "WaveDispatched",
                f"dispatched {n} batch(es) of wave {wave}{_wave_label(result, wave)}",
            )
        )
    guard = result.decision.guard if result.decision else None
    if (
        guard is not None
        and guard.main_done
        and result.outcome in (Outcome.DERIVED_PENDING, Outcome.DERIVED_WAVE_TRIGGERED)
        and old_summary != "DerivedPending"
    ):
        out.append(
            KubeEvent(
                "Normal",
                "CompletionGuard",
                (
                    "main waves done; not completing: "
                    f"{guard.derived_unfinished} derived batch(es) pending or active"
                ),
            )
        )
    return out


def _wave_label(result: RunResult, wave_number: int) -> str:
    """ " (SalesOrder)": the wave's record type (and "derived" for a derived wave)."""
    if result.snapshot is None:
        return ""
    try:
        w = result.snapshot.wave(wave_number)
    except KeyError:
        return ""
    return f" ({w.name}, derived)" if w.is_derived else f" ({w.name})"


def finish_events(old: dict[str, Any], new: dict[str, Any]) -> list[KubeEvent]:
    """ImportCompleted / ImportFailed / the Invalid reason (InvalidSpec, SpecChangeRefused) for
    the status write that made the summary say so (one writer wins each transition:
    write_status patches under the object's resourceVersion). Any writer can make the Invalid
    transition (a refused change is recorded in the job row, so a Job-event refresh may write
    it before the reconcile that refused it), so its Warning belongs to the write, not to the
    caller."""
    before, after = old.get("summary"), new.get("summary")
    if before == after or after not in ("Completed", "Failed", "Invalid"):
        return []
    if after == "Invalid":
        inv = next((c for c in new.get("conditions") or [] if c.get("type") == "Invalid"), None)
        if inv is None or inv.get("status") != "True":
            return []
        return [KubeEvent("Warning", str(inv.get("reason")), str(inv.get("message"))[:1000])]
    if after == "Completed":
        rows = new.get("rowsImported")
        return [
            KubeEvent(
                "Normal",
                "ImportCompleted",
                "import completed: every batch of every wave completed"
                + (f", {rows:,} row(s) imported" if rows is not None else "")
                + (f" in {new['duration']}" if new.get("duration") else ""),
            )
        ]
    return [KubeEvent("Warning", "ImportFailed", f"import failed: {new.get('message') or ''}")]


def _starts_wave(result: RunResult, wave_number: int) -> bool:
    """This run made the wave's first dispatch (its snapshot, read under the job lock before
    the dispatch, has no first dispatch stamped). WaveDispatched is posted for a wave's start
    only: a running wave is refilled after every completed batch, and an Event for each refill
    would be one more API object per batch."""
    if result.snapshot is None:
        return True
    try:
        return result.snapshot.wave(wave_number).first_dispatched_at is None
    except KeyError:
        return True


def _key_fields(key: EngineKey) -> dict[str, str]:
    """An engine's identity as log fields (the Secret's name and key, never its value)."""
    namespace, secret, secret_key, tenant = key
    return {"namespace": namespace, "secret": secret, "key": secret_key, "tenant": tenant}


def launch_target(namespace: str, name: str, uid: str, ij: ImportJobSpec) -> LaunchTarget:
    """Where an ImportJob's workers run, stored with its job at submit: its namespace, itself as
    the worker Jobs' owner, its Secret reference (never the DSN) and its pod settings."""
    return LaunchTarget(
        "kubernetes",
        namespace=namespace,
        owner_name=name,
        owner_uid=uid,
        secret_name=ij.database.secretName,
        secret_key=ij.database.key,
        worker=ij.worker.model_dump(mode="json"),
    )


def launch_problem_message(p: LaunchProblem) -> str:
    """A launch problem's Event message: the wave and record type, then the problem (a refused
    Job's API answer, or the pod, the kubelet's reason and message: no secret, redacted)."""
    g = p.group
    where = (
        f"wave {g.wave_number}" + (f" ({g.record_type_name})" if g.record_type_name else "")
        if g.wave_number is not None
        else "workers"
    )
    then = "its dispatched batches' attempt failed" if p.permanent else "retrying"
    return f"{where}: {p.error}; {then}"


def record_type_name(ij: ImportSpec, record_type_id: int) -> str:
    names = {r.recordTypeId: r.name for r in ij.recordTypes}
    names.update({d.recordTypeId: d.name for d in ij.derivedTypes})
    return names.get(record_type_id, f"record type {record_type_id}")


def batch_retry_message(f: FailedBatch, ij: ImportSpec) -> str:
    """The BatchFailed Event's message for a failed attempt that will be retried: the batch,
    its record type and wave, which attempt of how many, and the attempt's recorded error."""
    head = (
        f"batch {f.batch_id} ({record_type_name(ij, f.record_type_id)}, wave {f.wave_number}) "
        f"attempt {f.attempts} of {ij.retries + 1} failed, retried after its back-off: "
    )
    return (head + (f.error or "no error recorded"))[:1000]


def batch_failed_message(f: FailedBatch, ij: ImportSpec) -> str:
    """The BatchFailed Event's message: the batch, its record type and wave, its attempts and
    its recorded error (a failed worker's termination message or stderr tail)."""
    head = (
        f"batch {f.batch_id} ({record_type_name(ij, f.record_type_id)}, wave {f.wave_number}) "
        f"failed after {f.attempts} attempt(s): "
    )
    return (head + (f.error or "no error recorded"))[:1000]
