"""What a worker process pays to start: every worker pod starts one (a wave's Job starts up to
`parallelism` pods), so its imports stay light; and the worker's view of a stored spec agrees
with the engine's."""

from __future__ import annotations

import subprocess
import sys

from helpers import small_spec
from importwaves.datagen import reference_spec
from importwaves.worker import backoff_params


def test_a_worker_process_starts_without_the_spec_models() -> None:
    # pydantic and the spec's models were a third of a worker process's start-up CPU
    code = (
        "import sys, importwaves.worker_pool; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('pydantic', 'pydantic_core') or m == 'importwaves.spec'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_workers_backoff_is_the_specs() -> None:
    for spec in (
        reference_spec("t1"),  # the defaults
        small_spec("t1", retryBackoff={"baseSeconds": 2.5, "capSeconds": 40}),
    ):
        stored = spec.model_dump(mode="json")
        assert backoff_params(stored) == spec.backoff_params
    assert backoff_params({}) == reference_spec("t1").backoff_params  # no retryBackoff stored
