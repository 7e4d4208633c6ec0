"""Issue 13: Event aggregation (pure) and the blocked-ImportJob back-off (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from importwaves.k8s.blocked import BlockedRetry
from importwaves.k8s.events import (
    COMPONENT,
    EventAggregator,
    KubeEvent,
    ObjectRef,
    Post,
    event_body,
)

REF = ObjectRef("ns", "ij", "uid-1")
E = KubeEvent("Warning", "BatchFailed", "batch Customer-000001 failed: boom")


def test_first_post_creates_repeats_bump_the_same_object() -> None:
    agg = EventAggregator()
    key = agg.key(REF, E)
    assert agg.next(key) == Post(None, 1)
    agg.posted(key, "ij.abc", 1)
    assert agg.next(key) == Post("ij.abc", 2)
    agg.posted(key, "ij.abc", 2)
    assert agg.next(key) == Post("ij.abc", 3)


def test_a_different_message_reason_type_or_object_is_another_event() -> None:
    agg = EventAggregator()
    agg.posted(agg.key(REF, E), "ij.abc", 1)
    others = [
        (REF, KubeEvent("Warning", "BatchFailed", "batch Customer-000002 failed: boom")),
        (REF, KubeEvent("Warning", "ImportFailed", E.message)),
        (REF, KubeEvent("Normal", "BatchFailed", E.message)),
        (ObjectRef("ns", "ij", "uid-2"), E),  # same name, a new object
        (ObjectRef("ns2", "ij", "uid-1"), E),
    ]
    for ref, e in others:
        assert agg.next(agg.key(ref, e)) == Post(None, 1), (ref, e)


def test_the_cache_is_bounded_least_recently_posted_first_out() -> None:
    agg = EventAggregator(size=3)
    keys = [agg.key(REF, KubeEvent("Normal", "R", f"m{i}")) for i in range(4)]
    for i, k in enumerate(keys[:3]):
        agg.posted(k, f"e{i}", 1)
    agg.posted(keys[0], "e0", 2)  # recently used again
    agg.posted(keys[3], "e3", 1)
    assert len(agg) == 3
    assert agg.next(keys[1]) == Post(None, 1)  # the oldest one went
    assert agg.next(keys[0]) == Post("e0", 3)
    agg.forget(keys[0])
    assert agg.next(keys[0]) == Post(None, 1)


def test_long_messages_are_cut_the_same_way_for_the_key_and_the_body() -> None:
    agg = EventAggregator()
    long = KubeEvent("Normal", "R", "x" * 5000)
    longer = KubeEvent("Normal", "R", "x" * 6000)
    assert agg.key(REF, long) == agg.key(REF, longer)
    body = event_body(REF, long, datetime(2026, 1, 1, tzinfo=UTC))
    assert len(body["message"]) == 1000


def test_one_reporting_component() -> None:
    body = event_body(REF, E, datetime(2026, 1, 1, tzinfo=UTC))
    assert body["source"] == {"component": COMPONENT}
    assert body["reportingComponent"] == COMPONENT == "importwaves"
    assert body["involvedObject"]["kind"] == "ImportJob"
    assert body["involvedObject"]["uid"] == "uid-1"
    assert body["count"] == 1


def test_blocked_back_off_grows_caps_and_logs_once_per_change() -> None:
    b = BlockedRetry(base=2.0, cap=10.0)
    k = ("ns", "ij")
    assert b.due(k, 0.0)
    v1 = b.failed(k, "Secret ns/db not found", 0.0)
    assert (v1.delay, v1.changed) == (2.0, True)
    assert not b.due(k, 1.9) and b.due(k, 2.0)
    v2 = b.failed(k, "Secret ns/db not found", 2.0)
    assert (v2.delay, v2.changed) == (4.0, False)  # same problem: no new log line
    v3 = b.failed(k, "Secret ns/db not found", 6.0)
    v4 = b.failed(k, "Secret ns/db not found", 14.0)
    assert (v3.delay, v4.delay) == (8.0, 10.0)  # capped
    v5 = b.failed(k, "database unreachable", 24.0)
    assert v5.changed  # another problem: logged
    assert b.ok(k) is not None
    assert b.ok(k) is None
    assert b.due(k, 0.0)
    assert b.due(("ns", "other"), 0.0)
