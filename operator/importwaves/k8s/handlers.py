"""Every kopf decorator of the operator, each one line of work: gather, call, apply.

The work lives in k8s/operator.py (ImportJobOperator); decisions live in the engine.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from importwaves import memdebug, metrics
from importwaves.k8s.blocked import BlockedRetry
from importwaves.k8s.crd import GROUP, PLURAL, VERSION
from importwaves.k8s.events import ObjectRef
from importwaves.k8s.jobs import (
    LABEL_OWNER_UID,
    finished,
    needs_polling,
    requests_pending,
    timer_due,
)
from importwaves.k8s.operator import ImportJobOperator, ReconcileResult
from importwaves.log import event
from importwaves.settings import Settings

log = logging.getLogger("importwaves.handlers")

SETTINGS = Settings()
#: back-off of blocked ImportJobs (timer retries), per (namespace, name)
BLOCKED = BlockedRetry(base=2.0, cap=SETTINGS.max_backoff)

#: The finalizer the operator keeps on each ImportJob (kopf's `settings.persistence.finalizer`).
FINALIZER = f"{GROUP}/finalizer"
#: kopf's default, which operator versions before it used. kopf removes only the finalizer it is
#: configured with, so an ImportJob still carrying this one would never go away: the operator
#: drops it (legacy_finalizer_patch, on every ImportJob event, alive or being deleted).
LEGACY_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


def legacy_finalizer_patch(finalizers: list[str]) -> list[dict[str, Any]]:
    """The JSON patch that removes the legacy finalizer, guarded by a `test` of its position
    (a list changed meanwhile fails the patch instead of removing another entry); [] if absent."""
    if LEGACY_FINALIZER not in finalizers:
        return []
    path = f"/metadata/finalizers/{finalizers.index(LEGACY_FINALIZER)}"
    return [
        {"op": "test", "path": path, "value": LEGACY_FINALIZER},
        {"op": "remove", "path": path},
    ]


_state: dict[str, ImportJobOperator] = {}
#: when the timer last reconciled each ImportJob (monotonic), for `timer_due`
TICKED: dict[tuple[str, str], float] = {}


def _op() -> ImportJobOperator:
    return _state["operator"]


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    # kopf removes the finalizer of a deleted ImportJob only once its `tick` timer has exited;
    # a tick still running at deletion was re-checked after kopf's default 60 s, so a deletion
    # hung for a minute (seen in the e2e deletion test): re-check every second.
    settings.background.cancellation_polling = 1
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # One reporting component: every Event goes through the operator's own poster (component
    # importwaves, repeats aggregated: k8s/events.py); kopf posts none of its own.
    settings.posting.enabled = False
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.batching.error_delays = (1, 2, 5, 10, 20, 30, 60)
    # Peering (name, priority, standalone) comes from `importwaves run` via kopf.run().
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    _state["operator"] = ImportJobOperator(SETTINGS, client.ApiClient())
    if SETTINGS.metrics_port:
        metrics.serve(SETTINGS.metrics_port)
    # IMPORTWAVES_TRACEMALLOC=<dir>: opt-in memory reports (importwaves/memdebug.py), started
    # here, after the imports (tracing them with several frames takes ~25 s)
    memdebug.start_from_env()


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    op = _state.pop("operator", None)
    if op is not None:
        op.close()


@kopf.on.probe(id="engines")
def probe(**_: Any) -> int:
    return len(_state)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def changed(body: kopf.Body, reason: str, retry: int, **_: Any) -> None:
    _apply(body, _reconcile(body, str(reason)), retry)


def _unfinished(body: kopf.Body, **_: Any) -> bool:
    """The timer's filter (k8s/jobs.py `needs_polling`)."""
    status = cast(dict[str, Any], dict(body.get("status") or {}))
    return needs_polling(status, dict(body.get("metadata", {}).get("annotations") or {}))


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.timer_interval, sharp=False, when=_unfinished)
def tick(body: kopf.Body, **_: Any) -> None:
    key, now = _key(body), time.monotonic()
    if not BLOCKED.due(key, now):
        return  # blocked: retried after its back-off, not on every tick
    if not timer_due(dict(body.status), TICKED.get(key), now, SETTINGS.timer_interval):
        return  # waiting for capacity: the capacity keeper prompts it when a slot frees
    TICKED[key] = now
    _apply(body, _reconcile(body, "timer"), 0)


def _finished_with_request(body: kopf.Body, **_: Any) -> bool:
    status = cast(dict[str, Any], dict(body.get("status") or {}))
    annotations = dict(body.get("metadata", {}).get("annotations") or {})
    return finished(status) and requests_pending(status, annotations)


