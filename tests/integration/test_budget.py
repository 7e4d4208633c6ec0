"""The operator-wide budget on the real database (engine/capacity.py, engine/budget.py):
imports of two tenants run by local pooled workers under one shared budget never hold more
batches at once than the budget, both complete, and a small import that arrives behind a big
backlog gets its share while the big one still has work waiting."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from helpers import assert_verified, setup_job, wait_until
from importwaves.db import migrate
from importwaves.engine.budget import Budget
from importwaves.engine.capacity import CapacityKeeper
from importwaves.launch.local import LocalLauncher
from importwaves.runner import LocalRunner, RunStats

pytestmark = pytest.mark.integration


@pytest.fixture
def second_tenant(dsn: str, tenant: str) -> Iterator[str]:
    name = f"{tenant}b"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.up(conn, name)
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


class Sampler(threading.Thread):
    """Counts, across both tenants, the batches dispatched or processing, until stopped."""

    def __init__(self, dsn: str, tenants: list[str]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.tenants = dsn, tenants
        self.max_total = 0
        self.samples: list[dict[str, tuple[int, int]]] = []  # tenant -> (active, pending)
        self.stop = threading.Event()

    def run(self) -> None:
        query = sql.SQL(" UNION ALL ").join(
            sql.SQL(
                "SELECT {t} AS tenant, count(*) FILTER (WHERE status IN ('dispatched', "
                "'processing')) AS active, count(*) FILTER (WHERE status = 'pending') AS pending "
                "FROM {s}.wave_batches"
            ).format(t=sql.Literal(t), s=sql.Identifier(t))
            for t in self.tenants
        )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.wait(0.01):
                rows = conn.execute(query).fetchall()
                sample = {str(r[0]): (int(r[1]), int(r[2])) for r in rows}
                self.samples.append(sample)
                self.max_total = max(self.max_total, sum(a for a, _ in sample.values()))


def _run(engine: Any, job: str, out: dict[str, RunStats | BaseException]) -> None:
    try:
        out[engine.tenant] = LocalRunner(engine, tick=0.2).run(job, timeout=180)
    except BaseException as exc:  # surfaced by the test
        out[engine.tenant] = exc


def test_two_tenants_share_one_budget_fairly(engines, dsn, tenant, second_tenant) -> None:
    keeper = CapacityKeeper(Budget(total=2))
    big_launcher, small_launcher = LocalLauncher(dsn), LocalLauncher(dsn)
    big = engines(launcher=big_launcher, capacity=keeper)
    small = engines(schema=second_tenant, launcher=small_launcher, capacity=keeper)
    sampler = Sampler(dsn, [tenant, second_tenant])
    out: dict[str, RunStats | BaseException] = {}
    try:
        _, big_spec = setup_job(big, "big", orders=600, parallelism=4)
        _, small_spec = setup_job(small, "small", orders=60, parallelism=4)
        sampler.start()
        t_big = threading.Thread(target=_run, args=(big, "big", out))
        t_big.start()
        # the small import arrives once the big one holds the whole budget
        wait_until(lambda: keeper.holding().get(tenant, 0) >= 2, timeout=60)
        t_small = threading.Thread(target=_run, args=(small, "small", out))
        t_small.start()
        t_small.join(200)
        t_big.join(200)
    finally:
        sampler.stop.set()
        big_launcher.stop_all()
        small_launcher.stop_all()
        keeper.close()
    sampler.join(5)
    assert {k: getattr(v, "status", repr(v)) for k, v in out.items()} == {
        tenant: "completed",
        second_tenant: "completed",
    }
    assert_verified(dsn, tenant, "big", big_spec)
    assert_verified(dsn, second_tenant, "small", small_spec)
    # never more than the budget at once, across both tenants (each alone would take 4)
    assert sampler.samples and sampler.max_total <= 2
    # the small import ran while the big one still had batches waiting: not starved behind it
    assert any(s[second_tenant][0] > 0 and s[tenant][1] > 0 for s in sampler.samples)


def test_a_job_held_by_the_budget_is_not_failed_and_says_why(engines, dsn, tenant) -> None:
    """Budget 1 with a failed batch and pending ones: the held batches keep the import
    running (the 'nothing else can run' failure rule does not apply to them)."""
    keeper = CapacityKeeper(Budget(total=1))
    engine = engines(capacity=keeper)
    try:
        setup_job(engine, "job", orders=2000, parallelism=4, retries=0)
        result = engine.check("job")
        assert len(result.dispatched) == 1
        assert result.held == 3
        assert "waiting for capacity: 3 batch(es)" in result.reason
        assert keeper.held("job") == 3
        # the one batch fails for good; of the three pending, one goes and two are held
        b = result.dispatched[0]
        assert engine.listener.fail_attempt("job", b.batch_id, b.dispatch_seq, "boom")
        again = engine.check("job")
        assert again.outcome.value != "failed"
        assert len(again.dispatched) == 1 and again.held == 2
    finally:
        keeper.close()
