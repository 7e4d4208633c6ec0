"""The local adapter's adoption of a killed runner's pooled workers (launch/local.py): found by
their command line under /proc (a fake one here), counted live while their process runs (not a
zombie, the same command line), reported ended once it is not; other jobs', tenants' and
databases' workers are never adopted. No database needed: nothing is started."""

from __future__ import annotations

from pathlib import Path

from importwaves.launch.local import LocalLauncher
from importwaves.launch.port import LaunchTarget, WorkerGroup

DSN = "postgresql://importer:s3cret@db.example:5432/tenants"
TARGET = LaunchTarget("local")


def _proc(root: Path, pid: int, argv: list[str], state: str = "S") -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "stat").write_text(f"{pid} (python3) {state} 1 1 1 0 -1\n")


def _argv(db: str, tenant: str, job: str) -> list[str]:
    return [
        "/usr/bin/python3",
        "-m",
        "importwaves.worker_pool",
        f"--db={db}",
        f"--tenant={tenant}",
        f"--job={job}",
    ]


DB = "importer@db.example:5432/tenants"


def test_a_killed_runners_live_workers_are_adopted_and_their_end_is_seen(tmp_path: Path) -> None:
    _proc(tmp_path, 101, _argv(DB, "t1", "job"))
    _proc(tmp_path, 102, _argv(DB, "t1", "other-job"))
    _proc(tmp_path, 103, _argv(DB, "t2", "job"))
    _proc(tmp_path, 104, _argv("importer@elsewhere:5432/tenants", "t1", "job"))
    _proc(tmp_path, 105, ["/bin/sh", "-c", "sleep 100"])
    _proc(tmp_path, 106, _argv(DB, "t1", "job"), state="Z")  # a zombie: not alive
    launcher = LocalLauncher(DSN, proc_root=str(tmp_path))
    seen = launcher.observe(TARGET, "t1", "job")
    assert seen.complete
    assert [(w.worker_id, w.alive) for w in seen.workers] == [("local:101", True)]
    assert "s3cret" not in repr(launcher._argv("t1", "job"))

    # a live adopted worker counts toward the group: nothing more is started for a group of 1
    assert launcher.ensure(TARGET, "t1", [WorkerGroup("job", None, "", 1)]) == []
    assert launcher.started == 0

    # it ends (its pid now runs something else): ended, with no exit code to read
    _proc(tmp_path, 101, ["/bin/sh"])
    [w] = launcher.observe(TARGET, "t1", "job").workers
    assert (w.worker_id, w.alive, w.exit_code) == ("local:101", False, None)
    assert "adopted" in w.message
    launcher.discard(TARGET, "t1", "job", ["local:101"])
    assert launcher.observe(TARGET, "t1", "job").workers == ()


def test_adoption_scans_once_per_job(tmp_path: Path) -> None:
    launcher = LocalLauncher(DSN, proc_root=str(tmp_path))
    assert launcher.observe(TARGET, "t1", "job").workers == ()
    _proc(tmp_path, 201, _argv(DB, "t1", "job"))  # started later by someone else: not ours
    assert launcher.observe(TARGET, "t1", "job").workers == ()
