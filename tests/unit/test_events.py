"""EventBus: synchronous handlers, re-entrant emits queued (never nested), per thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from importwaves.engine.events import DerivedWavesCreated, EventBus


@dataclass(frozen=True)
class Ping:
    n: int


@dataclass(frozen=True)
class Pong:
    n: int


def evt(job: str = "j") -> DerivedWavesCreated:
    return DerivedWavesCreated("t", job, (3,), 2, source="test")


def test_handlers_run_synchronously_in_subscription_order() -> None:
    bus, seen = EventBus(), []
    bus.subscribe(DerivedWavesCreated, lambda e: seen.append(("a", e.job_id)))
    bus.subscribe(DerivedWavesCreated, lambda e: seen.append(("b", e.job_id)))
    bus.emit(evt("j1"))
    assert seen == [("a", "j1"), ("b", "j1")]


def test_events_without_handlers_and_other_types_are_ignored() -> None:
    bus, seen = EventBus(), []
    bus.subscribe(Ping, seen.append)
    bus.emit(Pong(1))
    bus.emit(evt())
    assert seen == []
    assert bus.handlers(Pong) == []


def test_handlers_returns_a_copy() -> None:
    bus = EventBus()
    bus.subscribe(Ping, print)
    bus.handlers(Ping).clear()
    assert bus.handlers(Ping) == [print]


def test_emit_from_a_handler_is_queued_not_nested() -> None:
    bus, log, depth = EventBus(), [], [0]

    def on_ping(e: Ping) -> None:
        depth[0] += 1
        log.append(("ping start", e.n, depth[0]))
        if e.n < 3:
            bus.emit(Ping(e.n + 1))
            bus.emit(Pong(e.n))
        log.append(("ping end", e.n, depth[0]))
        depth[0] -= 1

    def on_pong(e: Pong) -> None:
        depth[0] += 1
        log.append(("pong", e.n, depth[0]))
        depth[0] -= 1

    bus.subscribe(Ping, on_ping)
    bus.subscribe(Pong, on_pong)
    bus.emit(Ping(1))
    assert log == [
        ("ping start", 1, 1),
        ("ping end", 1, 1),
        ("ping start", 2, 1),
        ("ping end", 2, 1),
        ("pong", 1, 1),
        ("ping start", 3, 1),
        ("ping end", 3, 1),
        ("pong", 2, 1),
    ]
    assert max(d for *_, d in log) == 1  # never more than one handler deep


def test_a_failing_handler_neither_stops_others_nor_wedges_the_bus() -> None:
    bus, seen = EventBus(), []

    def boom(e: Ping) -> None:
        bus.emit(Pong(e.n))  # queued before the failure: still delivered
        raise RuntimeError("handler failed")

    bus.subscribe(Ping, boom)
    bus.subscribe(Ping, lambda e: seen.append(("after", e.n)))
    bus.subscribe(Pong, lambda e: seen.append(("pong", e.n)))
    bus.emit(Ping(1))  # does not raise
    assert seen == [("after", 1), ("pong", 1)]
    bus.emit(Ping(2))  # the queue was reset: a later emit runs normally
    assert seen[-2:] == [("after", 2), ("pong", 2)]


def test_emits_on_other_threads_are_not_queued_behind_this_one() -> None:
    bus = EventBus()
    inside, other_done, seen = threading.Event(), threading.Event(), []

    def slow(e: Ping) -> None:
        if e.n == 1:
            inside.set()
            # while this thread is dispatching, another thread's emit runs at once on its own
            assert other_done.wait(5), "the other thread's event was queued behind this one"
        seen.append(e.n)

    bus.subscribe(Ping, slow)
    t = threading.Thread(target=bus.emit, args=(Ping(1),))
    t.start()
    assert inside.wait(5)
    bus.emit(Ping(2))
    other_done.set()
    t.join(5)
    assert not t.is_alive()
    assert seen == [2, 1]