@kopf.on.event(GROUP, VERSION, PLURAL, when=_finished_with_request)
def request_when_finished(body: kopf.Body, type: str | None, **_: Any) -> None:
    """A request annotation (`reconcile`, `retry-failed`) on a Completed or Failed ImportJob.
    The timer alone is not enough: it stops when the ImportJob finishes, and kopf starts it again
    on the annotation's event only if the stopped one has ended; one still finishing its last
    tick then (posting that tick's Events) stays the only one, ends, and nothing would act."""
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        return
    _apply(body, _reconcile(body, "request"), 0)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_OWNER_UID: kopf.PRESENT})
def worker_job(body: kopf.Body, type: str | None, **_: Any) -> None:
    """A worker Job changed (its pods' starts and ends move its status): a prompt to run the
    worker sync of the ImportJob controlling it. Its deletion (by the sync itself) is none."""
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        return
    nudged = _op().on_worker_job(dict(body))
    if nudged is not None:
        owner, events = nudged
        meta = owner.get("metadata") or {}
        _op().post_events(
            ObjectRef(
                str(meta.get("namespace") or ""),
                str(meta.get("name") or ""),
                str(meta.get("uid") or ""),
            ),
            events,
        )


def _has_legacy_finalizer(body: kopf.Body, **_: Any) -> bool:
    return LEGACY_FINALIZER in (body.metadata.get("finalizers") or [])


@kopf.on.event(GROUP, VERSION, PLURAL, when=_has_legacy_finalizer)
def legacy_finalizer(body: kopf.Body, **_: Any) -> None:
    """Drop the finalizer of an earlier operator version. An event handler, because kopf runs no
    other handler for an ImportJob deleted without its own finalizer on it."""
    meta = body.metadata
    ops = legacy_finalizer_patch(list(meta.get("finalizers") or []))
    if not ops:
        return
    try:
        client.CustomObjectsApi(_op().api).patch_namespaced_custom_object(
            GROUP,
            VERSION,
            meta.namespace or "",
            PLURAL,
            meta.name or "",
            ops,
            _content_type="application/json-patch+json",
        )
    except ApiException as exc:
        if exc.status not in (404, 409, 422):  # gone, or changed meanwhile: the next event
            raise
        return
    log.info(
        "removed the legacy finalizer %s from ImportJob %s/%s",
        LEGACY_FINALIZER,
        meta.namespace,
        meta.name,
    )


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def deleted(body: kopf.Body, **_: Any) -> None:
    TICKED.pop(_key(body), None)
    _op().forget(dict(body.spec), body.metadata.namespace or "", body.metadata.name or "")


def _reconcile(body: kopf.Body, cause: str) -> ReconcileResult:
    meta = body.metadata
    return _op().reconcile(
        namespace=meta.namespace or "",
        name=meta.name or "",
        uid=meta.uid or "",
        generation=int(meta.get("generation") or 0),
        spec=dict(body.spec),
        status=dict(body.status),
        annotations=dict(meta.annotations),
        cause=cause,
    )


def _key(body: kopf.Body) -> tuple[str, str]:
    return (body.metadata.namespace or "", body.metadata.name or "")


def _apply(body: kopf.Body, result: ReconcileResult, retry: int) -> None:
    """Status was written by the operator itself under an optimistic lock (write_status); here
    the Events are posted, and a blocked ImportJob (database or Secret problem) is given a
    back-off: the timer retries it when due, and the problem is logged at warning level once
    per change (kopf's TemporaryError logged an error on every retry)."""
    meta = body.metadata
    _op().post_events(
        ObjectRef(meta.namespace or "", meta.name or "", meta.uid or ""), result.events
    )
    key = _key(body)
    if result.problem is not None and not result.problem.is_spec:
        verdict = BLOCKED.failed(key, result.problem.message, time.monotonic())
        if verdict.changed:
            event(
                log,
                "importjob_blocked",
                logging.WARNING,
                namespace=key[0],
                importjob=key[1],
                reason=result.problem.kind.value,
                problem=result.problem.message,
                next_try_in=verdict.delay,
            )
        else:
            event(
                log,
                "importjob_blocked_retry",
                namespace=key[0],
                importjob=key[1],
                reason=result.problem.kind.value,
                attempt=verdict.attempt,
                next_try_in=verdict.delay,
            )
    elif BLOCKED.ok(key) is not None:
        event(log, "importjob_unblocked", namespace=key[0], importjob=key[1])
