"""Print what the property tests checked (sequences, steps, faults) in the terminal summary."""

from __future__ import annotations

import pytest

from integration.conftest import engine, engines  # the integration tier's engine fixtures

__all__ = ["REPORT", "engine", "engines"]

#: Lines the property tests leave for the terminal summary.
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("property tests: what was checked")
        for line in REPORT:
            terminalreporter.write_line(line)
