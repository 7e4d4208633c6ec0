"""Fault injection for the operator process under test: with this directory on its PYTHONPATH
and IMPORTWAVES_TEST_SLOW_TICK_S set, every timer tick of the operator returns that many
seconds after its reconcile (as a tick does on a loaded machine while it posts its Events).
A test uses it to hold a tick open across the moment its ImportJob finishes.

It wraps `importwaves.k8s.handlers._reconcile` by name, which the tick looks up at each call:
if that function is renamed, the operator does not start, and the test that relies on this
fails loudly instead of testing nothing. The operator's log starts with SLOW_TICK_MARK when
the injection is on."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

SLOW_TICK_MARK = "slow_ticks: every timer tick returns late by"
_DELAY = float(os.environ.get("IMPORTWAVES_TEST_SLOW_TICK_S") or 0)

if _DELAY > 0:
    from importwaves.k8s import handlers

    _reconcile = handlers._reconcile

    def _slow_reconcile(body: Any, cause: str) -> Any:
        result = _reconcile(body, cause)
        if cause == "timer":
            time.sleep(_DELAY)
        return result

    handlers._reconcile = _slow_reconcile
    print(f"{SLOW_TICK_MARK} {_DELAY:g} s", file=sys.stderr, flush=True)
