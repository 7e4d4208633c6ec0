"""A wave's dispatch starts that wave's workers even while an earlier wave's pooled worker is
still alive (issue 16, bench row "many"): with one worker group per wave, a pooled worker
claims only its own wave's batches, so it idles until its idle timeout (30 s) and the next
wave's batches, already dispatched and holding budget slots, waited for it to exit."""

from __future__ import annotations

from collections.abc import Sequence

from helpers import TrackingLauncher, run_and_notify, setup_job, tenant_conn
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


class CountingWaveWorkers(IdleWaveWorkers):
    """IdleWaveWorkers that counts its observations, with the hot path's observation TTL the
    test sets (the Kubernetes launcher's is a class attribute)."""

    def __init__(self, dsn: str, tenant: str, ttl: float) -> None:
        super().__init__(dsn, tenant)
        self.observation_ttl = ttl
        self.observed = 0

    def observe(self, target: LaunchTarget, tenant: str, job_id: str) -> Observation:
        with self._lock:
            self.observed += 1
        return super().observe(target, tenant, job_id)


def _run(engine, launcher, dsn: str, tenant: str, job: str, wave: int, limit: int = 10**6) -> int:
    """Run up to `limit` of the wave's batches one at a time as they are dispatched
    (parallelism 1: each completion dispatches the next); returns the dispatches made."""
    dispatches = 0
    for _ in range(limit):
        done = set(launcher.ran)
        todo = [b for b in launcher.snapshot() if b.wave_number == wave and b.batch_id not in done]
        if not todo:
            break
        before = len(launcher.snapshot())
        run_and_notify(engine, dsn, tenant, job, todo[0])
        launcher.ran.append(todo[0].batch_id)
        dispatches += len(launcher.snapshot()) > before
    return dispatches


def test_the_dispatch_hot_path_reuses_a_recent_observation_of_the_workers(
    engines, dsn, tenant
) -> None:
    """Issue 12, row 8: with the Kubernetes launcher an observation is two LIST calls, and a
    dispatch follows nearly every completion. Within the launcher's observation_ttl the hot
    path reuses the last observation (a worker's start or end is a Job event whose sync
    observes anew); after it, it observes again; with a TTL of 0 (the local launcher) every
    dispatch observes, as before."""
    orders = {
        "name": "SalesOrder",
        "recordTypeId": -30,
        "batchSize": 50,
        "parentTypes": ["Customer"],
    }
    customers = {"name": "Customer", "recordTypeId": -2, "batchSize": 50}
    for ttl in (60.0, 0.0):
        launcher = CountingWaveWorkers(dsn, tenant, ttl)
        launcher.ran = []
        engine = engines(launcher=launcher)
        now = [1000.0]
        engine.clock = lambda now=now: now[0]
        job = f"job-ttl-{int(ttl)}"
        setup_job(engine, job, orders=500, parallelism=1, recordTypes=[customers, orders])
        engine.check(job, "start")
        _run(engine, launcher, dsn, tenant, job, 1)
        assert 2 in launcher.started, "wave 2 did not start"
        before = launcher.observed
        refills = _run(engine, launcher, dsn, tenant, job, 2, limit=5)
        assert refills >= 4, f"only {refills} dispatch(es) during wave 2"
        observed = launcher.observed - before
        if ttl == 0:
            assert observed >= refills, (observed, refills)
            continue
        # at most two: the observation the wave's start kept was made before its workers
        # started, and the sync that starts the next wave's workers ahead (wave_ahead)
        assert observed <= 2, (
            f"{observed} observations for {refills} dispatches of a running wave: the hot "
            "path observed the workers again within the observation TTL"
        )
        now[0] += ttl + 1  # the TTL has passed: the next dispatch observes once more
        before = launcher.observed
        refills = _run(engine, launcher, dsn, tenant, job, 2, limit=3)
        assert refills >= 2
        assert launcher.observed - before == 1, launcher.observed - before


def test_the_next_waves_workers_start_ahead_of_its_first_dispatch(engines, dsn, tenant) -> None:
    """Issue 12, row 8: one work-queue Job per wave, each pod start costing seconds: the next
    wave's workers are started once the running wave has completed batches and is expected to
    end within the lead (engine/workers.py wave_ahead), not at the next wave's first dispatch;
    nothing of that wave is dispatched by it (its workers wait for the dispatch the
    coordinator makes once the wave opens), and nothing starts before wave 1's first
    completion."""
    launcher = IdleWaveWorkers(dsn, tenant)
    engine = engines(launcher=launcher)
    customers = {"name": "Customer", "recordTypeId": -2, "batchSize": 10}
    orders = {
        "name": "SalesOrder",
        "recordTypeId": -30,
        "batchSize": 50,
        "parentTypes": ["Customer"],
    }
    setup_job(engine, "job", orders=200, parallelism=1, recordTypes=[customers, orders])
    first = engine.check("job", "start").dispatched
    assert [b.wave_number for b in first] == [1]
    assert launcher.started == [1], "a wave started ahead before any batch completed"
    ran: set[str] = set()
    while 2 not in launcher.started:
        assert not [b for b in launcher.snapshot() if b.wave_number == 2], (
            "wave 2 was dispatched before its workers were started ahead"
        )
        todo = [b for b in launcher.snapshot() if b.wave_number == 1 and b.batch_id not in ran]
        assert todo, "wave 1 ended without wave 2's workers started ahead"
        run_and_notify(engine, dsn, tenant, "job", todo[0])
        ran.add(todo[0].batch_id)
    assert ran, "wave 2 started before wave 1 completed a batch"
    with tenant_conn(dsn, tenant) as conn:
        left = conn.execute(
            "SELECT pending_batches + dispatched_batches + processing_batches AS n "
            "FROM wave_coordination WHERE job_id = 'job' AND wave_number = 1"
        ).fetchone()["n"]
    assert left > 0, "wave 2's workers started only when wave 1 had ended"
    assert not [b for b in launcher.snapshot() if b.wave_number == 2]
