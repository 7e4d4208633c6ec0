"""In-process domain events (the seed's `DerivedWavesCreated` and its listener).

Handlers run synchronously, but an event emitted while another is being handled on the same
thread is queued and run after it, so handlers never recurse into each other.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from importwaves.log import event

log = logging.getLogger("importwaves.events")


@dataclass(frozen=True)
class DerivedWavesCreated:
    """Derived (TransactionLine) batches were upserted for a job.

    `decided`: they were created inside a coordinator run, under the job lock, before that run
    read its snapshot, so the run already decided (and dispatched) with them included: a nudge
    has nothing left to do. Batches created any other way (decided=False) get the nudge."""

    tenant: str
    job_id: str
    wave_numbers: tuple[int, ...]
    batch_count: int
    source: str
    decided: bool = False


Handler = Callable[[Any], object]


class EventBus:
    def __init__(self) -> None:
        self._handlers: dict[type, list[Handler]] = defaultdict(list)
        self._local = threading.local()

    def subscribe(self, kind: type, handler: Handler) -> None:
        self._handlers[kind].append(handler)

    def handlers(self, kind: type) -> list[Handler]:
        return list(self._handlers.get(kind, []))

    def emit(self, evt: object) -> None:
        queue: deque[object] | None = getattr(self._local, "queue", None)
        if queue is not None:  # already dispatching on this thread: run after the current one
            queue.append(evt)
            return
        queue = self._local.queue = deque([evt])
        try:
            while queue:
                current = queue.popleft()
                for handler in self._handlers.get(type(current), []):
                    try:
                        handler(current)
                    except Exception:
                        event(
                            log,
                            "event_handler_failed",
                            logging.ERROR,
                            event_type=type(current).__name__,
                            exc_info=True,
                        )
        finally:
            self._local.queue = None
