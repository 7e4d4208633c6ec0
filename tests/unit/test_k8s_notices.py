"""k8s/notices.py: one call at a time per key, the items put meanwhile taken together by the
next call; other keys are not held back; a call that raises leaves nothing stranded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from importwaves.k8s.notices import Coalescer

WAIT = 10.0


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.lock = threading.Lock()
        self.entered = {k: threading.Event() for k in ("a", "b")}
        self.gate = threading.Event()
        self.done = threading.Condition(self.lock)
        self.raise_first = False

    def handle(self, key: str, items: list[int]) -> None:
        with self.lock:
            self.running[key] = self.running.get(key, 0) + 1
            self.most[key] = max(self.most.get(key, 0), self.running[key])
            first = not any(k == key for k, _ in self.calls)
            self.calls.append((key, list(items)))
        self.entered[key].set()
        if key == "a" and first:
            assert self.gate.wait(WAIT)
        with self.lock:
            self.running[key] -= 1
            self.done.notify_all()
        if self.raise_first and first:
            raise RuntimeError("the first call fails")

    def items_of(self, key: str) -> list[int]:
        with self.lock:
            return [i for k, items in self.calls if k == key for i in items]

    def wait_for(self, key: str, n: int) -> None:
        with self.lock:
            assert self.done.wait_for(
                lambda: (
                    sum(len(i) for k, i in self.calls if k == key) >= n
                    and not self.running.get(key)
                ),
                WAIT,
            )


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=4) as ex:
        yield ex


def test_items_put_during_a_call_go_together_to_the_next(pool) -> None:
    rec = Recorder()
    c: Coalescer[str, int] = Coalescer(pool.submit, rec.handle)
    c.put("a", 0)
    assert rec.entered["a"].wait(WAIT)  # the first call runs, held at the gate
    for i in range(1, 10):
        c.put("a", i)
    c.put("b", 100)  # another key runs meanwhile
    rec.wait_for("b", 1)
    assert rec.calls[-1] == ("b", [100])
    rec.gate.set()
    rec.wait_for("a", 10)
    assert [items for k, items in rec.calls if k == "a"] == [[0], list(range(1, 10))]
    assert rec.most["a"] == 1
    c.put("a", 10)  # idle again: a new call
    rec.wait_for("a", 11)
    assert rec.calls[-1] == ("a", [10])


def test_a_call_that_raises_strands_nothing(pool) -> None:
    rec = Recorder()
    rec.raise_first = True
    c: Coalescer[str, int] = Coalescer(pool.submit, rec.handle)
    c.put("a", 0)
    assert rec.entered["a"].wait(WAIT)
    c.put("a", 1)  # put while the failing call runs
    rec.gate.set()
    rec.wait_for("a", 2)
    assert rec.items_of("a") == [0, 1]
    c.put("a", 2)  # and the key is usable after it
    rec.wait_for("a", 3)
    assert rec.items_of("a") == [0, 1, 2]


def test_a_refused_submit_leaves_the_key_free() -> None:
    ex = ThreadPoolExecutor(max_workers=1)
    ex.shutdown()
    rec = Recorder()
    c: Coalescer[str, int] = Coalescer(ex.submit, rec.handle)
    with pytest.raises(RuntimeError):
        c.put("a", 0)
    with ThreadPoolExecutor(max_workers=1) as live:
        c._submit = live.submit  # the executor is back (a new one): the key was not held
        c.put("a", 1)
        rec.gate.set()
        rec.wait_for("a", 1)
    assert rec.items_of("a") == [1]
