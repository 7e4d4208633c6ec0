"""Completion notifications: a worker's NOTIFY arrives at commit, only for its tenant, and a
listener that lost its connection comes back."""

from __future__ import annotations

import queue
import time

import psycopg
import pytest

from helpers import make_engine, setup_job, wait_until
from importwaves.engine.notify import (
    HUBS,
    LINGER_S,
    Completion,
    CompletionListener,
    channel_for,
    parse,
)
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
                (f'LISTEN "{channel_for(tenant)}"',),
            ).fetchone()
            assert killed is not None and killed[0] >= 1
            deadline = time.monotonic() + 15
            payload = completion_payload(WorkItem(dsn, tenant, "j", "b", 1))
            while time.monotonic() < deadline:
                admin.execute("SELECT pg_notify(%s, %s)", (channel_for(tenant), payload))
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


def test_one_listen_connection_for_all_tenants_of_a_database(dsn: str, tenant: str) -> None:
    """Tenants of one database share ONE LISTEN connection; each gets only its own channel's
    completions; the connection goes when the last tenant leaves."""
    a, got_a = _listen(dsn, tenant)
    b, got_b = _listen(dsn, tenant + "_b")
    try:
        hub = HUBS.hub_for(dsn)
        assert hub is not None and hub.tenants() >= {tenant, tenant + "_b"}
        with psycopg.connect(dsn, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%' "
                "AND (query LIKE %s OR query LIKE %s)",
                (f"%{channel_for(tenant)}%", f"%{channel_for(tenant + '_b')}%"),
            ).fetchone()
            assert row is not None and row[0] == 1  # the last statement of the one connection
            for t in (tenant, tenant + "_b"):
                item = WorkItem(dsn, t, "j", f"b-{t}", 1)
                admin.execute(
                    "SELECT pg_notify(%s, %s)", (channel_for(t), completion_payload(item))
                )
            # a payload naming another tenant than its channel is dropped
            admin.execute(
                "SELECT pg_notify(%s, %s)",
                (channel_for(tenant), completion_payload(WorkItem(dsn, "x", "j", "b", 1))),
            )
        assert got_a.get(timeout=5).batch_id == f"b-{tenant}"
        assert got_b.get(timeout=5).batch_id == f"b-{tenant}_b"
        # one connection delivers in send order: the mismatched payload, sent before the last
        # one, would be queued by now
        assert got_a.empty() and got_b.empty()
    finally:
        a.stop()
        b.stop()
    # the connection goes once the last tenant left (after the linger a newcomer would reuse)
    wait_until(lambda: HUBS.hub_for(dsn) is None, timeout=LINGER_S + 5, what="the hub to stop")


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "{",
        "[]",
        "null",
        '{"tenant": "t"}',
        '{"dispatch_seq": "x"}',
        '{"tenant":"t","job_id":"j","batch_id":"b","dispatch_seq":"7"}',
        '{"tenant":"t","job_id":"j","batch_id":"b","dispatch_seq":true}',
        '{"tenant":"t","job_id":"j","batch_id":"b","dispatch_seq":-1}',
        '{"tenant":"t","job_id":"j","batch_id":"","dispatch_seq":1}',
        '{"tenant":"t","job_id":["j"],"batch_id":"b","dispatch_seq":1}',
        '{"tenant":"t","job_id":"j","batch_id":"' + "b" * 2000 + '","dispatch_seq":1}',
    ],
)
def test_malformed_payloads_are_ignored(payload: str) -> None:
    assert parse(payload) is None
