"""Back-off for blocked ImportJobs (a missing Secret, an unreachable database): pure.

A blocked ImportJob is retried by the timer with an exponential, capped delay, and its problem
is logged at warning level once per change (not at error level on every retry).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Blocked:
    message: str
    failures: int
    next_try: float  # monotonic seconds


@dataclass(frozen=True)
class Verdict:
    delay: float
    #: the problem is new or its message changed: log it (once)
    changed: bool
    #: consecutive failed tries
    attempt: int = 1


class BlockedRetry:
    """Per ImportJob: how long until the next try, and whether a problem is worth a log line."""

    def __init__(self, base: float = 2.0, cap: float = 60.0) -> None:
        self.base = base
        self.cap = cap
        self._state: dict[tuple[str, str], Blocked] = {}
        self._lock = threading.Lock()

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.base * 2 ** max(0, failures - 1)))

    def due(self, key: tuple[str, str], now: float) -> bool:
        """Whether a timer may retry the ImportJob now (always, when it is not blocked)."""
        with self._lock:
            b = self._state.get(key)
        return b is None or now >= b.next_try

    def failed(self, key: tuple[str, str], message: str, now: float) -> Verdict:
        with self._lock:
            old = self._state.get(key)
            failures = (old.failures if old else 0) + 1
            d = self.delay(failures)
            self._state[key] = Blocked(message, failures, now + d)
        return Verdict(d, old is None or old.message != message, failures)

    def ok(self, key: tuple[str, str]) -> Blocked | None:
        """The ImportJob is no longer blocked; returns what it was blocked by (to log), if any."""
        with self._lock:
            return self._state.pop(key, None)
