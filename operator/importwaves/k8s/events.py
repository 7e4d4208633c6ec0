"""Kubernetes Events about ImportJobs: one poster, one reporting component, repeats aggregated.

Every Event the operator posts goes through `EventPoster` (component `importwaves`; kopf's own
poster is switched off in k8s/handlers.py). A repeat of the same Event (same object, type, reason
and message) bumps the first one's `count` and `lastTimestamp` instead of creating another
object, the way kubectl and the kubelet's EventCorrelator aggregate: `EventAggregator` is the
pure, bounded memory of which Event object stands for which (object, type, reason, message).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from importwaves.k8s.crd import GROUP, KIND, VERSION
from importwaves.log import event

log = logging.getLogger("importwaves.events")

#: The reporting component of every Event the operator posts.
COMPONENT = "importwaves"
#: Event objects remembered for aggregation (least recently posted ones are forgotten: a
#: forgotten repeat only costs one more Event object).
EVENTS_KEPT = 1024
#: Longest Event message (the API server allows 1 KiB for events.k8s.io; core/v1 more).
MESSAGE_MAX = 1000


@dataclass(frozen=True)
class KubeEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class ObjectRef:
    """The ImportJob an Event is about."""

    namespace: str
    name: str
    uid: str


EventKey = tuple[str, str, str, str, str, str]  # namespace, name, uid, type, reason, message


@dataclass(frozen=True)
class Post:
    """What to do for one Event: create a new object (name None) or bump `name` to `count`."""

    name: str | None
    count: int


class EventAggregator:
    """Which Event object (and its count) stands for each (object, type, reason, message):
    bounded, least recently used first out, thread-safe."""

    def __init__(self, size: int = EVENTS_KEPT) -> None:
        self.size = size
        self._seen: OrderedDict[EventKey, tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(ref: ObjectRef, e: KubeEvent) -> EventKey:
        return (ref.namespace, ref.name, ref.uid, e.type, e.reason, _message(e))

    def next(self, key: EventKey) -> Post:
        with self._lock:
            hit = self._seen.get(key)
        return Post(None, 1) if hit is None else Post(hit[0], hit[1] + 1)

    def posted(self, key: EventKey, name: str, count: int) -> None:
        with self._lock:
            self._seen[key] = (name, count)
            self._seen.move_to_end(key)
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)

    def forget(self, key: EventKey) -> None:
        with self._lock:
            self._seen.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


def _message(e: KubeEvent) -> str:
    return e.message[:MESSAGE_MAX]


def event_body(ref: ObjectRef, e: KubeEvent, now: datetime) -> dict[str, Any]:
    """A new core/v1 Event about an ImportJob (count 1)."""
    return {
        "metadata": {"generateName": f"{ref.name[:200]}.", "namespace": ref.namespace},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": ref.name,
            "namespace": ref.namespace,
            "uid": ref.uid,
        },
        "type": e.type,
        "reason": e.reason,
        "message": _message(e),
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class EventPoster:
    """Posts (or aggregates) Events about ImportJobs; never raises for an API error (an Event
    is a courtesy: a failed post is logged, the import goes on)."""

    def __init__(self, core: client.CoreV1Api, aggregator: EventAggregator | None = None) -> None:
        self.core = core
        self.aggregator = aggregator or EventAggregator()

    def post(self, ref: ObjectRef, events: list[KubeEvent]) -> None:
        for e in events:
            self._post_one(ref, e)

    def _post_one(self, ref: ObjectRef, e: KubeEvent) -> None:
        key = EventAggregator.key(ref, e)
        now = datetime.now(UTC)
        step = self.aggregator.next(key)
        try:
            if step.name is not None:
                try:
                    self.core.patch_namespaced_event(
                        step.name,
                        ref.namespace,
                        {"count": step.count, "lastTimestamp": now.isoformat()},
                    )
                    self.aggregator.posted(key, step.name, step.count)
                    return
                except ApiException as exc:
                    if exc.status != 404:  # deleted meanwhile (Events expire): a new one
                        raise
                    self.aggregator.forget(key)
            created = self.core.create_namespaced_event(
                ref.namespace,
                event_body(ref, e, now),  # type: ignore[arg-type]
            )
            self.aggregator.posted(key, str(created.metadata.name), 1)
        except ApiException as exc:
            event(
                log,
                "event_post_failed",
                logging.WARNING,
                importjob=ref.name,
                status=exc.status,
                reason=e.reason,
            )
