"""The pooled worker: one process that stays up and runs many batches of ONE job (issue 12).

`python -m importwaves.worker_pool` (settings from the environment, see ENV_POOL): it keeps ONE
work connection and ONE heartbeat connection for its whole life, and loops:

1. look at its job: gone, or completed/failed/invalid/suspended -> exit 0;
2. claim the next dispatched batch of the job (of wave IMPORTWAVES_WAVE when set) that no worker
   reserved, with FOR UPDATE SKIP LOCKED, under that batch's fencing token (dispatch_seq):
   dispatched -> processing, worker_id = this worker's id (IMPORTWAVES_WORKER_ID: the pod name on
   Kubernetes; `local:<pid>` locally);
3. run the reference import in-process (worker._import_and_complete: the upsert and the fenced
   completion, with its NOTIFY, in one transaction) while the heartbeat connection touches the
   batch; a failure is recorded as run_batch records it (batch_fail; bad staging data fails the
   batch at once);
4. nothing to claim: wait on LISTEN on the tenant's channel for a prompt of its job (a dispatch
   or a status change; completion notices, the engine's, are skipped: `prompts_worker`) and just
   try again, with a short poll (IMPORTWAVES_WORKER_POLL_SECONDS, default 1) as the fallback; exit
   0 after IMPORTWAVES_WORKER_IDLE_SECONDS (default 30) with nothing claimed.

With a custom worker command (IMPORTWAVES_WORKER_COMMAND, a JSON list) the worker keeps the
per-batch contract of worker.py: it reserves the next dispatched batch (the row stays
`dispatched` with this worker's id, so no other pooled worker takes it), runs the command as a
subprocess with the per-batch env (IMPORTWAVES_DSN/TENANT/JOB_ID/BATCH_ID/DISPATCH_SEQ), and reads
its exit code: 0 without a recorded completion and 1 without a recorded failure are failed
attempts (the latter with the command's redacted stderr tail), 3 is fenced (nothing recorded).

Exit codes of the pooled worker: 0 its job needs nothing more from it (or idle timeout); 1 it
lost its database (the engine counts the batch it held as a failed attempt once it sees the end);
2 bad settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from importwaves import redact
from importwaves.db.connect import Conn, connect
from importwaves.db.options import ConnOptions
from importwaves.db.queries import Q
from importwaves.engine.model import MAIN
from importwaves.engine.notify import channel_for, prompt_payload, prompts_worker
from importwaves.worker import (
    ENV,
    EXIT_FAILED,
    EXIT_FENCED,
    EXIT_OK,
    EXIT_USAGE,
    BatchDataError,
    WorkItem,
    _describe,
    _Fenced,
    _import_and_complete,
    backoff_params,
)

ENV_POOL = {
    "worker_id": "IMPORTWAVES_WORKER_ID",
    "wave": "IMPORTWAVES_WAVE",
    "idle": "IMPORTWAVES_WORKER_IDLE_SECONDS",
    "poll": "IMPORTWAVES_WORKER_POLL_SECONDS",
    "command": "IMPORTWAVES_WORKER_COMMAND",
}

#: The failed attempt recorded when a worker exits 0 but its dispatch recorded no completion.
EXIT_WITHOUT_COMPLETION = (
    "worker exited 0 without recording its completion; see the worker contract (README: a "
    "worker records its completion and row count itself, in its fenced transaction)"
)

#: Job statuses for which a pooled worker has nothing left to run.
DONE_STATUSES = frozenset({"completed", "failed", "invalid", "suspended"})
#: Longest stderr tail of a custom command kept in a failed attempt's error.
MAX_TAIL = 2000


def wave_finished(wave: dict[str, Any] | None) -> bool:
    """A main wave with every batch completed or failed (its `wave_left` row, read BEFORE the
    claim that found nothing, so a batch requeued in between is either claimed or left for a
    later Job): nothing more will come for this wave's Job (a retry requeued later gets a new
    Job from the engine's sync, as any wave that gets work after its pods ended). A derived
    wave (-2) grows while its parents complete: never finished here. Without it an idle wave
    worker woke on every NOTIFY of the tenant (every completion and dispatch of the later
    waves) for its idle timeout: 8 idle pods x ~1,700 notices in a 1M-line import."""
    return bool(
        wave is not None
        and wave["dependency_level"] == MAIN
        and wave["total_batches"] > 0
        and wave["batches_left"] == 0
    )


@dataclass(frozen=True)
class PoolSettings:
    dsn: str
    tenant: str
    job_id: str
    worker_id: str
    wave: int | None = None
    idle_seconds: float = 30.0
    poll: float = 1.0
    #: a custom worker command run per batch (empty: the reference import, in-process)
    command: tuple[str, ...] = ()
    #: a testing aid: hold each claimed batch this long before importing it
    hold_seconds: float = 0.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> PoolSettings:
        env = dict(os.environ if env is None else env)
        need = [ENV["dsn"], ENV["tenant"], ENV["job_id"]]
        missing = [v for v in need if not env.get(v)]
        if missing:
            raise ValueError("missing worker settings: " + ", ".join(missing))
        try:
            wave = env.get(ENV_POOL["wave"], "")
            command = json.loads(env.get(ENV_POOL["command"]) or "[]")
            if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
                raise ValueError(f"{ENV_POOL['command']} must be a JSON list of strings")
            return cls(
                dsn=env[ENV["dsn"]],
                tenant=env[ENV["tenant"]],
                job_id=env[ENV["job_id"]],
                worker_id=env.get(ENV_POOL["worker_id"]) or f"local:{os.getpid()}",
                wave=int(wave) if wave.strip() else None,
                idle_seconds=float(env.get(ENV_POOL["idle"]) or 30),
                poll=float(env.get(ENV_POOL["poll"]) or 1.0),
                command=tuple(command),
                hold_seconds=float(
                    env.get("IMPORTWAVES_WORKER_HOLD_SECONDS")
                    or env.get("IWTEST_WORKER_HOLD_SECONDS")
                    or 0
                ),
            )
        except ValueError as exc:
            raise ValueError(f"bad worker settings: {exc}") from None


@dataclass
class PoolStats:
    completed: int = 0
    failed: int = 0
    fenced: int = 0
    #: why it stopped: "job <status>", "job gone", "idle", "stopped"
    reason: str = ""
    batches: list[str] = field(default_factory=list)
    #: times it looked at its job for work (each a round trip: at start, after each batch, on
    #: each prompt for it, at each poll)
    looks: int = 0


class PooledWorker:
    def __init__(self, settings: PoolSettings, opts: ConnOptions | None = None) -> None:
        self.s = settings
        self.opts = opts or ConnOptions.from_env()
        self.stats = PoolStats()
        self._stop = threading.Event()
        #: set while it waits on LISTEN with nothing to run (tests wait on it)
        self.waiting = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> PoolStats:
        s = self.s
        with connect(s.dsn, s.tenant, autocommit=True, opts=self.opts) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel_for(s.tenant))))
            beat = _Beat(s, self.opts)
            beat.start()
            try:
                self.stats.reason = self._loop(conn, beat)
            finally:
                beat.stop()
        return self.stats

    def _loop(self, conn: Conn, beat: _Beat) -> str:
        s = self.s
        idle_since = time.monotonic()
        while not self._stop.is_set():
            wave: dict[str, Any] | None = None
            self.stats.looks += 1
            if s.command:
                job = conn.execute(Q("job_get"), {"job_id": s.job_id}).fetchone()
                claimed = None
            else:
                job, claimed, wave = self._look_and_claim(conn)
            if job is not None and claimed is not None:
                # claimed while its job was not over (the claim looks at the job's status)
                spec: dict[str, Any] = job["spec"]
                beat.every = beat_interval(spec)
                self._reference(conn, beat, spec, claimed)
                idle_since = time.monotonic()
                continue
            if job is None:
                return "job gone"
            if job["status"] in DONE_STATUSES:
                return f"job {job['status']}"
            spec = job["spec"]
            beat.every = beat_interval(spec)
            ran = self._custom(conn, beat, spec) if s.command else False
            if ran:
                idle_since = time.monotonic()
                continue
            if s.wave is not None:
                if s.command:
                    wave = self._wave(conn)
                if wave_finished(wave):
                    return f"wave {s.wave} finished"
            left = s.idle_seconds - (time.monotonic() - idle_since)
            if left <= 0:
                return "idle"
            # A prompt (a dispatch, its job's status change) or the poll: look again.
            self._wait(conn, min(s.poll, left))
        return "stopped"

    def _wait(self, conn: Conn, timeout: float) -> None:
        """Until a prompt for this job's workers arrives (a dispatch or a status change of its
        job: `prompts_worker`; other notices on the tenant's channel are skipped), `timeout`
        passes or `stop()` is called (looked at twice a second)."""
        deadline = time.monotonic() + timeout
        self.waiting.set()
        try:
            while not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                for notice in conn.notifies(timeout=min(0.5, left), stop_after=1):
                    if prompts_worker(notice.payload, self.s.job_id):
                        return
        finally:
            self.waiting.clear()

    # -- the reference import, in-process ------------------------------------------------
    def _look_and_claim(
        self, conn: Conn
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
        """The job's row, the next batch claimed and (a wave's worker) what its wave has left,
        in ONE round trip (pipeline mode: on a dispatch prompt, the claim follows the NOTIFY
        with no other query first). The claim takes a batch only while the job exists and is
        not over (batch_claim_next looks)."""
        s = self.s
        with conn.pipeline():
            wave_cur = (
                conn.execute(Q("wave_left"), {"job_id": s.job_id, "wave_number": s.wave})
                if s.wave is not None
                else None
            )
            job_cur = conn.execute(Q("job_get"), {"job_id": s.job_id})
            claim_cur = conn.execute(
                Q("batch_claim_next"),
                {
                    "job_id": s.job_id,
                    "wave_number": s.wave,
                    "worker_id": s.worker_id,
                    "done_statuses": sorted(DONE_STATUSES),
                },
            )
        return (
            job_cur.fetchone(),
            claim_cur.fetchone(),
            wave_cur.fetchone() if wave_cur is not None else None,
        )

    def _wave(self, conn: Conn) -> dict[str, Any] | None:
        return conn.execute(
            Q("wave_left"), {"job_id": self.s.job_id, "wave_number": self.s.wave}
        ).fetchone()

    def _reference(
        self, conn: Conn, beat: _Beat, spec: dict[str, Any], claimed: dict[str, Any]
    ) -> bool:
        s = self.s
        item = WorkItem(s.dsn, s.tenant, s.job_id, claimed["batch_id"], claimed["dispatch_seq"])
        key = {"job_id": s.job_id, "batch_id": item.batch_id, "dispatch_seq": item.dispatch_seq}
        self.stats.batches.append(item.batch_id)
        beat.hold(key)
        try:
            if s.hold_seconds:
                time.sleep(s.hold_seconds)
            _import_and_complete(conn, item, key, spec, claimed)
        except _Fenced:
            self.stats.fenced += 1
            return True
        except psycopg.OperationalError:
            raise  # the database is away: this process ends; the engine sees it and fails it
        except Exception as exc:  # this attempt failed: recorded, never swallowed
            message = redact.scrub(_describe(exc), s.dsn)
            max_attempts = int(spec.get("retries", 3)) + 1
            if isinstance(exc, BatchDataError):
                max_attempts = 1
                message = f"non-retryable: {message}"
            self._fail(conn, key, max_attempts, message, spec)
            return True
        finally:
            beat.release()
        self.stats.completed += 1
        return True

    # -- a custom worker command, per batch ----------------------------------------------
    def _custom(self, conn: Conn, beat: _Beat, spec: dict[str, Any]) -> bool:
        s = self.s
        got = conn.execute(
            Q("batch_reserve_next"),
            {"job_id": s.job_id, "wave_number": s.wave, "worker_id": s.worker_id},
        ).fetchone()
        if got is None:
            return False
        key = {"job_id": s.job_id, "batch_id": got["batch_id"], "dispatch_seq": got["dispatch_seq"]}
        self.stats.batches.append(got["batch_id"])
        max_attempts = int(spec.get("retries", 3)) + 1
        # The beat touches the batch once the command claimed it (it may not heartbeat) and
        # watches its fencing token: a command still running when its dispatch was requeued
        # (a hang before its claim, a stale heartbeat) is stopped, as a fenced-out worker.
        fenced = threading.Event()
        beat.hold(key, on_fenced=fenced.set)
        try:
            code, err = run_command(
                s.command, s, got["batch_id"], got["dispatch_seq"], fenced=fenced
            )
        finally:
            beat.release()
        if fenced.is_set():
            code = EXIT_FENCED
        if code == EXIT_FENCED:
            self.stats.fenced += 1
        elif code == EXIT_OK:
            # An exit 0 proves nothing: without the completion in the database it is a failed
            # attempt (fenced by the dispatch sequence: a recorded result is never touched).
            if not self._fail(conn, key, max_attempts, EXIT_WITHOUT_COMPLETION, spec):
                self.stats.completed += 1
        else:
            what = "could not start" if code is None else f"exited {code}"
            text = f"worker command {what}" + (f": {err}" if err else "")
            self._fail(conn, key, max_attempts, text, spec)
            # in this worker's own log too (redacted): `kubectl logs` of its pod shows why
            print(
                f"importwaves worker {s.worker_id}: batch {key['batch_id']}: {text}",
                file=sys.stderr,
            )
        return True

    def _fail(
        self,
        conn: Conn,
        key: dict[str, Any],
        max_attempts: int,
        message: str,
        spec: dict[str, Any],
    ) -> bool:
        """Record a failed attempt of this dispatch (no-op when it is no longer the current one
        or already has a result) and prompt the engine; True when one was recorded."""
        with conn.transaction():
            row = conn.execute(
                Q("batch_fail"),
                {
                    **key,
                    "max_attempts": max_attempts,
                    "error": message[:4000],
                    **backoff_params(spec),
                },
            ).fetchone()
            if row is not None:
                conn.execute(
                    Q("notify_tenant"),
                    {
                        "channel": channel_for(self.s.tenant),
                        "payload": prompt_payload("failed", self.s.tenant, self.s.job_id),
                    },
                )
        if row is not None:
            self.stats.failed += 1
        return row is not None


def beat_interval(spec: dict[str, Any]) -> float:
    """Seconds between heartbeats (and fencing checks): a fifth of staleAfterSeconds, 0.5..10."""
    return max(0.5, min(10.0, float(spec.get("staleAfterSeconds", 300)) / 5))


def run_command(
    command: Sequence[str],
    s: PoolSettings,
    batch_id: str,
    dispatch_seq: int,
    *,
    fenced: threading.Event | None = None,
) -> tuple[int | None, str]:
    """Run a custom worker command for one batch with the per-batch env; its exit code (None:
    it could not start) and its stderr tail, redacted. Killed once `fenced` is set (its
    dispatch was requeued: whatever it does now cannot be recorded)."""
    env = {
        **os.environ,
        ENV["dsn"]: s.dsn,
        ENV["tenant"]: s.tenant,
        ENV["job_id"]: s.job_id,
        ENV["batch_id"]: batch_id,
        ENV["dispatch_seq"]: str(dispatch_seq),
        ENV_POOL["worker_id"]: s.worker_id,
    }
    env.pop(ENV_POOL["command"], None)
    try:
        proc = subprocess.Popen(
            list(command),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            # its own process group: a fenced-out command is stopped with its children (a shell's
            # `sleep` would otherwise hold stderr open, and this worker with it)
            start_new_session=True,
        )
    except OSError as exc:
        return None, redact.scrub(f"{type(exc).__name__}: {exc}", s.dsn)
    err = ""
    while True:
        try:
            _, err = proc.communicate(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            if fenced is not None and fenced.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    tail = (err or "").strip()[-MAX_TAIL:]
    return proc.returncode, redact.scrub(tail, s.dsn)


class _Beat:
    """The heartbeat connection, kept for the worker's life: touches the batch being run."""

    def __init__(self, s: PoolSettings, opts: ConnOptions) -> None:
        self.s, self.opts = s, opts
        self.every = 10.0
        self._key: dict[str, Any] | None = None
        self._on_fenced: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def hold(self, key: dict[str, Any], on_fenced: Callable[[], None] | None = None) -> None:
        """Beat for this dispatch; `on_fenced`: called once when the batch no longer belongs
        to it (dispatched again under a newer token, or requeued)."""
        with self._lock:
            self._key = dict(key)
            self._on_fenced = on_fenced

    def release(self) -> None:
        with self._lock:
            self._key = None
            self._on_fenced = None

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        conn: Conn | None = None
        while not self._stop.is_set():
            self._wake.wait(self.every)
            if self._stop.is_set():
                break
            with self._lock:
                key, on_fenced = self._key, self._on_fenced
            if key is None:
                continue
            try:
                conn = conn or connect(self.s.dsn, self.s.tenant, autocommit=True, opts=self.opts)
                conn.execute(Q("batch_heartbeat"), key)
                if on_fenced is not None and _fenced_out(conn, key):
                    with self._lock:
                        if self._key == key:
                            self._on_fenced = None
                    on_fenced()
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None  # try again next beat; staleness is the engine's call
        if conn is not None:
            conn.close()


