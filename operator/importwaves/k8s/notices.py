"""Completion notices to coordinator runs: one run at a time per job, the notices that arrive
while it runs taken together by the next.

The operator looks at the database on every completion notice of a job (a prompt: the run reads
the rows). It ran each notice as its own run on a pool of threads: with four workers completing
together, four runs of one job queued on its job lock (`SELECT ... FOR UPDATE`), each holding a
thread and a connection while it waited, and each finding little left to do when it got the
lock (row 8 of the bench: 865 job-lock waits of 10 ms on average per 1M-line import). The local
runner already takes the notices queued at a moment in one run; this does the same for a host
whose notices arrive on other threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Coalescer(Generic[K, T]):
    """`put(key, item)`: `handle(key, items)` runs through `submit` (an executor's), at most one
    call per key at a time; items put while a call for their key is queued or running go to the
    next call, all together. When a call raises, what was put meanwhile gets a call of its own."""

    def __init__(
        self,
        submit: Callable[[Callable[[], None]], object],
        handle: Callable[[K, list[T]], None],
    ) -> None:
        self._submit = submit
        self._handle = handle
        self._lock = threading.Lock()
        #: per key with a call queued or running: the items its next round takes
        self._boxes: dict[K, list[T]] = {}

    def put(self, key: K, item: T) -> None:
        with self._lock:
            box = self._boxes.get(key)
            if box is not None:
                box.append(item)  # the call queued or running for this key takes it
                return
            self._boxes[key] = [item]
        try:
            self._submit(lambda: self._drain(key))
        except BaseException:
            with self._lock:
                self._boxes.pop(key, None)
            raise

    def _drain(self, key: K) -> None:
        while True:
            with self._lock:
                items = self._boxes.get(key)
                if not items:
                    self._boxes.pop(key, None)
                    return
                self._boxes[key] = []
            try:
                self._handle(key, items)
            except BaseException:
                self._after_error(key)
                raise

    def _after_error(self, key: K) -> None:
        """The handler raised: items put meanwhile get a call of their own."""
        with self._lock:
            if not self._boxes.get(key):
                self._boxes.pop(key, None)
                return
        try:
            self._submit(lambda: self._drain(key))
        except BaseException:
            with self._lock:
                self._boxes.pop(key, None)
