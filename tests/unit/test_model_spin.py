"""SPIN finds what it must (model/check.py runs it): the seed's original design's two
counterexamples, and one counterexample for each of the three known-bad mutants of this
protocol's model. Skipped only where SPIN or a C compiler is missing (`make test` installs
SPIN through `make model`)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("spin") is None or shutil.which("gcc") is None,
    reason="SPIN or gcc not installed (make model installs them)",
)


def _check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("model_check", ROOT / "model" / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_check"] = module
    spec.loader.exec_module(module)
    return module


CHECK = _check()
RUNS = {r.name: r for r in CHECK.RUNS}


def _found(name: str) -> tuple[str, str]:
    result = CHECK.check(RUNS[name])
    return result.found, "\n".join(result.trail)


def test_original_design_completes_the_job_with_derived_batches_pending() -> None:
    found, trail = _found("original_completed_early")
    assert found == CHECK.ASSERTION, trail
    # the last parent's listener read 50 % before its commit, then the job was completed
    assert "listener_reads_percent batch=1 percent=50" in trail or (
        "listener_reads_percent batch=0 percent=50" in trail
    ), trail
    assert (
        "coord_completes_job and clears wave_monitoring_active (derived batches pending: 2)"
        in trail
    ), trail


def test_original_design_never_dispatches_the_derived_batches() -> None:
    found, trail = _found("original_derived_stuck")
    assert found == CHECK.ACCEPTANCE, trail
    assert "coord_completes_job" in trail and "listener_skips" in trail, trail
    assert "the cycle starts here" in trail
    final = trail.splitlines()[-1]
    # derived batches pending, monitoring off, the job completed: nobody left to act
    assert "st[2]=1" in final and "st[3]=1" in final and "mon=0" in final and "job=2" in final


@pytest.mark.parametrize(
    ("name", "kind", "evidence"),
    [
        ("mutant_no_guard", "ASSERTION", "job 1 -> 2"),
        ("mutant_precommit", "ACCEPTANCE", "parents done before the commit"),
        ("mutant_stale_token", "ASSERTION", "worker_stalls"),
        ("mutant_precommit_no_progress", "NON_PROGRESS", "parents done before the commit"),
    ],
)
def test_each_mutant_is_caught(name: str, kind: str, evidence: str) -> None:
    found, trail = _found(name)
    assert found == getattr(CHECK, kind), f"{name}: {found}\n{trail}"
    assert evidence in trail, trail


def test_the_protocol_passes_where_the_mutants_fail() -> None:
    """The same instance without a mutation: the crash-only safety run finds nothing."""
    result = CHECK.check(RUNS["protocol_safety_crashes"])
    assert result.found == CHECK.NO_ERROR, result.output[-2000:]
    assert result.states > 10_000, result.states
