"""The short form of `make chaos`: a small import whose runner process is SIGKILLed 5 times at
random moments (alone or with its workers) and restarted, with Redis flushed and restarted and
a worker killed mid-batch. It must resume each time and end verified, with no duplicate dispatch
and no lost row (definitions in tests/chaos/chaos.py)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from importwaves.localdev import LocalPostgres, LocalRedis

from .chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.integration


def test_runner_killed_five_times_resumes_and_verifies(
    pg: LocalPostgres, redis_server: LocalRedis, tenant: str, redis_url: str, tmp_path: Path
) -> None:
    cfg = ChaosConfig(
        orders=1500,
        kills=5,
        seed=20261129,
        kill_after=(0.3, 1.5),
        redis_every=(1.0, 2.5),
        worker_kill_every=(0.8, 2.0),
        timeout=240,
        batch_sizes=(50, 100, 300),  # ~50 batches: the kills land mid-import
    )
    result = run_chaos(cfg, dsn=pg.dsn(), tenant=tenant, redis=redis_server, workdir=tmp_path)
    print(result.table())
    assert result.ok, result.table()
    assert len(result.kills) == 5
    assert {k.mode for k in result.kills} == {"runner", "runner+workers"}
    assert result.recoveries >= 4, result.table()
    assert result.redis_flushes + result.redis_restarts >= 1
    assert result.duplicate_dispatches == 0
    assert result.lost_rows == 0
    assert result.staged["transaction_lines"] == result.imported["transaction_lines"] > 0
    # The driver reaps orphaned workers only while it runs: left a subreaper, this process
    # would adopt (and never reap) every daemon started later, e.g. a restarted test server.
    flag = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    assert flag.value == 0
