"""The opt-in memory reports (importwaves/memdebug.py): snapshots in the process, analysis
offline. Run in a child process (tracing is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import time
from importwaves import memdebug
assert memdebug.start_from_env()
keep = []
for _ in range(40):
    keep.append([str(i) * 10 for i in range(2000)])  # grows between snapshots
    time.sleep(0.03)
time.sleep(0.5)
"""


def test_snapshots_in_the_process_and_a_report_offline(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "IMPORTWAVES_TRACEMALLOC": str(tmp_path),
        "IMPORTWAVES_TRACEMALLOC_INTERVAL": "0.3",
    }
    subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, timeout=60)
    status = (tmp_path / "status.txt").read_text().splitlines()
    assert len(status) >= 2 and "VmRSS" in status[0] and "pymalloc blocks" in status[0]
    snaps = sorted(tmp_path.glob("snapshot-*.tracemalloc"))
    assert len(snaps) >= 2
    out = subprocess.run(
        [sys.executable, "-m", "importwaves.memdebug", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    growth = out.split("## growth since the first report, by line")[1]
    top = growth.strip().splitlines()[0]
    assert "<string>" in top and "MB" in top  # the child's own list comprehension grew most


def test_off_unless_asked(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPORTWAVES_TRACEMALLOC")}
    code = "from importwaves import memdebug; import tracemalloc; "
    code += "assert not memdebug.start_from_env() and not tracemalloc.is_tracing()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
