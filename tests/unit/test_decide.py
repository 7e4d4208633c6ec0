"""`decide`: the coordinator's pure brain, one snapshot in, one decision out.

Layout used throughout: wave 1 Customer (main), wave 2 SalesOrder (main), wave 3
TransactionLine (derived, gated on wave 2).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from importwaves.engine.decide import Derivation, decide, derivation
from importwaves.engine.model import (
    DERIVED,
    MAIN,
    DerivedGate,
    Dispatch,
    JobStatus,
    Outcome,
    Snapshot,
    WaveState,
    parents_needed,
)


def wave(n: int, *, level: int = MAIN, **counts: int) -> WaveState:
    """A wave whose `total` defaults to the sum of its status counters."""
    names = {
        1: ("Customer", -2),
        2: ("SalesOrder", -30),
        3: ("TransactionLine", -13),
        4: ("Other", -14),
    }
    name, rid = names[n]
    total = counts.pop("total", None)
    if total is None:
        total = sum(
            counts.get(k, 0) for k in ("pending", "dispatched", "processing", "completed", "failed")
        )
    return WaveState(
        wave_number=n, record_type_id=rid, name=name, level=level, total=total, **counts
    )


def done(n: int, total: int = 3, level: int = MAIN) -> WaveState:
    return wave(n, level=level, completed=total)


def snap(
    *waves: WaveState,
    parallelism: int = 4,
    status: JobStatus = JobStatus.RUNNING,
    suspended: bool = False,
    threshold: int = 100,
    awaiting: int = 0,
    gates: tuple[DerivedGate, ...] | None = None,
) -> Snapshot:
    """A snapshot whose derived gates are computed from wave 2 (as the engine's `gates`)."""
    if gates is None:
        parent = next((w for w in waves if w.wave_number == 2), None)
        gates = tuple(
            DerivedGate(
                w.wave_number,
                parent.total if parent else 0,
                parent.completed if parent else 0,
                threshold,
            )
            for w in waves
            if w.level == DERIVED
        )
    return Snapshot("job", status, suspended, parallelism, tuple(waves), gates, awaiting)


def derived(**counts: int) -> WaveState:
    return wave(3, level=DERIVED, **counts)


# -- already completed -------------------------------------------------------------------------
def test_completed_job_stays_completed_and_dispatches_nothing() -> None:
    d = decide(snap(wave(1, pending=5), derived(pending=3), status=JobStatus.COMPLETED))
    assert d.outcome == Outcome.COMPLETED
    assert d.dispatches == ()
    assert d.job_status is None
    assert d.keep_monitoring is False


# -- main waves: order and parallelism cap --------------------------------------------------------
@pytest.mark.parametrize(
    ("parallelism", "active", "pending", "expected"),
    [
        (4, 0, 10, 4),
        (4, 1, 10, 3),
        (4, 3, 10, 1),
        (4, 4, 10, 0),
        (4, 6, 10, 0),  # parallelism lowered below what is running: nothing new, never negative
        (4, 0, 2, 2),
        (1, 0, 5, 1),
        (1000, 0, 7, 7),
        (3, 0, 0, 0),
    ],
)
def test_parallelism_cap(parallelism: int, active: int, pending: int, expected: int) -> None:
    d = decide(
        snap(
            wave(1, pending=pending, processing=active, total=pending + active + 1),
            wave(2, pending=5),
            parallelism=parallelism,
        )
    )
    limits = [x.limit for x in d.dispatches]
    assert sum(limits) == expected
    assert all(x.wave_number == 1 for x in d.dispatches)
    if expected:
        assert d.outcome == Outcome.WAVE_TRIGGERED
        assert d.dispatches == (Dispatch(1, expected, derived=False),)
    else:
        assert d.outcome == Outcome.IN_PROGRESS


@pytest.mark.parametrize("kind", ["dispatched", "processing"])
def test_both_dispatched_and_processing_count_against_the_cap(kind: str) -> None:
    d = decide(snap(wave(1, pending=10, **{kind: 3}), parallelism=4))
    assert d.dispatches == (Dispatch(1, 1, derived=False),)


def test_active_batches_of_any_wave_count_against_the_cap() -> None:
    # two running derived batches (threshold < 100) use two of four slots
    d = decide(
        snap(
            done(1),
            wave(2, pending=10, completed=10),
            derived(processing=2, pending=4),
            threshold=50,
        )
    )
    assert d.dispatches == (Dispatch(2, 2, derived=False),)


def test_next_main_wave_waits_for_every_batch_of_the_previous_one() -> None:
    d = decide(snap(wave(1, processing=1, completed=9), wave(2, pending=10)))
    assert d.dispatches == ()
    assert d.outcome == Outcome.IN_PROGRESS


def test_next_main_wave_starts_when_previous_is_complete() -> None:
    d = decide(snap(done(1), wave(2, pending=10), derived()))
    assert d.dispatches == (Dispatch(2, 4, derived=False),)
    assert d.outcome == Outcome.WAVE_TRIGGERED


def test_main_wave_with_zero_batches_counts_as_complete() -> None:
    d = decide(snap(wave(1, total=0), wave(2, pending=2)))
    assert d.dispatches == (Dispatch(2, 2, derived=False),)


def test_running_job_gets_no_status_change_while_dispatching() -> None:
    assert decide(snap(wave(1, pending=1))).job_status is None


# -- derived gates ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("threshold", "total", "needed"),
    [
        (1, 0, 0),  # no parent batches: nothing to wait for
        (100, 0, 0),
        (1, 1, 1),  # threshold 1: one batch of a few is enough...
        (1, 100, 1),
        (1, 101, 2),  # ...but 1 % of 101 is 1.01: two
        (100, 1, 1),  # threshold 100: every parent batch
        (100, 7, 7),
        (100, 10_000, 10_000),
        (50, 3, 2),  # 1.5 rounds up
        (50, 4, 2),  # exact: no rounding
        (33, 3, 1),  # 0.99 rounds up to 1
        (34, 3, 2),  # 1.02 rounds up to 2
        (67, 3, 3),  # 2.01
        (66, 3, 2),  # 1.98
        (99, 100, 99),
        (99, 101, 100),  # 99.99
        (29, 100, 29),  # 29 * 100 / 100 stays exact (floats would need care here)
        (1, 10**18, 10**16),  # integers: no float precision limit
        (1, 10**18 + 1, 10**16 + 1),
    ],
)
def test_parents_needed_bounds_and_rounding(threshold: int, total: int, needed: int) -> None:
    assert parents_needed(threshold, total) == needed


