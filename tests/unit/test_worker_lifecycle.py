"""The engine's worker lifecycle decision (engine/workers.py), every branch: groups per job and
per wave and their sizes, batches lost after the grace (ended or absent workers), nothing lost
while the observation is incomplete or the worker lives, what is discarded, and the one
launch-failure policy (permanent fails the group's unreserved dispatched batches; transient is
retried)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from importwaves.engine.model import DERIVED, MAIN, WaveState
from importwaves.engine.workers import (
    HeldBatch,
    WorkerPlan,
    after_dispatch,
    plan_problems,
    plan_unclaimed,
    plan_workers,
    start_problem,
    wave_ahead,
)
from importwaves.launch.port import (
    LaunchProblem,
    LaunchSeen,
    Observation,
    WorkerGroup,
    WorkerSeen,
)

GRACE = 5.0


def held(
    batch_id: str,
    status: str = "dispatched",
    *,
    wave: int = 1,
    worker: str | None = None,
    quiet: float = 0.0,
    seq: int = 1,
    name: str = "Customer",
) -> HeldBatch:
    return HeldBatch(batch_id, wave, name, status, seq, worker, quiet)


def alive(worker_id: str, wave: int | None = None) -> WorkerSeen:
    return WorkerSeen(worker_id, "job", wave, True)


def ended(
    worker_id: str, code: int | None = 1, message: str = "", wave: int | None = None
) -> WorkerSeen:
    return WorkerSeen(worker_id, "job", wave, False, code, message)


def plan(
    held_batches: list[HeldBatch],
    seen: Observation | None = None,
    *,
    status: str | None = "running",
    parallelism: int = 4,
    per_wave: bool = False,
) -> WorkerPlan:
    return plan_workers(
        "job",
        status,
        parallelism,
        held_batches,
        seen or Observation(()),
        per_wave=per_wave,
        grace=GRACE,
    )


# -- groups ----------------------------------------------------------------------------------------
def test_nothing_dispatched_wants_no_group() -> None:
    assert plan([]).groups == ()


def test_one_group_per_job_sized_by_held_batches_up_to_parallelism() -> None:
    two = [held("a"), held("b", "processing", worker="local:1", quiet=1)]
    assert plan(two).groups == (WorkerGroup("job", None, "", 2),)
    six = [held(str(i), wave=1 + i % 3) for i in range(6)]
    assert plan(six, parallelism=4).groups == (WorkerGroup("job", None, "", 4),)


def test_one_group_per_wave_with_its_record_type_and_size() -> None:
    batches = [
        held("c1", wave=1, name="Customer"),
        held("o1", wave=2, name="SalesOrder"),
        held("o2", wave=2, name="SalesOrder"),
        held("o3", "processing", wave=2, worker="pod-a", quiet=0.5, name="SalesOrder"),
    ]
    assert plan(batches, per_wave=True, parallelism=2).groups == (
        WorkerGroup("job", 1, "Customer", 1),
        WorkerGroup("job", 2, "SalesOrder", 2),
    )


@pytest.mark.parametrize("status", ["completed", "failed", "invalid", "suspended", None])
def test_a_job_that_needs_no_worker_wants_no_group(status: str | None) -> None:
    assert plan([held("a"), held("b")], status=status).groups == ()


def test_parallelism_zero_wants_no_group() -> None:
    assert plan([held("a")], parallelism=0).groups == ()


# -- lost batches --------------------------------------------------------------------------------
def test_processing_batch_of_a_live_worker_is_not_lost() -> None:
    p = plan(
        [held("a", "processing", worker="local:7", quiet=60)], Observation((alive("local:7"),))
    )
    assert p.lost == () and p.discard == ()


def test_processing_batch_of_an_ended_worker_is_lost_after_the_grace_with_its_last_words() -> None:
    seen = Observation((ended("local:7", 1, "boom: connection lost"),))
    p = plan([held("a", "processing", worker="local:7", quiet=GRACE + 0.1, seq=3)], seen)
    assert [(x.batch_id, x.dispatch_seq, x.worker_id, x.error) for x in p.lost] == [
        ("a", 3, "local:7", "worker local:7 exited 1: boom: connection lost")
    ]
    assert p.discard == ("local:7",)


def test_an_ended_worker_without_message_or_code() -> None:
    seen = Observation((ended("pod-x", None, ""),))
    p = plan([held("a", "processing", worker="pod-x", quiet=99)], seen)
    assert [x.error for x in p.lost] == ["worker pod-x exited ?"]


def test_processing_batch_of_an_absent_worker_is_gone_after_the_grace() -> None:
    p = plan([held("a", "processing", worker="local:9", quiet=GRACE + 1)])
    assert [(x.batch_id, x.error) for x in p.lost] == [("a", "worker local:9 gone")]
    assert p.discard == ()


def test_within_the_grace_nothing_is_lost_and_the_ended_worker_is_kept() -> None:
    seen = Observation((ended("local:7", 0),))
    p = plan(
        [
            held("a", "processing", worker="local:7", quiet=GRACE),
            held("b", "processing", worker="local:8", quiet=1),
        ],
        seen,
    )
    assert p.lost == ()
    assert p.discard == ()  # local:7 still holds a batch inside its grace
    # the batches still count toward the job's group
    assert p.groups == (WorkerGroup("job", None, "", 2),)


def test_an_incomplete_observation_declares_nothing_lost() -> None:
    seen = Observation((ended("local:7"),), complete=False)
    p = plan([held("a", "processing", worker="local:7", quiet=600)], seen)
    assert p.lost == ()


def test_a_reserved_dispatched_batch_of_a_gone_worker_is_lost_too() -> None:
    p = plan([held("a", "dispatched", worker="local:3", quiet=GRACE + 1)])
    assert [x.batch_id for x in p.lost] == ["a"]


def test_unreserved_dispatched_or_workerless_batches_are_never_lost() -> None:
    p = plan([held("a", quiet=600), held("b", "processing", worker=None, quiet=600)])
    assert p.lost == ()


def test_lost_batches_do_not_count_toward_the_group_size() -> None:
    batches = [
        held("a", "processing", worker="local:1", quiet=60),
        held("b", "processing", worker="local:2", quiet=60),
        held("c"),
    ]
    p = plan(batches, Observation((alive("local:2"),)))
    assert [x.batch_id for x in p.lost] == ["a"]
    assert p.groups == (WorkerGroup("job", None, "", 2),)


# -- discard -------------------------------------------------------------------------------------
def test_ended_workers_holding_nothing_are_discarded() -> None:
    seen = Observation((ended("local:1", 0), ended("local:2", 1, "x"), alive("local:3")))
    p = plan([], seen)
    assert p.discard == ("local:1", "local:2")


def test_ended_workers_are_discarded_even_when_the_observation_is_incomplete() -> None:
    seen = Observation((ended("local:1", 0),), complete=False)
    assert plan([], seen).discard == ("local:1",)


# -- launch problems -----------------------------------------------------------------------------
def test_permanent_problem_fails_the_groups_unreserved_dispatched_batches() -> None:
    g = WorkerGroup("job", None, "", 3)
    batches = [
        held("a"),
        held("b", wave=2),
        held("r", worker="local:5"),  # reserved by a live worker: not this launch's
        held("p", "processing", worker="local:5"),
    ]
    out = plan_problems([LaunchProblem(g, "exec format error", True)], batches, per_wave=False)
    assert out.retry == ()
    assert [([b.batch_id for b in f.batches], f.error) for f in out.fail] == [
        (["a", "b"], "launch failed: exec format error")
    ]


def test_permanent_problem_of_a_wave_group_fails_only_that_waves_batches() -> None:
    g = WorkerGroup("job", 2, "SalesOrder", 1)
    batches = [held("a", wave=1), held("b", wave=2), held("c", wave=2)]
    out = plan_problems([LaunchProblem(g, "422 Invalid", True)], batches, per_wave=True)
    assert [[b.batch_id for b in f.batches] for f in out.fail] == [["b", "c"]]


def test_transient_problem_is_retried_and_fails_nothing() -> None:
    g = WorkerGroup("job", 1, "Customer", 1)
    p = LaunchProblem(g, "503", False)
    out = plan_problems([p], [held("a")], per_wave=True)
    assert out.fail == () and out.retry == (p,)


def test_no_problem_no_action() -> None:
    out = plan_problems([], [held("a")], per_wave=False)
    assert out.fail == () and out.retry == ()


# -- workers that cannot start (start_problem) ----------------------------------------------------
def pending(
    worker_id: str,
    reason: str,
    message: str = "",
    *,
    wave: int | None = None,
    age: float | None = 1.0,
    launch: str = "",
) -> WorkerSeen:
    return WorkerSeen(
        worker_id,
        "job",
        wave,
        True,
        started=False,
        waiting=reason,
        waiting_message=message,
        age=age,
        launch=launch,
    )


def running(
    worker_id: str, *, wave: int | None = None, for_s: float | None = 600.0, launch: str = ""
) -> WorkerSeen:
    return WorkerSeen(worker_id, "job", wave, True, running_for=for_s, launch=launch)


PULL = 120.0


@pytest.mark.parametrize(
    ("reason", "age", "problem"),
    [
        # will not resolve by itself: a problem at once
        ("CreateContainerConfigError", 0.5, True),
        ("InvalidImageName", 0.5, True),
        ("ErrImageNeverPull", 0.5, True),
        # a failing pull: a problem only after the pull grace
        ("ErrImagePull", PULL - 1, False),
        ("ErrImagePull", PULL, True),
        ("ImagePullBackOff", 30, False),
        ("ImagePullBackOff", PULL + 5, True),
        ("ImagePullBackOff", None, False),  # age unknown: still starting
        ("CreateContainerError", PULL + 1, True),
        ("RunContainerError", 10, False),
        # starting: never a problem, however long
        ("ContainerCreating", 10_000, False),
        ("PodInitializing", 10_000, False),
        ("Unschedulable", 10_000, False),
        ("", 10_000, False),
        ("SomethingNew", 10_000, False),
    ],
)
def test_the_table_of_waiting_reasons(reason: str, age: float | None, problem: bool) -> None:
    w = pending("pod-a", reason, "the kubelet says why", age=age)
    got = start_problem(w, pull_grace=PULL)
    assert (got is not None) == problem, got
    if got is not None:
        assert got.startswith(f"worker pod pod-a cannot start: {reason}")
        assert got.endswith(": the kubelet says why")


def test_a_running_or_normally_ended_worker_has_no_start_problem() -> None:
    assert start_problem(running("pod-a")) is None
    assert start_problem(ended("pod-b", 1, "boom")) is None


def test_an_ended_worker_that_never_ran_is_a_problem_while_its_launch_retries() -> None:
    never = WorkerSeen(
        "pod-a",
        "job",
        2,
        False,
        128,
        "CreateContainerConfigError: refused",
        started=False,
        waiting="CreateContainerConfigError",
        waiting_message="container has runAsNonRoot and image will run as root",
    )
    got = start_problem(never)
    assert got == (
        "worker pod pod-a cannot start: CreateContainerConfigError: container has runAsNonRoot "
        "and image will run as root"
    )
    assert start_problem(never, launch_active=False) is None  # its Job ended: history


ROOT = "container has runAsNonRoot and image will run as root (pod: w-1, container: worker)"


def test_a_group_whose_only_worker_cannot_start_is_a_permanent_problem_and_not_restarted() -> None:
    batches = [held("a", wave=2, name="SalesOrder"), held("b", wave=2, name="SalesOrder")]
    seen = Observation(
        (pending("w-1", "CreateContainerConfigError", ROOT, wave=2, launch="job-w2-1"),),
        launches=(LaunchSeen(2, 3.0, "job-w2-1"),),
    )
    p = plan(batches, seen, per_wave=True)
    (problem,) = p.problems
    assert problem.permanent and problem.group.wave_number == 2
    assert problem.group.record_type_name == "SalesOrder"
    assert problem.error == f"worker pod w-1 cannot start: CreateContainerConfigError: {ROOT}"
    assert p.groups == ()  # not started again in this sync
    assert p.discard == ("w-1",)  # its Job goes: the next one takes the current pod settings
    # the one launch-failure policy then fails the attempt of the wave's dispatched batches
    policy = plan_problems(p.problems, batches, per_wave=True)
    (fail,) = policy.fail
    assert [b.batch_id for b in fail.batches] == ["a", "b"]
    assert fail.error == f"launch failed: {problem.error}"


def test_a_stuck_worker_beside_running_ones_is_reported_but_fails_nothing() -> None:
    batches = [held("a", wave=1), held("b", "processing", wave=1, worker="w-2", quiet=1)]
    seen = Observation(
        (
            pending("w-1", "ImagePullBackOff", "pull failed", wave=1, age=PULL + 1),
            running("w-2", wave=1),
        )
    )
    p = plan(batches, seen, per_wave=True)
    (problem,) = p.problems
    assert not problem.permanent and "ImagePullBackOff for 121s" in problem.error
    assert p.groups == (WorkerGroup("job", 1, "Customer", 2),) and p.discard == ()
    assert plan_problems(p.problems, batches, per_wave=True).fail == ()


def test_a_stuck_worker_beside_a_starting_one_is_not_permanent() -> None:
    seen = Observation(
        (pending("w-1", "CreateContainerConfigError", "x"), pending("w-2", "ContainerCreating"))
    )
    (problem,) = plan([held("a")], seen).problems
    assert not problem.permanent


def test_an_incomplete_observation_makes_no_start_problem_permanent() -> None:
    seen = Observation((pending("w-1", "InvalidImageName", "bad"),), complete=False)
    p = plan([held("a")], seen)
    assert [x.permanent for x in p.problems] == [False] and p.discard == ()


def test_transient_waits_are_no_problem() -> None:
    seen = Observation(
        (pending("w-1", "ContainerCreating"), pending("w-2", "ErrImagePull", "x", age=5))
    )
    p = plan([held("a"), held("b")], seen)
    assert p.problems == () and p.groups == (WorkerGroup("job", None, "", 2),)


def test_an_ended_never_ran_pod_of_a_finished_job_does_not_block_a_new_launch() -> None:
    never = WorkerSeen(
        "old-1", "job", 1, False, 128, "", started=False, waiting="StartError", launch="j-w1-1"
    )
    p = plan([held("a", wave=1)], Observation((never,)), per_wave=True)
    assert p.problems == () and p.groups == (WorkerGroup("job", 1, "Customer", 1),)
    active = Observation((never,), launches=(LaunchSeen(1, 30.0, "j-w1-1"),))
    p = plan([held("a", wave=1)], active, per_wave=True)
    assert [x.permanent for x in p.problems] == [True] and p.groups == ()


# -- unclaimed dispatches (plan_unclaimed): what counts an attempt ------------------------------
CLAIM = 30.0


def unclaimed(
    held_batches: list[HeldBatch], seen: Observation, *, per_wave: bool = True
) -> list[tuple[str, str]]:
    return [
        (u.batch.batch_id, u.action)
        for u in plan_unclaimed(held_batches, seen, per_wave=per_wave, claim_timeout=CLAIM)
    ]


LATE = CLAIM + 1


def test_only_overdue_dispatches_are_decided() -> None:
    batches = [
        held("young", quiet=CLAIM - 1),
        held("claimed", "processing", worker="w-1", quiet=600),
    ]
    assert unclaimed(batches, Observation((running("w-1", wave=1),))) == []
    # measured from the dispatch, not from the last heartbeat, when the row says
    late = HeldBatch("late", 1, "Customer", "dispatched", 1, None, 1.0, CLAIM + 1)
    assert unclaimed([late], Observation(())) == [("late", "release")]


def test_a_reservation_its_command_does_not_claim_counts_once_its_worker_ran_that_long() -> None:
    """A pooled worker reserved the batch for its custom command (it heartbeats it), and the
    command has not claimed it within the claim timeout."""
    reserved = HeldBatch("r", 1, "Customer", "dispatched", 2, "w-1", 0.5, CLAIM + 1)
    assert unclaimed([reserved], Observation((running("w-1", wave=1),))) == [("r", "count")]
    fresh = Observation((running("w-1", wave=1, for_s=CLAIM - 1),))
    assert unclaimed([reserved], fresh) == [("r", "wait")]
    # its worker gone: the sync's lost batch (plan_workers), not a claim timeout
    assert unclaimed([reserved], Observation((ended("w-1", 1, wave=1),))) == []
    assert unclaimed([reserved], Observation(())) == []


def test_a_group_still_starting_costs_no_attempt() -> None:
    b = [held("a", wave=1, quiet=600)]
    # a pod pending (ContainerCreating, Unschedulable, a short pull...)
    assert unclaimed(b, Observation((pending("w-1", "ContainerCreating", wave=1),))) == [
        ("a", "wait")
    ]
    assert unclaimed(b, Observation((pending("w-1", "", wave=1),))) == [("a", "wait")]
    # a pod that started less than the claim timeout ago
    assert unclaimed(b, Observation((running("w-1", wave=1, for_s=CLAIM - 1),))) == [("a", "wait")]
    # no pod seen yet, the Job made less than the claim timeout ago
    young = Observation((), launches=(LaunchSeen(1, CLAIM - 1, "j-w1-2"),))
    assert unclaimed(b, young) == [("a", "wait")]
    (u,) = plan_unclaimed(b, young, per_wave=True, claim_timeout=CLAIM)
    assert "wave 1 is still starting (launch j-w1-2 was made 29 s ago)" in u.why


def test_busy_workers_make_it_wait() -> None:
    b = [held("a", wave=1, quiet=LATE), held("b", "processing", wave=1, worker="w-1", quiet=1)]
    assert unclaimed(b, Observation((running("w-1", wave=1),))) == [("a", "wait")]


def test_an_idle_worker_that_had_the_whole_claim_timeout_costs_an_attempt() -> None:
    b = [held("a", wave=1, quiet=LATE)]
    seen = Observation((running("w-1", wave=1, for_s=CLAIM),))
    assert unclaimed(b, seen) == [("a", "count")]
    (u,) = plan_unclaimed(b, seen, per_wave=True, claim_timeout=CLAIM)
    assert (
        u.why
        == "not claimed by a worker within 30 s, though worker w-1 of wave 1 ran idle that long"
    )
    # a worker of another wave does not count (per wave); locally every worker is the job's
    other = Observation((running("w-9", wave=2),))
    assert unclaimed(b, other) == [("a", "release")]
    assert unclaimed(b, other, per_wave=False) == [("a", "count")]
    # an adopted worker (its start unknown) had the whole claim timeout
    assert unclaimed(b, Observation((running("local:7", for_s=None),)), per_wave=False) == [
        ("a", "count")
    ]


def test_no_live_worker_and_no_launch_releases_without_an_attempt() -> None:
    b = [held("a", wave=1, quiet=LATE)]
    assert unclaimed(b, Observation(())) == [("a", "release")]
    old = Observation((), launches=(LaunchSeen(1, CLAIM + 5, "j-w1-1"),))  # in back-off
    seen = Observation((ended("w-1", 1, "could not connect"),), launches=old.launches)
    (u,) = plan_unclaimed(b, seen, per_wave=False, claim_timeout=CLAIM)
    assert u.action == "release"
    assert u.why == (
        "released: not claimed by a worker within 30 s and no worker of the job is alive; "
        "last: worker w-1 exited 1: could not connect"
    )


def test_workers_that_cannot_start_leave_it_to_the_launch_problem() -> None:
    b = [held("a", quiet=LATE)]
    seen = Observation((pending("w-1", "CreateContainerConfigError", "x"),))
    assert unclaimed(b, seen, per_wave=False) == [("a", "wait")]


def test_an_incomplete_observation_counts_as_the_claim_timeout_alone_says() -> None:
    b = [held("a", quiet=LATE)]
    seen = Observation((pending("w-1", "ContainerCreating"),), complete=False)
    assert unclaimed(b, seen) == [("a", "count")]


# -- the next wave's workers ahead of its dispatch (issue 12, row 8) ---------------------------
T0 = datetime(2026, 12, 3, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def wave(
    number: int,
    *,
    total: int,
    pending: int = 0,
    active: int = 0,
    completed: int = 0,
    failed: int = 0,
    derived: bool = False,
) -> WaveState:
    """A wave whose first dispatch was at T0 (when it has one)."""
    return WaveState(
        number,
        -13 if derived else -number,
        f"W{number}",
        DERIVED if derived else MAIN,
        total=total,
        pending=pending,
        dispatched=active,
        completed=completed,
        failed=failed,
        first_dispatched_at=T0 if active or completed or failed else None,
    )


def test_the_next_wave_starts_when_the_running_wave_is_expected_to_end_within_the_lead() -> None:
    """Wave 1 completed 36 of 40 batches in 36 s (1 a second): 4 left, 4 s at that rate, under
    the 5 s lead: wave 2's workers start now. With 10 left (10 s) they do not yet."""
    nxt = wave(2, total=400, pending=400)
    lines = wave(3, total=0, derived=True)
    near = wave(1, total=40, active=4, completed=36)
    assert wave_ahead("job", [near, nxt, lines], 4, now=at(36)) == WorkerGroup("job", 2, "W2", 4)
    far = wave(1, total=40, pending=6, active=4, completed=30)
    assert wave_ahead("job", [far, nxt, lines], 4, now=at(30)) is None
    # the same wave, completing ten times faster: 1 s left
    assert wave_ahead("job", [far, nxt, lines], 4, now=at(3)) == WorkerGroup("job", 2, "W2", 4)
    assert wave_ahead("job", [far, nxt, lines], 4, now=at(30), lead=10.0) is not None
    # a main wave with fewer batches than the parallelism: that many workers
    small = wave(2, total=2, pending=2)
    assert wave_ahead("job", [near, small, lines], 4, now=at(36)) == WorkerGroup("job", 2, "W2", 2)


