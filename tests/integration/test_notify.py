"""Completion notifications: a worker's NOTIFY arrives at commit, only for its tenant, and a
listener that lost its connection comes back."""

from __future__ import annotations

import queue
import time

import psycopg
import pytest

from helpers import make_engine, setup_job
from importwaves.engine.notify import CHANNEL, Completion, CompletionListener, parse
from importwaves.worker import EXIT_OK, WorkItem, completion_payload, run_batch

pytestmark = pytest.mark.integration


def _listen(dsn: str, tenant: str) -> tuple[CompletionListener, queue.Queue[Completion]]:
    got: queue.Queue[Completion] = queue.Queue()
    listener = CompletionListener(dsn, tenant, got.put, poll=0.1).start()
    assert listener.listening
    return listener, got


def test_worker_completion_is_notified_at_commit(dsn: str, tenant: str) -> None:
    listener, got = _listen(dsn, tenant)
    other, other_got = _listen(dsn, tenant + "_other")
    try:
        with make_engine(dsn, tenant, None) as engine:
            setup_job(engine, "n1", orders=100)
            first = engine.check("n1").dispatched[0]
            t0 = time.monotonic()
            result = run_batch(WorkItem(dsn, tenant, "n1", first.batch_id, first.dispatch_seq))
            assert result.exit_code == EXIT_OK
            c = got.get(timeout=5)
            elapsed = time.monotonic() - t0
        assert c == Completion(tenant, "n1", first.batch_id, first.dispatch_seq)
        assert elapsed < 5
        assert other_got.empty()  # another tenant's listener ignores it
        # a failed or fenced run sends nothing: only committed completions are announced
        assert run_batch(WorkItem(dsn, tenant, "n1", first.batch_id, 99)).exit_code == EXIT_OK
        time.sleep(0.3)
        assert got.empty()
    finally:
        listener.stop()
        other.stop()


def test_listener_reconnects_after_its_connection_is_killed(dsn: str, tenant: str) -> None:
    listener, got = _listen(dsn, tenant)
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = %s",
                (f"LISTEN {CHANNEL}",),
            ).fetchone()
            assert killed is not None and killed[0] >= 1
            deadline = time.monotonic() + 15
            payload = completion_payload(WorkItem(dsn, tenant, "j", "b", 1))
            while time.monotonic() < deadline:
                admin.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                try:
                    c = got.get(timeout=0.5)
                    break
                except queue.Empty:
                    continue
            else:
                pytest.fail("the listener did not come back within 15 s")
        assert c.batch_id == "b"
    finally:
        listener.stop()


@pytest.mark.parametrize("payload", ["", "{", "[]", '{"tenant": "t"}', '{"dispatch_seq": "x"}'])
def test_malformed_payloads_are_ignored(payload: str) -> None:
    assert parse(payload) is None
