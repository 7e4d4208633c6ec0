"""Completion notifications: LISTEN on the tenant database for workers' NOTIFY.

The reference worker NOTIFYs channel `importwaves` inside its completion transaction, so the
notification arrives exactly when the completion commits — before the worker process exits,
before a pod's status reaches the Job controller. The engine host feeds it to the batch-completed
listener at once. It is only a nudge: a lost notification (listener down, connection dropped,
a worker in another language) changes nothing, because process exits, Job events and the timer
still end in the same idempotent reconcile.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from importwaves.log import event

log = logging.getLogger("importwaves.notify")

CHANNEL = "importwaves"


@dataclass(frozen=True)
class Completion:
    tenant: str
    job_id: str
    batch_id: str
    dispatch_seq: int


def parse(payload: str) -> Completion | None:
    try:
        data = json.loads(payload)
        return Completion(
            str(data["tenant"]),
            str(data["job_id"]),
            str(data["batch_id"]),
            int(data["dispatch_seq"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


class CompletionListener:
    """A daemon thread holding one LISTEN connection; calls `handle` for this tenant's
    completions. Reconnects with back-off; `stop()` ends it within `poll` seconds."""

    def __init__(
        self,
        dsn: str,
        tenant: str,
        handle: Callable[[Completion], object],
        *,
        poll: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.tenant = tenant
        self.handle = handle
        self.poll = poll
        self.max_backoff = max_backoff
        self.received = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"notify-{tenant}", daemon=True)

    def start(self, wait: float = 5.0) -> CompletionListener:
        self._thread.start()
        self._ready.wait(wait)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll * 4 + 5)

    @property
    def listening(self) -> bool:
        return self._ready.is_set()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._ready.set()
                    backoff = 0.5
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=self.poll):
                            self._deliver(n.payload)
            except psycopg.Error as exc:
                self._ready.clear()
                event(
                    log,
                    "notify_listener_reconnecting",
                    logging.WARNING,
                    tenant=self.tenant,
                    error=f"{type(exc).__name__}: {exc}".strip(),
                    retry_in=backoff,
                )
                self._stop.wait(backoff)
                backoff = min(self.max_backoff, backoff * 2)

    def _deliver(self, payload: str) -> None:
        c = parse(payload)
        if c is None or c.tenant != self.tenant:
            return
        self.received += 1
        try:
            self.handle(c)
        except Exception:  # a nudge that failed is retried by the level-based paths
            event(
                log,
                "notify_handler_failed",
                logging.ERROR,
                tenant=self.tenant,
                job_id=c.job_id,
                batch_id=c.batch_id,
                exc_info=True,
            )
