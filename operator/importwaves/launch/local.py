"""The local adapter of the launcher port: pooled worker processes on this machine.

`ensure` starts `python -m importwaves.worker_pool --db=<db> --tenant=<t> --job=<id>` processes
(settings in their env: the worker contract's IMPORTWAVES_DSN/TENANT/JOB_ID, and
IMPORTWAVES_WORKER_COMMAND when a custom worker command runs per batch) until each group has its
size of live workers; a worker claims under `local:<pid>`. `observe` reports live and ended
processes (exit code, the tail of their output, redacted) and how long each has run (a process
starts at once: a local worker is never "starting", so an unclaimed dispatch waits only for a
worker started less than the claim timeout ago or for busy ones; engine/workers.py
`plan_unclaimed`, the same rule as on Kubernetes); `discard` forgets ended ones. It decides
nothing.

A runner that was killed leaves its workers running (they finish their batch, and exit when the
job needs nothing more or after their idle timeout): the first `observe` of a job in a new
launcher finds them by their command line in /proc and counts them as live, so a restarted
runner neither starts a second set nor calls their batches lost; one whose pid is gone is
absent, and the engine fails its batch after the grace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from importwaves import redact
from importwaves.engine.notify import database_identity
from importwaves.launch.port import (
    LaunchProblem,
    LaunchTarget,
    Observation,
    WorkerGroup,
    WorkerSeen,
)
from importwaves.log import event
from importwaves.worker import ENV
from importwaves.worker_pool import ENV_POOL

log = logging.getLogger("importwaves.launch.local")

MODULE = "importwaves.worker_pool"
#: Longest output tail kept of an ended worker.
MAX_TAIL = 2000


@dataclass
class _Worker:
    worker_id: str
    tenant: str
    job_id: str
    wave_number: int | None
    pid: int
    proc: subprocess.Popen[bytes] | None  # None: adopted from a runner that died
    out: IO[bytes] | None = None
    exit_code: int | None = None
    message: str = ""
    ended: bool = False
    argv: list[str] = field(default_factory=list)
    #: time.monotonic() when this launcher started it (None: adopted, its start unknown)
    started_at: float | None = None


class LocalLauncher:
    """Runs pooled worker processes (see the module docstring)."""

    per_wave = False

    def __init__(
        self,
        dsn: str,
        *,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
        idle_seconds: float | None = None,
        proc_root: str = "/proc",
    ) -> None:
        self.dsn = dsn
        self.python = python
        self.extra_env = dict(extra_env or {})
        #: a custom worker command each pooled worker runs per batch (None: the reference import)
        self.command = list(command) if command else None
        self.idle_seconds = idle_seconds
        self.proc_root = proc_root
        self._db = str(database_identity(dsn))
        self._workers: dict[str, _Worker] = {}
        self._scanned: set[tuple[str, str]] = set()
        self.started = 0

    def __enter__(self) -> LocalLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # -- the port ------------------------------------------------------------------------------
    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        problems = []
        for g in groups:
            self._adopt(tenant, g.job_id)
            live = sum(
                1
                for w in self._workers.values()
                if not w.ended
                and (w.tenant, w.job_id, w.wave_number) == (tenant, g.job_id, g.wave_number)
            )
            for _ in range(g.size - live):
                try:
                    self._start(tenant, g)
                except OSError as exc:
                    problems.append(LaunchProblem(g, f"{type(exc).__name__}: {exc}", False))
                    break
        return problems

    def observe(self, target: LaunchTarget, tenant: str, job_id: str) -> Observation:
        self._adopt(tenant, job_id)
        seen = []
        for w in self._workers.values():
            if (w.tenant, w.job_id) != (tenant, job_id):
                continue
            self._poll(w)
            seen.append(
                WorkerSeen(
                    w.worker_id,
                    job_id,
                    w.wave_number,
                    not w.ended,
                    w.exit_code,
                    w.message,
                    running_for=None if w.started_at is None else time.monotonic() - w.started_at,
                )
            )
        return Observation(tuple(seen))

    def discard(
        self,
        target: LaunchTarget,
        tenant: str,
        job_id: str,
        worker_ids: Sequence[str],
        keep: Sequence[str] = (),
    ) -> None:
        for wid in worker_ids:
            w = self._workers.get(wid)
            if w is not None and w.ended and (w.tenant, w.job_id) == (tenant, job_id):
                del self._workers[wid]

    # -- for its owner (the CLI, the demo, tests) ---------------------------------------------
    def live(self, job_id: str | None = None) -> int:
        n = 0
        for w in self._workers.values():
            self._poll(w)
            n += int(not w.ended and job_id in (None, w.job_id))
        return n

    def pids(self, job_id: str | None = None) -> dict[str, int]:
        return {
            w.worker_id: w.pid
            for w in self._workers.values()
            if not w.ended and job_id in (None, w.job_id)
        }

    def stop_all(self, timeout: float = 10.0) -> None:
        """Kill the workers this launcher started (its owner is ending) and reap them."""
        for w in self._workers.values():
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
        for w in self._workers.values():
            if w.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout)
            if w.out is not None:
                w.out.close()
        self._workers.clear()

    # -- processes -----------------------------------------------------------------------------
    def _argv(self, tenant: str, job_id: str) -> list[str]:
        # names the worker's database (no secret: role, host, port, database), tenant and job,
        # so a new launcher adopts only its own job's workers
        return [
            self.python,
            "-m",
            MODULE,
            f"--db={self._db}",
            f"--tenant={tenant}",
            f"--job={job_id}",
        ]

    def _start(self, tenant: str, g: WorkerGroup) -> None:
        env = {
            **os.environ,
            **self.extra_env,
            ENV["dsn"]: self.dsn,
            ENV["tenant"]: tenant,
            ENV["job_id"]: g.job_id,
        }
        env.pop(ENV_POOL["worker_id"], None)  # local:<pid>, chosen by the worker itself
        if g.wave_number is not None:
            env[ENV_POOL["wave"]] = str(g.wave_number)
        if self.command:
            env[ENV_POOL["command"]] = json.dumps(self.command)
        if self.idle_seconds is not None:
            env[ENV_POOL["idle"]] = str(self.idle_seconds)
        argv = self._argv(tenant, g.job_id)
        out = tempfile.TemporaryFile()  # noqa: SIM115 (kept open while the worker runs)
        try:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        except OSError:
            out.close()
            raise
        wid = f"local:{proc.pid}"
        self._workers[wid] = _Worker(
            wid,
            tenant,
            g.job_id,
            g.wave_number,
            proc.pid,
            proc,
            out,
            argv=argv,
            started_at=time.monotonic(),
        )
        self.started += 1
        event(
            log, "worker_started", logging.DEBUG, job_id=g.job_id, worker_id=wid, wave=g.wave_number
        )

    def _poll(self, w: _Worker) -> None:
        if w.ended:
            return
        if w.proc is not None:
            code = w.proc.poll()
            if code is None:
                return
            w.ended, w.exit_code = True, code
            if w.out is not None:
                w.out.seek(0)
                text = w.out.read().decode(errors="replace").strip()
                w.out.close()
                w.out = None
                w.message = redact.scrub(text[-MAX_TAIL:], self.dsn)
            return
        if not self._is_worker(w.pid, w.argv):  # an adopted one: no exit code to read
            w.ended = True
            w.message = "adopted worker ended (its exit code went to the runner that started it)"

    def _is_worker(self, pid: int, argv: list[str]) -> bool:
        try:
            raw = Path(self.proc_root, str(pid), "cmdline").read_bytes()
            stat = Path(self.proc_root, str(pid), "stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is not alive
            return False
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a][1:] == argv[1:]

    def _adopt(self, tenant: str, job_id: str) -> None:
        """Once per job: count the live pooled workers of this job left by an earlier runner."""
        if (tenant, job_id) in self._scanned:
            return
        self._scanned.add((tenant, job_id))
        argv = self._argv(tenant, job_id)
        mine = {w.pid for w in self._workers.values()}
        try:
            pids = [int(p) for p in os.listdir(self.proc_root) if p.isdigit()]
        except OSError:
            return
        for pid in pids:
            if pid in mine or pid == os.getpid() or not self._is_worker(pid, argv):
                continue
            wid = f"local:{pid}"
            self._workers[wid] = _Worker(wid, tenant, job_id, None, pid, None, argv=argv)
            event(log, "worker_adopted", job_id=job_id, worker_id=wid)