@pytest.mark.parametrize(("threshold", "total"), [(-1, 3), (101, 3), (50, -1)])
def test_parents_needed_refuses_what_no_spec_can_say(threshold: int, total: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        parents_needed(threshold, total)


@given(st.integers(1, 100), st.integers(0, 5000), st.data())
def test_parents_needed_is_the_gate_inequality(threshold: int, total: int, data: Any) -> None:
    """completed >= parents_needed  <=>  completed / total >= threshold %, for every count."""
    completed = data.draw(st.integers(0, total))
    gate = DerivedGate(3, total, completed, threshold)
    assert gate.parents_needed == parents_needed(threshold, total)
    assert gate.open is (completed * 100 >= threshold * total)
    assert gate.open is (completed >= parents_needed(threshold, total))


@pytest.mark.parametrize(
    ("total", "completed", "threshold", "is_open"),
    [
        (10, 10, 100, True),
        (10, 9, 100, False),  # the production race: 90 % read before the last commit
        (200, 199, 100, False),  # 99.5 % is not 100 %
        (10, 5, 50, True),
        (10, 4, 50, False),
        (3, 1, 34, False),  # 33.3 % < 34 %
        (3, 1, 33, True),  # 33.3 % >= 33 %
        (3, 2, 67, False),  # 66.7 % < 67 %: integer arithmetic, no float rounding
        (3, 2, 66, True),
        (7, 0, 1, False),
        (7, 1, 1, True),
        (0, 0, 100, True),  # no parent batches at all: nothing to wait for
    ],
)
def test_gate_threshold_table(total: int, completed: int, threshold: int, is_open: bool) -> None:
    gate = DerivedGate(3, total, completed, threshold)
    assert gate.open is is_open
    assert gate.parents_done is (completed == total)
    pending = 1 if completed < total else 0
    d = decide(
        snap(
            done(1),
            wave(2, completed=completed, pending=pending, total=max(total, completed + pending)),
            derived(pending=5),
            gates=(gate,),
            parallelism=4,
        )
    )
    derived_dispatches = [x for x in d.dispatches if x.derived]
    if is_open:
        assert derived_dispatches and derived_dispatches[0].wave_number == 3
        assert 3 in d.derived_ready
    else:
        assert derived_dispatches == []
        assert 3 not in d.derived_ready


@pytest.mark.parametrize(("completed", "pct"), [(0, 0.0), (1, 25.0), (3, 75.0), (4, 100.0)])
def test_gate_percent(completed: int, pct: float) -> None:
    assert DerivedGate(3, 4, completed, 100).percent == pct
    assert DerivedGate(3, 0, 0, 100).percent == 100.0


def test_derived_not_dispatched_below_threshold_even_with_capacity() -> None:
    d = decide(snap(done(1), wave(2, processing=1, completed=9), derived(pending=4), parallelism=8))
    assert d.dispatches == ()
    assert d.outcome == Outcome.IN_PROGRESS
    assert d.derived_ready == ()


def test_threshold_below_100_dispatches_derived_alongside_main_main_first() -> None:
    d = decide(
        snap(
            done(1),
            wave(2, pending=2, processing=1, completed=7),
            derived(pending=5),
            threshold=50,
            parallelism=4,
        )
    )
    assert d.dispatches == (Dispatch(2, 2, derived=False), Dispatch(3, 1, derived=True))
    assert d.outcome == Outcome.DERIVED_WAVE_TRIGGERED
    assert d.reason == "dispatched 1 derived batch(es)"


def test_main_wave_takes_all_capacity_before_derived() -> None:
    d = decide(
        snap(
            done(1),
            wave(2, pending=10, completed=10),
            derived(pending=5),
            threshold=50,
            parallelism=4,
        )
    )
    assert d.dispatches == (Dispatch(2, 4, derived=False),)
    assert d.outcome == Outcome.WAVE_TRIGGERED


def test_two_derived_waves_with_separate_gates() -> None:
    d3 = wave(3, level=DERIVED, pending=2)
    d4 = wave(4, level=DERIVED, pending=2)
    gates = (DerivedGate(3, 4, 4, 100), DerivedGate(4, 4, 3, 100))
    d = decide(snap(done(1), wave(2, completed=4), d3, d4, gates=gates))
    assert d.dispatches == (Dispatch(3, 2, derived=True),)
    assert d.derived_ready == (3,)


# -- completion guard ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("derived_counts", "awaiting", "outcome", "dispatched", "reason_has"),
    [
        # derived batches pending: dispatch them instead of completing
        ({"pending": 3}, 0, Outcome.DERIVED_WAVE_TRIGGERED, 3, "derived"),
        # more pending than capacity: the cap still holds
        ({"pending": 9}, 0, Outcome.DERIVED_WAVE_TRIGGERED, 4, "derived"),
        # derived batches running, none pending: wait, do not complete
        ({"dispatched": 2}, 0, Outcome.DERIVED_PENDING, 0, "2 derived batch(es) pending"),
        ({"processing": 1, "completed": 5}, 0, Outcome.DERIVED_PENDING, 0, "pending or active"),
        # capacity full with derived pending
        ({"processing": 4, "pending": 2}, 0, Outcome.DERIVED_PENDING, 0, "6 derived"),
        # every existing derived batch done, but a parent batch still awaits derived creation
        ({"completed": 5}, 1, Outcome.DERIVED_PENDING, 0, "awaiting derived creation"),
        # no derived batches created yet at all, parents awaiting
        ({}, 3, Outcome.DERIVED_PENDING, 0, "3 parent batch(es) awaiting"),
        # everything done
        ({"completed": 5}, 0, Outcome.COMPLETED, 0, "derived included"),
        # parents had no lines: no derived batches, nothing awaiting
        ({}, 0, Outcome.COMPLETED, 0, "derived included"),
    ],
)
def test_completion_guard_table(
    derived_counts: dict[str, int],
    awaiting: int,
    outcome: Outcome,
    dispatched: int,
    reason_has: str,
) -> None:
    d = decide(snap(done(1), done(2), derived(**derived_counts), awaiting=awaiting))
    assert d.outcome == outcome
    assert sum(x.limit for x in d.dispatches) == dispatched
    assert reason_has in d.reason
    assert d.guard is not None and d.guard.main_done
    if outcome == Outcome.COMPLETED:
        assert d.job_status == JobStatus.COMPLETED
        assert d.keep_monitoring is False
    else:
        assert d.job_status is None  # never completed, never failed, while derived pending
        assert d.keep_monitoring is True


