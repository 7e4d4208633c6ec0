"""Local launcher: each dispatched batch runs as a worker subprocess on this machine."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from importwaves.launch.base import BatchDispatch, LaunchFailure
from importwaves.log import event
from importwaves.spec import ImportSpec
from importwaves.worker import ENV

log = logging.getLogger("importwaves.launch.local")


@dataclass(frozen=True)
class Finished:
    batch: BatchDispatch
    exit_code: int
    output: str


class LocalLauncher:
    """Runs `python -m importwaves.worker` (or `command`, a custom worker) per batch with the
    worker contract's env."""

    def __init__(
        self,
        dsn: str,
        *,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.command = list(command) if command else [python, "-m", "importwaves.worker"]
        self._running: dict[tuple[str, str], tuple[BatchDispatch, subprocess.Popen[str]]] = {}

    def launch(
        self, tenant: str, job_id: str, spec: ImportSpec, batches: Sequence[BatchDispatch]
    ) -> list[LaunchFailure]:
        failures = []
        for b in batches:
            env = {
                **os.environ,
                **self.extra_env,
                ENV["dsn"]: self.dsn,
                ENV["tenant"]: tenant,
                ENV["job_id"]: job_id,
                ENV["batch_id"]: b.batch_id,
                ENV["dispatch_seq"]: str(b.dispatch_seq),
            }
            try:
                proc = subprocess.Popen(
                    self.command,
                    env=env,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            except OSError as exc:
                failures.append(LaunchFailure(b, f"{type(exc).__name__}: {exc}"))
                continue
            old = self._running.pop((job_id, b.batch_id), None)
            if old is not None and old[1].poll() is None:  # a fenced-out predecessor
                old[1].kill()
            self._running[(job_id, b.batch_id)] = (b, proc)
            event(
                log,
                "worker_started",
                logging.DEBUG,
                job_id=job_id,
                batch_id=b.batch_id,
                dispatch_seq=b.dispatch_seq,
                pid=proc.pid,
            )
        return failures

    def poll(self) -> list[Finished]:
        done = []
        for key, (batch, proc) in list(self._running.items()):
            code = proc.poll()
            if code is None:
                continue
            out = proc.stdout.read() if proc.stdout else ""
            if proc.stdout:
                proc.stdout.close()
            del self._running[key]
            done.append(Finished(batch, code, out.strip()[-2000:]))
        return done

    def running(self, job_id: str | None = None) -> list[BatchDispatch]:
        return [b for (j, _), (b, _) in self._running.items() if job_id in (None, j)]

    def pids(self) -> dict[str, int]:
        return {b.batch_id: p.pid for (b, p) in self._running.values()}

    def stop_all(self) -> None:
        for _, proc in self._running.values():
            if proc.poll() is None:
                proc.kill()
        for _, proc in self._running.values():
            proc.wait(10)
        self._running.clear()