def test_a_derived_wave_starts_ahead_at_the_parallelism() -> None:
    """The derived wave grows while its parents complete: its group is the parallelism. Its
    workers claim only dispatched batches, so starting them early dispatches nothing: the
    parents' threshold still decides (the coordinator dispatches, not the worker)."""
    waves = [
        wave(1, total=40, completed=40),
        wave(2, total=400, active=4, completed=396),
        wave(3, total=396, pending=396, derived=True),
    ]
    assert wave_ahead("job", waves, 4, now=at(40)) == WorkerGroup("job", 3, "W3", 4)


def test_nothing_ahead_before_the_first_dispatch_nor_once_every_wave_started() -> None:
    # nothing runs yet: the coordinator's next run dispatches the first wave itself
    fresh = [wave(1, total=4, pending=4), wave(2, total=8, pending=8)]
    assert wave_ahead("job", fresh, 4, now=at(1)) is None
    # every wave started (or done): no wave to start ahead
    done = [wave(1, total=4, completed=4), wave(2, total=8, active=2, completed=6)]
    assert wave_ahead("job", done, 4, now=at(1)) is None
    # the earlier waves are all done, none runs: the next wave is dispatched now, not ahead
    idle = [wave(1, total=4, completed=4), wave(2, total=8, pending=8)]
    assert wave_ahead("job", idle, 4, now=at(1)) is None