def test_guard_report_counts() -> None:
    d = decide(
        snap(
            done(1),
            done(2),
            derived(pending=2, dispatched=1, processing=2, completed=1),
            awaiting=4,
            parallelism=3,
        )
    )
    g = d.guard
    assert g is not None
    assert (
        g.main_done,
        g.derived_unfinished,
        g.derived_active,
        g.awaiting_derivation,
        g.gates_open,
    ) == (True, 5, 3, 4, True)


def test_guard_reports_main_not_done() -> None:
    g = decide(snap(wave(1, pending=1), wave(2, pending=1), derived())).guard
    assert g is not None and not g.main_done and not g.gates_open


def test_no_completion_while_main_unfinished_even_if_derived_done() -> None:
    d = decide(
        snap(done(1), wave(2, processing=1, completed=3), derived(completed=4), threshold=50)
    )
    assert d.outcome == Outcome.IN_PROGRESS
    assert d.job_status is None


def test_job_without_derived_types_completes_when_main_done() -> None:
    d = decide(snap(done(1), done(2)))
    assert d.outcome == Outcome.COMPLETED
    assert d.job_status == JobStatus.COMPLETED


def test_derived_complete_but_parents_not_all_done_is_not_completion() -> None:
    # gate open at 50 %, every derived batch created so far is done, parents still running
    gate = DerivedGate(3, 4, 2, 50)
    d = decide(
        snap(done(1), wave(2, completed=2, processing=2), derived(completed=2), gates=(gate,))
    )
    assert d.outcome == Outcome.IN_PROGRESS
    assert d.job_status is None


