"""The capacity keeper's nudges (engine/capacity.py): bounded, and never for a forgotten import.

The many-tenants bench (bench/README.md, row "many") found 43,000 nudges queued on the keeper's
two threads (~35 MB of futures, still queued after every import had finished): each report
that freed a slot queued one more coordinator run per waiting import. A nudge is a prompt to
look again; one queued per import is enough.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from importwaves.engine.budget import Budget
from importwaves.engine.capacity import CapacityKeeper

WAITING = [f"b{i}" for i in range(10)]


class Nudges:
    """Nudges that record their calls and block until `gate` is set (the keeper's two threads
    stay busy, so every further nudge queues)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gate = threading.Event()
        self._lock = threading.Lock()

    def for_(self, job_id: str):  # type: ignore[no-untyped-def]
        def nudge() -> None:
            with self._lock:
                self.calls[job_id] += 1
            assert self.gate.wait(30)

        return nudge

    def wait_running(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(self.calls.values()) < n:
            assert time.monotonic() < deadline, self.calls
            time.sleep(0.01)


@pytest.fixture
def nudges() -> Iterator[Nudges]:
    n = Nudges()
    yield n
    n.gate.set()  # never leave the keeper's threads blocked (a failed assertion)


def setup(nudges: Nudges) -> CapacityKeeper:
    """Budget 1: import `a` holds the slot, ten imports of other tenants wait for it."""
    keeper = CapacityKeeper(Budget(total=1))
    assert keeper.grant("t-a", "a", active=0, wanted=1, nudge=nudges.for_("a")).granted == 1
    for j in WAITING:
        g = keeper.grant(f"t-{j}", j, active=0, wanted=1, nudge=nudges.for_(j))
        assert (g.granted, g.held) == (0, 1)
    return keeper


def drain(keeper: CapacityKeeper, nudges: Nudges) -> None:
    nudges.gate.set()
    keeper._executor.shutdown(wait=True)  # every queued nudge has run


def test_freed_slots_queue_at_most_one_nudge_per_waiting_import(nudges: Nudges) -> None:
    keeper = setup(nudges)
    for _ in range(200):  # `a`'s batch ends (a slot is free), then `a` takes it again
        keeper.grant("t-a", "a", active=0, wanted=0)
        keeper.grant("t-a", "a", active=1, wanted=0)
    assert keeper._executor._work_queue.qsize() <= len(WAITING)  # type: ignore[attr-defined]
    assert keeper.queued() <= len(WAITING)
    drain(keeper, nudges)
    # two nudges may have been running (blocked) when more came: 2 + one queued per import
    assert sum(nudges.calls.values()) <= 2 + len(WAITING), nudges.calls
    assert nudges.calls["a"] == 0
    assert keeper.queued() == 0


def test_a_forgotten_import_is_not_nudged(nudges: Nudges) -> None:
    keeper = setup(nudges)
    for _ in range(5):
        keeper.grant("t-a", "a", active=0, wanted=0)
        keeper.grant("t-a", "a", active=1, wanted=0)
    nudges.wait_running(2)  # both of the keeper's threads hold a nudge; the others queue
    running = dict(nudges.calls)
    for j in WAITING:
        keeper.forget(j)  # finished or deleted: its engine may be closed by now
    drain(keeper, nudges)
    assert dict(nudges.calls) == running, nudges.calls
    assert keeper.queued() == 0


def test_a_freed_slot_goes_round_robin_among_tenants_not_to_the_first_name() -> None:
    """Twenty tenants with one import each, one batch at a time to run (a wave after a wave),
    share a budget of 2. Every round the two holders finish their batch and ask again for the
    next one, then every waiting import looks again (as its nudge makes it). Every import is
    served within the rounds a round-robin needs (20 / 2), whatever its name: with ties broken by
    name (before), "t19" never got a slot while "t00".."t02" took every freed one (the
    many-tenants bench: one import waited 32 minutes for a slot, p50 6 s)."""
    keeper = CapacityKeeper(Budget(total=2))
    names = [f"t{i:02d}" for i in range(20)]
    try:
        holding = {j for j in names if keeper.grant(j, j, active=0, wanted=1).granted}
        assert len(holding) == 2
        last_served = dict.fromkeys(names, 0)
        longest = 0
        for rnd in range(1, 61):
            for j in sorted(holding):  # their batch ended: they want the next one
                if keeper.grant(j, j, active=0, wanted=1).granted:
                    last_served[j] = rnd
                else:
                    holding.discard(j)
            for j in names:  # the waiting ones look again
                if j not in holding and keeper.grant(j, j, active=0, wanted=1).granted:
                    holding.add(j)
                    last_served[j] = rnd
            assert len(holding) == 2, holding
            longest = max(longest, *(rnd - s for s in last_served.values()))
        assert longest <= 10, longest
        assert min(last_served.values()) >= 50  # everyone served near the end too
    finally:
        keeper.close()


def test_a_tenants_imports_are_served_in_the_order_they_came() -> None:
    """One tenant, three imports asking in turn for one slot of a budget of 1: the first to ask
    keeps being served as its batches end (it finishes first) rather than the three advancing in
    lock-step; the next one goes once the first is forgotten (finished)."""
    keeper = CapacityKeeper(Budget(total=1))
    try:
        assert keeper.grant("t", "j2", active=0, wanted=1).granted == 1
        assert keeper.grant("t", "j1", active=0, wanted=1).granted == 0
        assert keeper.grant("t", "j3", active=0, wanted=1).granted == 0
        for _ in range(3):  # j2's batch ends, it asks for its next one: still first in line
            assert keeper.grant("t", "j2", active=0, wanted=1).granted == 1
        keeper.forget("j2")
        assert keeper.grant("t", "j3", active=0, wanted=1).granted == 0
        assert keeper.grant("t", "j1", active=0, wanted=1).granted == 1
    finally:
        keeper.close()
