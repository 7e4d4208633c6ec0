"""Issue 13: peering choice (no peering object: standalone with a warning) and the
ManualReconcile message, one action per line, read back by `reconcile --importjob`."""

from __future__ import annotations

from importwaves.cli import reconcile_lines
from importwaves.k8s.operator import reconcile_message
from importwaves.k8s.peering import PeeringChoice, choose


def test_peering_found_is_used() -> None:
    assert choose(False, "importwaves", [], []) == PeeringChoice(False, "importwaves")
    assert choose(False, "importwaves", ["a", "b"], []) == PeeringChoice(False, "importwaves")


def test_standalone_asked_or_peering_disabled_needs_no_warning() -> None:
    assert choose(True, "importwaves", [], ["cluster"]) == PeeringChoice(True, None)
    assert choose(False, "", ["a"], ["a"]) == PeeringChoice(True, None)


def test_missing_peering_object_runs_standalone_and_says_so() -> None:
    c = choose(False, "importwaves", [], ["cluster"])
    assert (c.standalone, c.peering_name) == (True, None)
    assert c.warning is not None
    assert "no ClusterKopfPeering 'importwaves'" in c.warning
    assert "STANDALONE" in c.warning and "--standalone" in c.warning
    n = choose(False, "importwaves", ["a", "b"], ["b"])
    assert n.standalone and n.warning is not None
    assert "KopfPeering 'importwaves' in namespace(s) b" in n.warning


def test_reconcile_actions_survive_their_own_semicolons() -> None:
    actions = [
        "refreshed the wave_monitoring_active flag",
        "progression check: derived_pending (main waves done; 3 derived batch(es) pending)",
    ]
    message = reconcile_message(actions)
    assert reconcile_lines(message) == actions


def test_reconcile_message_fits_an_event_and_cuts_at_whole_lines() -> None:
    actions = [f"requeued stale batch B-{i:06d}; it had no heartbeat" for i in range(100)]
    message = reconcile_message(actions)
    assert len(message) <= 1000
    lines = reconcile_lines(message)
    assert lines[:-1] == actions[: len(lines) - 1]
    assert lines[-1] == f"... {100 - (len(lines) - 1)} more action(s)"
    assert reconcile_lines(reconcile_message([])) == ["nothing to do"]
    assert reconcile_lines(reconcile_message(["two\nlines"])) == ["two lines"]
    assert reconcile_lines(None) == []