# -- failure detection -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("waves", "outcome"),
    [
        # a main batch out of attempts, nothing else can run
        ((wave(1, failed=1, completed=2), wave(2, pending=3), derived()), Outcome.FAILED),
        # ... but another batch of the wave still runs: wait for it
        ((wave(1, failed=1, processing=1), wave(2, pending=3), derived()), Outcome.IN_PROGRESS),
        # ... or is still pending: dispatch it first
        ((wave(1, failed=1, pending=2), wave(2, pending=3), derived()), Outcome.WAVE_TRIGGERED),
        # a derived batch failed and nothing else is left
        ((done(1), done(2), derived(failed=1, completed=3)), Outcome.FAILED),
        # a derived batch failed, others still pending: keep going
        ((done(1), done(2), derived(failed=1, pending=2)), Outcome.DERIVED_WAVE_TRIGGERED),
        # a derived batch failed, another still running
        ((done(1), done(2), derived(failed=1, dispatched=1)), Outcome.DERIVED_PENDING),
    ],
)
def test_failure_detection_table(waves: tuple[WaveState, ...], outcome: Outcome) -> None:
    d = decide(snap(*waves))
    assert d.outcome == outcome
    if outcome == Outcome.FAILED:
        assert d.job_status == JobStatus.FAILED
        assert d.keep_monitoring is False
        assert d.dispatches == ()
        assert "failed after their last attempt" in d.reason
    else:
        assert d.job_status is None


def test_failed_main_batch_with_open_gate_still_dispatches_derived() -> None:
    d = decide(snap(done(1), wave(2, failed=1, completed=9), derived(pending=2), threshold=50))
    assert d.outcome == Outcome.DERIVED_WAVE_TRIGGERED
    assert d.job_status is None


