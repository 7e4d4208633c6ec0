"""The operator's JSON log lines: kopf's per-object records stay one short line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from importwaves import log as iwlog


@pytest.fixture(autouse=True)
def _restore_loggers() -> Iterator[None]:
    """iwlog.setup() reconfigures the `importwaves` and `kopf` loggers: put them back. kopf's
    own Event poster sits on `kopf.objects` once any test imported the kopf handlers module (it
    reads the record's real settings): off while these records, with stand-in settings, pass."""
    saved = {}
    for name in ("importwaves", "kopf", "kopf.objects"):
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate)
    logging.getLogger("kopf.objects").handlers[:] = []
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_kopf_object_records_drop_settings_and_keep_the_object_ref() -> None:
    stream = io.StringIO()
    iwlog.setup("INFO", stream)
    ref = {"apiVersion": "importwaves.io/v1alpha1", "kind": "ImportJob", "name": "x"}
    logging.getLogger("kopf.objects").info(
        "Timer 'tick' succeeded.",
        extra={"settings": object(), "k8s_skip": False, "k8s_ref": ref},
    )
    line = stream.getvalue().strip()
    rec = json.loads(line)
    assert rec["msg"] == "Timer 'tick' succeeded."
    assert rec["k8s_ref"] == ref
    assert "settings" not in rec and "k8s_skip" not in rec
    assert len(line) < 400


def test_events_keep_their_fields() -> None:
    stream = io.StringIO()
    iwlog.setup("INFO", stream)
    iwlog.event(logging.getLogger("importwaves.test"), "wave_dispatched", job_id="j", wave_number=2)
    rec = json.loads(stream.getvalue())
    assert (rec["event"], rec["job_id"], rec["wave_number"]) == ("wave_dispatched", "j", 2)


def test_events_named_reads_back_what_event_wrote() -> None:
    stream = io.StringIO()
    iwlog.setup("INFO", stream)
    lg = logging.getLogger("importwaves.test")
    iwlog.event(lg, "batch_completed", job_id="j", batch_id="b1")
    iwlog.event(lg, "wave_dispatched", job_id="j", wave_number=2)
    iwlog.event(lg, "batch_completed", job_id="j", batch_id="b2")
    # other processes' lines in the same file: plain text, or JSON naming the event elsewhere
    text = stream.getvalue() + 'kopf said "batch_completed"\n{"msg": "batch_completed"}\n'
    got = iwlog.events_named(text, "batch_completed")
    assert [(r["job_id"], r["batch_id"]) for r in got] == [("j", "b1"), ("j", "b2")]
    assert [r["wave_number"] for r in iwlog.events_named(text, "wave_dispatched")] == [2]
    assert iwlog.events_named(text, "job_completed") == []