def test_nothing_ahead_until_the_running_wave_shows_it_gets_through() -> None:
    """A running wave with no batch completed yet (its only batch may keep failing: the e2e
    custom-worker failure makes no Job for later waves), an earlier batch failed for good, or
    an earlier wave with batches waiting and none running (held back by the budget): no
    workers for the next wave yet."""
    nxt = wave(2, total=8, pending=8)
    assert wave_ahead("job", [wave(1, total=1, active=1), nxt], 4, now=at(1)) is None
    failed = wave(1, total=4, active=1, completed=2, failed=1)
    assert wave_ahead("job", [failed, nxt], 4, now=at(2)) is None
    held = wave(1, total=4, pending=1, completed=3)
    assert wave_ahead("job", [held, nxt], 4, now=at(3)) is None
    going = wave(1, total=4, active=1, completed=3)
    assert wave_ahead("job", [going, nxt], 4, now=at(3)) == WorkerGroup("job", 2, "W2", 4)


def test_after_dispatch_moves_the_dispatched_batches_out_of_pending() -> None:
    before = [wave(1, total=40, pending=2, active=4, completed=34), wave(2, total=9, pending=9)]
    after = after_dispatch(before, {1: 2})
    assert (after[0].pending, after[0].dispatched) == (0, 6)
    assert after[1] == before[1]
    first = after_dispatch(before, {2: 4})[1]
    assert (first.pending, first.dispatched, first.first_dispatched_at is not None) == (5, 4, True)


def test_plan_adds_the_wave_ahead_per_wave_only_and_never_twice() -> None:
    ahead = WorkerGroup("job", 2, "SalesOrder", 4)
    batches = [held("c1", "processing", wave=1, worker="p1")]
    seen = Observation((alive("p1", wave=1),))
    per_wave = plan_workers(
        "job", "running", 4, batches, seen, per_wave=True, grace=GRACE, ahead=ahead
    )
    assert per_wave.groups == (WorkerGroup("job", 1, "Customer", 1), ahead)
    # one group per job (local): its workers already run every wave's batches
    per_job = plan_workers(
        "job", "running", 4, batches, seen, per_wave=False, grace=GRACE, ahead=ahead
    )
    assert per_job.groups == (WorkerGroup("job", None, "", 1),)
    # the wave has dispatched batches already: its own group, not a second one
    both = [*batches, held("s1", wave=2, name="SalesOrder")]
    again = plan_workers("job", "running", 4, both, seen, per_wave=True, grace=GRACE, ahead=ahead)
    assert [g.wave_number for g in again.groups] == [1, 2]
    # a job that is not running wants no workers, ahead or not
    idle = plan_workers("job", "suspended", 4, batches, seen, per_wave=True, ahead=ahead)
    assert idle.groups == ()