def test_failed_job_is_reported_failed_again_without_status_change_needed() -> None:
    d = decide(snap(wave(1, failed=1), wave(2, pending=1), status=JobStatus.FAILED))
    assert d.outcome == Outcome.FAILED
    assert d.job_status == JobStatus.FAILED  # equal to the stored status: nothing written


def test_failed_job_whose_batches_were_requeued_runs_again() -> None:
    d = decide(snap(wave(1, pending=1, completed=2), wave(2, pending=1), status=JobStatus.FAILED))
    assert d.outcome == Outcome.WAVE_TRIGGERED
    assert d.job_status == JobStatus.RUNNING


# -- suspend ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "waves",
    [
        (wave(1, pending=5), wave(2, pending=5), derived()),
        (done(1), done(2), derived(pending=5)),
        (wave(1, processing=2, pending=3), wave(2, pending=5), derived()),
    ],
)
def test_suspend_dispatches_nothing(waves: tuple[WaveState, ...]) -> None:
    d = decide(snap(*waves, suspended=True, parallelism=8))
    assert d.outcome == Outcome.SUSPENDED
    assert d.dispatches == ()
    assert d.job_status == JobStatus.SUSPENDED
    assert d.keep_monitoring is True


def test_suspend_reports_running_batches() -> None:
    d = decide(snap(wave(1, processing=2, pending=3), suspended=True))
    assert d.reason == "suspended; 2 batch(es) still running"


def test_suspend_does_not_override_completed() -> None:
    d = decide(snap(done(1), done(2), suspended=True, status=JobStatus.COMPLETED))
    assert d.outcome == Outcome.COMPLETED


@pytest.mark.parametrize(
    ("waves", "outcome"),
    [
        ((wave(1, pending=3), wave(2, pending=1)), Outcome.WAVE_TRIGGERED),
        ((wave(1, processing=3), wave(2, pending=1)), Outcome.IN_PROGRESS),
    ],
)
def test_resume_sets_running(waves: tuple[WaveState, ...], outcome: Outcome) -> None:
    d = decide(snap(*waves, status=JobStatus.SUSPENDED))
    assert d.outcome == outcome
    assert d.job_status == JobStatus.RUNNING


# -- properties over arbitrary snapshots -----------------------------------------------------------
counts = st.fixed_dictionaries(
    {k: st.integers(0, 6) for k in ("pending", "dispatched", "processing", "completed", "failed")}
)


@st.composite
def snapshots(draw: Any) -> Snapshot:
    w1, w2, w3 = (draw(counts) for _ in range(3))
    waves = (wave(1, **w1), wave(2, **w2), derived(**w3))
    threshold = draw(st.integers(1, 100))
    gates = (DerivedGate(3, waves[1].total, waves[1].completed, threshold),)
    return Snapshot(
        "job",
        draw(st.sampled_from(list(JobStatus))),
        draw(st.booleans()),
        draw(st.integers(1, 10)),
        waves,
        gates,
        draw(st.integers(0, 3)),
    )


@settings(max_examples=400, deadline=None)
@given(snapshots())
def test_decide_invariants(s: Snapshot) -> None:
    d = decide(s)
    assert d == decide(s)  # pure
    by = {w.wave_number: w for w in s.waves}
    gate = s.gates[0]
    # the cap, and never more than is pending
    assert sum(x.limit for x in d.dispatches) <= max(0, s.parallelism - s.active)
    assert all(0 < x.limit <= by[x.wave_number].pending for x in d.dispatches)
    for x in d.dispatches:
        if x.derived:
            assert gate.open  # parent-first: never below the threshold
        else:
            earlier = [w for n, w in by.items() if n < x.wave_number and w.level == MAIN]
            assert all(w.all_completed for w in earlier)
    if s.suspended or s.status == JobStatus.COMPLETED:
        assert d.dispatches == ()
    if d.job_status == JobStatus.COMPLETED and s.status != JobStatus.COMPLETED:
        assert all(w.all_completed for w in s.waves)
        assert s.awaiting_derivation == 0 and gate.parents_done
    if not d.keep_monitoring:
        assert d.outcome in (Outcome.COMPLETED, Outcome.FAILED)
    if d.outcome == Outcome.FAILED:
        assert s.active == 0 and any(w.failed for w in s.waves)
    if d.outcome in (Outcome.DERIVED_PENDING, Outcome.DERIVED_WAVE_TRIGGERED):
        assert d.job_status in (None, JobStatus.RUNNING)