def _fenced_out(conn: Conn, key: dict[str, Any]) -> bool:
    """The batch no longer belongs to this dispatch: gone, or dispatched again under a newer
    token (a requeue alone is not enough: the command may have just recorded its own failed
    attempt, and its last words belong in this worker's log)."""
    row = conn.execute(
        Q("batch_get"), {"job_id": key["job_id"], "batch_id": key["batch_id"]}
    ).fetchone()
    return row is None or int(row["dispatch_seq"]) != int(key["dispatch_seq"])


def main(argv: list[str] | None = None) -> int:
    """`python -m importwaves.worker_pool [--db=.. --tenant=.. --job=..]` (settings from the
    environment; the arguments only name the worker's database, tenant and job, so `ps` and the
    local launcher can tell)."""
    try:
        s = PoolSettings.from_env()
        redact.check_dsn(s.dsn, f"the DSN in {ENV['dsn']}")
    except ValueError as exc:
        print(f"importwaves worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    redact.remember(s.dsn)
    worker = PooledWorker(s)
    try:
        stats = worker.run()
    except psycopg.Error as exc:
        msg = redact.describe(exc, f"the DSN in {ENV['dsn']}").message
        print(f"importwaves worker {s.worker_id}: {msg}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # never a traceback: psycopg's texts may quote the DSN
        text = redact.scrub(f"{type(exc).__name__}: {exc}", s.dsn)
        print(f"importwaves worker {s.worker_id}: {text}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"importwaves worker {s.worker_id}: {stats.reason}; {stats.completed} completed, "
        f"{stats.failed} failed, {stats.fenced} fenced"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
