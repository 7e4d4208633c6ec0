"""The engine's worker lifecycle decision (engine/workers.py), every branch: groups per job and
per wave and their sizes, batches lost after the grace (ended or absent workers), nothing lost
while the observation is incomplete or the worker lives, what is discarded, and the one
launch-failure policy (permanent fails the group's unreserved dispatched batches; transient is
retried)."""

from __future__ import annotations

import pytest

from importwaves.engine.workers import (
    HeldBatch,
    WorkerPlan,
    plan_problems,
    plan_workers,
)
from importwaves.launch.port import LaunchProblem, Observation, WorkerGroup, WorkerSeen

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


def ended(worker_id: str, code: int | None = 1, message: str = "") -> WorkerSeen:
    return WorkerSeen(worker_id, "job", None, False, code, message)


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