# -- when derived batches are created (`derivation`) ------------------------------------------
# wave 2 has 10 parent batches; parallelism 4 unless said otherwise
@pytest.mark.parametrize(
    ("parents", "lines", "awaiting", "threshold", "parallelism", "expected"),
    [
        # nothing awaited: nothing to put off
        (wave(2, completed=10), derived(pending=6), 0, 100, 4, Derivation.NOW),
        # gate open, derived batches pending and slots free: dispatch them first
        (wave(2, completed=10), derived(pending=6), 2, 100, 4, Derivation.AFTER_DISPATCH),
        # gate open but nothing pending to dispatch: create now, then dispatch those
        (wave(2, completed=10), derived(), 2, 100, 4, Derivation.NOW),
        # gate open, every slot taken: no dispatch to hurry, create now
        (wave(2, completed=10), derived(pending=6, processing=4), 2, 100, 4, Derivation.NOW),
        # gate closed, the last parents (2 <= 4) may all be running, 6 derived pending: wait
        (
            wave(2, completed=8, processing=2),
            derived(pending=6),
            2,
            100,
            4,
            Derivation.AT_THRESHOLD,
        ),
        # ... exactly parallelism left to complete
        (
            wave(2, completed=6, processing=4),
            derived(pending=6),
            2,
            100,
            4,
            Derivation.AT_THRESHOLD,
        ),
        # ... more parents left than slots: the crossing is not near, create now
        (
            wave(2, completed=5, processing=4, pending=1),
            derived(pending=6),
            2,
            100,
            4,
            Derivation.NOW,
        ),
        # ... too few derived batches pending to fill the slots at the crossing: create now
        (wave(2, completed=8, processing=2), derived(pending=3), 2, 100, 4, Derivation.NOW),
        # a threshold below 100: near is measured against the parents the gate needs (5)
        (
            wave(2, completed=3, processing=4, pending=3),
            derived(pending=6),
            2,
            50,
            4,
            Derivation.AT_THRESHOLD,
        ),
        # ... open at 5 of 10, the main wave's rest running, slots free: derived go first
        (
            wave(2, completed=5, processing=5),
            derived(pending=6),
            2,
            50,
            8,
            Derivation.AFTER_DISPATCH,
        ),
    ],
)
def test_derivation_table(
    parents: WaveState,
    lines: WaveState,
    awaiting: int,
    threshold: int,
    parallelism: int,
    expected: Derivation,
) -> None:
    s = snap(
        done(1),
        parents,
        lines,
        parallelism=parallelism,
        threshold=threshold,
        awaiting=awaiting,
    )
    assert derivation(s) == expected


def test_derivation_waits_for_no_gate_once_one_is_open() -> None:
    """Two derived waves, one gate open: creation is never left for later (the open gate's
    wave may need the batches being created), whatever the other gate's state."""
    s = snap(
        done(1),
        wave(2, completed=8, processing=2),
        derived(pending=6, processing=4),
        wave(4, level=DERIVED, pending=6),
        awaiting=2,
        gates=(DerivedGate(3, 10, 8, 100), DerivedGate(4, 10, 8, 50)),
    )
    assert derivation(s) == Derivation.NOW


@settings(max_examples=400, deadline=None)
@given(snapshots())
def test_derivation_invariants(s: Snapshot) -> None:
    when = derivation(s)
    assert when == derivation(s)  # pure
    if not s.awaiting_derivation:
        assert when == Derivation.NOW
    if when == Derivation.AFTER_DISPATCH:
        # only to dispatch derived batches first, which the gate allows
        assert any(d.derived for d in decide(s).dispatches) and s.gates[0].open
    if when == Derivation.AT_THRESHOLD:
        gate = s.gates[0]
        assert not gate.open
        assert gate.parents_needed - gate.parent_completed <= s.parallelism
        assert sum(w.pending for w in s.derived_waves) >= s.parallelism
