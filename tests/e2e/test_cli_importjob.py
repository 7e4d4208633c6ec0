"""`importwaves reconcile --importjob NS/NAME` for an ImportJob that does not exist: one line,
exit 1, against the real test API server (the CLI's other bad input, which needs no cluster, is
in tests/integration/test_cli_bad_input.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .harness.cluster import Cluster

IMPORTWAVES = Path(sys.executable).parent / "importwaves"


def test_reconcile_of_an_unknown_importjob_exits_1_in_one_line(k8s_cluster: Cluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPORTWAVES_")}
    env["KUBECONFIG"] = str(k8s_cluster.kubeconfig)
    proc = subprocess.run(
        [str(IMPORTWAVES), "reconcile", "--importjob", "default/no-such-import", "--wait", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    print(
        f"\n$ importwaves reconcile --importjob default/no-such-import\n  -> exit "
        f"{proc.returncode}: {proc.stderr.strip()}"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "Error: no ImportJob default/no-such-import (or no ImportJob CRD in this cluster)"
    ], proc.stderr
    assert proc.stdout == ""
