"""A wave's dispatch starts that wave's workers even while an earlier wave's pooled worker is
still alive (issue 16, bench row "many"): with one worker group per wave, a pooled worker
claims only its own wave's batches, so it idles until its idle timeout (30 s) and the next
wave's batches, already dispatched and holding budget slots, waited for it to exit."""

from __future__ import annotations

from collections.abc import Sequence

from helpers import TrackingLauncher, run_and_notify, setup_job
from importwaves.launch.port import (
    LaunchProblem,
    LaunchTarget,
    Observation,
    WorkerGroup,
    WorkerSeen,
)


class IdleWaveWorkers(TrackingLauncher):
    """One worker group per wave (as the Kubernetes launcher); every group it started stays
    alive, as a pooled worker that finished its wave's batches and waits for more would."""

    per_wave = True

    def __init__(self, dsn: str, tenant: str) -> None:
        super().__init__(dsn, tenant)
        self.started: list[int | None] = []

    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        with self._lock:
            self.started += [g.wave_number for g in groups if g.wave_number not in self.started]
        return []

    def observe(self, target: LaunchTarget, tenant: str, job_id: str) -> Observation:
        with self._lock:
            return Observation(
                tuple(WorkerSeen(f"pod-w{w}", job_id, w, alive=True) for w in self.started)
            )


def test_the_next_waves_workers_start_at_its_dispatch_while_the_last_waves_idle(
    engines, dsn, tenant
) -> None:
    launcher = IdleWaveWorkers(dsn, tenant)
    engine = engines(launcher=launcher)
    setup_job(engine, "job", orders=20, parallelism=1)
    first = engine.check("job", "start").dispatched
    assert {b.wave_number for b in first} == {1}
    assert launcher.started == [1]
    # wave 1's only batch completes: the listener's run dispatches wave 2 while wave 1's
    # worker is still alive (idle, claiming only wave 1's batches)
    for b in first:
        run_and_notify(engine, dsn, tenant, "job", b)
    second = [b for b in launcher.snapshot() if b.wave_number == 2]
    assert second, "wave 2 was not dispatched"
    assert launcher.started == [1, 2], (
        "wave 2's dispatch must start wave 2's workers: wave 1's idle worker cannot claim them"
    )
