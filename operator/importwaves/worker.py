"""The reference worker: import one batch's staging rows and record the completion atomically.

Contract (also in the README): the worker gets its tenant DSN, tenant, job id, batch id and
dispatch sequence (the fencing token), claims the batch (dispatched -> processing, counting the
attempt), heartbeats while it runs, and in ONE transaction upserts the target rows and marks the
batch completed with the number of rows that upsert wrote (`batch_complete_notify`: rows_written),
which must equal the batch's planned record_count. An exit 0 records nothing: the engine only
checks that this dispatch's completion is in the database. Exit codes:

    0  the batch is completed (by this run or an earlier one)
    1  this attempt failed; the failure (and its message) is recorded (bad staging data, or a
       write count that differs from the batch's planned count: the batch fails at once)
    2  bad invocation (missing settings)
    3  fenced out: the batch belongs to a newer dispatch or is no longer dispatched; nothing done

This module imports only psycopg so a worker process starts fast.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from importwaves import redact
from importwaves.db.connect import connect
from importwaves.db.options import ConnOptions
from importwaves.db.queries import Q
from importwaves.engine.notify import channel_for

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FENCED = 0, 1, 2, 3

#: Record type id the reference import writes to `customers`; derived types go to
#: `transaction_lines`; every other main type goes to `transactions`.
CUSTOMER_RECORD_TYPE_ID = -2

ENV = {
    "dsn": "IMPORTWAVES_DSN",
    "tenant": "IMPORTWAVES_TENANT",
    "job_id": "IMPORTWAVES_JOB_ID",
    "batch_id": "IMPORTWAVES_BATCH_ID",
    "dispatch_seq": "IMPORTWAVES_DISPATCH_SEQ",
}


class BatchDataError(Exception):
    """Staging rows of this batch cannot be imported; the message names the record ids."""


@dataclass(frozen=True)
class WorkerResult:
    exit_code: int
    message: str


@dataclass(frozen=True)
class WorkItem:
    dsn: str
    tenant: str
    job_id: str
    batch_id: str
    dispatch_seq: int


def run_batch(
    item: WorkItem,
    *,
    worker_id: str | None = None,
    heartbeat_every: float | None = None,
    hold_seconds: float = 0.0,
    opts: ConnOptions | None = None,
) -> WorkerResult:
    """Run one batch to completion or recorded failure. Safe to call in threads. Every
    connection sets the timeouts and keepalives of `opts` (default: IMPORTWAVES_* variables)."""
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    key = {"job_id": item.job_id, "batch_id": item.batch_id, "dispatch_seq": item.dispatch_seq}
    opts = opts or ConnOptions.from_env()
    with connect(item.dsn, item.tenant, autocommit=True, opts=opts) as conn:
        job = conn.execute(Q("job_get"), {"job_id": item.job_id}).fetchone()
        if job is None:
            return WorkerResult(EXIT_FENCED, f"no job {item.job_id}")
        spec: dict[str, Any] = job["spec"]
        claimed = conn.execute(Q("batch_claim"), {**key, "worker_id": worker_id}).fetchone()
        if claimed is None:
            return _not_claimed(conn, item)
        stale_after = float(spec.get("staleAfterSeconds", 300))
        beat = _Heartbeat(item, key, heartbeat_every or max(0.5, min(10.0, stale_after / 5)), opts)
        beat.start()
        try:
            if hold_seconds:
                time.sleep(hold_seconds)
            _import_and_complete(conn, item, key, spec, claimed)
        except _Fenced as exc:
            return WorkerResult(EXIT_FENCED, str(exc))
        except Exception as exc:  # any failure of this attempt is recorded, never swallowed
            beat.stop()
            message = redact.scrub(_describe(exc), item.dsn)
            max_attempts = int(spec.get("retries", 3)) + 1
            if isinstance(exc, BatchDataError):
                # Bad staging data fails every attempt the same way: fail the batch now (the
                # error names the record ids; retry-failed requeues it once the data is fixed).
                max_attempts = 1
                message = f"non-retryable: {message}"
            row = conn.execute(
                Q("batch_fail"),
                {
                    **key,
                    "max_attempts": max_attempts,
                    "error": message[:4000],
                    **backoff_params(spec),
                },
            ).fetchone()
            state = row["status"] if row else "unchanged (fenced)"
            return WorkerResult(EXIT_FAILED, f"batch {item.batch_id} failed ({state}): {message}")
        finally:
            beat.stop()
    return WorkerResult(EXIT_OK, f"batch {item.batch_id} completed")


def backoff_params(spec: dict[str, Any]) -> dict[str, float]:
    """batch_fail's back-off parameters from a stored spec (its spec.retryBackoff)."""
    # Imported here, on a failure: the spec's models (pydantic) are most of a worker process's
    # start-up CPU otherwise, paid by every worker pod (a Job's pods start once per wave).
    from importwaves.spec import RetryBackoff

    backoff = RetryBackoff.model_validate(spec.get("retryBackoff") or {})
    return {"backoff_base": backoff.baseSeconds, "backoff_cap": backoff.capSeconds}


def import_statement(spec: dict[str, Any], record_type_id: int) -> tuple[str, dict[str, Any]]:
    """The import query (queries.sql name) of a batch of `record_type_id` and the parameters
    `invalid_staging_rows` validates its rows with."""
    derived_ids = {int(d.get("recordTypeId", -13)) for d in spec.get("derivedTypes", [])}
    if record_type_id in derived_ids:
        return "import_transaction_lines", {
            "needs_name": False,
            "parent_table": "transactions",
            "by_parent": True,
        }
    if record_type_id == CUSTOMER_RECORD_TYPE_ID:
        return "import_customers", {"needs_name": True, "parent_table": "", "by_parent": False}
    return "import_transactions", {
        "needs_name": False,
        "parent_table": "customers",
        "by_parent": False,
    }


def _import_and_complete(
    conn: psycopg.Connection[Any],
    item: WorkItem,
    key: dict[str, Any],
    spec: dict[str, Any],
    claimed: dict[str, Any],
) -> None:
    """Import the batch and record its completion in ONE transaction, or change nothing.

    `conn` is in autocommit mode; the transaction is BEGIN ... COMMIT sent in pipeline mode in
    two round trips: (1) BEGIN, `batch_lock` and the import upsert; (2) `batch_complete_notify`
    (the completion, its NOTIFY and a durable commit, one statement) and COMMIT. Every check is
    made before the second round trip is sent, in this order: the lock says this dispatch still
    holds the batch (else fenced); the upsert ran and wrote the batch's planned count (the
    import queries skip rows with an invalid payload, a missing parent fails their foreign key).
    The row lock held since (1) keeps the batch in this dispatch, so the completion matches it;
    if the completion statement fails, the COMMIT queued behind it is not run (the pipeline
    aborts) and everything rolls back. An upsert that failed or wrote another count is rolled
    back, and `invalid_staging_rows` then names the invalid rows (a data error), or else the
    upsert's own error is raised, or else the count mismatch (a data error)."""
    if not conn.autocommit:
        raise ValueError("_import_and_complete needs a connection in autocommit mode")
    record_type_id = int(claimed["record_type_id"])
    ids = [int(x) for x in claimed["chunk_ids_json"]]
    query, params = import_statement(spec, record_type_id)
    base = {
        "job_id": item.job_id,
        "record_type_id": record_type_id,
        "ids": ids,
        "parent_record_type_id": claimed.get("parent_record_type_id"),
    }
    written = -1
    with conn.pipeline() as pipe:
        try:
            conn.execute("BEGIN")
            lock_cur = conn.execute(
                Q("batch_lock"), {"job_id": item.job_id, "batch_id": item.batch_id}
            )
            import_cur = conn.execute(Q(query), base)
            error = _sync(pipe)
            lock = _result(lock_cur, error).fetchone()
            if (
                lock is None
                or lock["status"] != "processing"
                or lock["dispatch_seq"] != item.dispatch_seq
            ):
                raise _Fenced(f"batch {item.batch_id} was requeued while this worker ran")
            if error is None:
                written = import_cur.rowcount
            if error is None and written == lock["record_count"]:
                done_cur = conn.execute(
                    Q("batch_complete_notify"),
                    {
                        **key,
                        "rows_written": written,
                        "channel": channel_for(item.tenant),
                        "payload": completion_payload(item),
                    },
                )
                conn.execute("COMMIT")
                pipe.sync()
                if done_cur.fetchone() is None:  # cannot happen under batch_lock's row lock
                    raise RuntimeError(
                        f"batch {item.batch_id}: the completion matched no batch row though "
                        "this transaction held it locked; its import committed without it (the "
                        "upsert is idempotent: the batch's next attempt imports it again)"
                    )
                return
            _rollback(conn, pipe)
        except BaseException:
            _rollback(conn, pipe)
            raise
    # Not committed: the upsert failed, or wrote other than the planned count. Say why.
    bad = conn.execute(Q("invalid_staging_rows"), {**base, **params}).fetchall()
    if bad:
        shown = "; ".join(f"record {r['record_id']}: {r['problem']}" for r in bad[:5])
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise BatchDataError(f"{len(bad)} invalid staging row(s): {shown}{more}")
    if error is not None:
        raise error
    raise BatchDataError(
        _count_mismatch(
            conn,
            item,
            record_type_id,
            ids,
            written,
            lock,
            query == "import_transaction_lines",
        )
    )


def _sync(pipe: psycopg.Pipeline) -> psycopg.Error | None:
    """Send what is queued and read every result; the first error, if any (the statements
    after it were not run, their cursors have no result)."""
    try:
        pipe.sync()
    except psycopg.Error as exc:
        return exc
    return None


def _result(cur: psycopg.Cursor[Any], error: psycopg.Error | None) -> psycopg.Cursor[Any]:
    if cur.pgresult is None or cur.pgresult.status == psycopg.pq.ExecStatus.FATAL_ERROR:
        raise error or psycopg.InterfaceError("a pipelined statement has no result")
    return cur


def _rollback(conn: psycopg.Connection[Any], pipe: psycopg.Pipeline) -> None:
    """Roll back the completion transaction (nothing it wrote stays); a connection that broke
    is left to the caller, which records nothing on it (the error being raised says why)."""
    if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    try:
        conn.execute("ROLLBACK")
        pipe.sync()
    except psycopg.Error:
        pass


def _count_mismatch(
    conn: psycopg.Connection[Any],
    item: WorkItem,
    record_type_id: int,
    ids: list[int],
    written: int,
    done: dict[str, Any],
    by_parent: bool,
) -> str:
    """The message of a batch whose write count is not its planned count, naming record ids."""
    head = f"wrote {written} row(s), {done['record_count']} planned"
    if not by_parent:
        absent = conn.execute(
            Q("batch_rows_absent"),
            {"job_id": item.job_id, "record_type_id": record_type_id, "chunk": json.dumps(ids)},
        ).fetchall()
        if absent:
            shown = ", ".join(str(r["record_id"]) for r in absent)
            return f"{head}: record(s) {shown} no longer staged"
    what = "parent ids" if by_parent else "record ids"
    shown = ", ".join(str(i) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
    return f"{head} (staging changed after planning; the batch's {what} {shown})"


def completion_payload(item: WorkItem) -> str:
    """The NOTIFY payload of a completion (see engine/notify.py)."""
    return json.dumps(
        {
            "tenant": item.tenant,
            "job_id": item.job_id,
            "batch_id": item.batch_id,
            "dispatch_seq": item.dispatch_seq,
        },
        separators=(",", ":"),
    )


class _Fenced(Exception):
    pass


def _not_claimed(conn: psycopg.Connection[Any], item: WorkItem) -> WorkerResult:
    row = conn.execute(
        Q("batch_get"), {"job_id": item.job_id, "batch_id": item.batch_id}
    ).fetchone()
    if row is None:
        return WorkerResult(EXIT_FENCED, f"no batch {item.batch_id}")
    if row["status"] == "completed":
        return WorkerResult(EXIT_OK, f"batch {item.batch_id} already completed")
    return WorkerResult(
        EXIT_FENCED,
        f"batch {item.batch_id} is {row['status']} with dispatch "
        f"{row['dispatch_seq']}; this worker had dispatch {item.dispatch_seq}",
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        text = diag.message_primary or str(exc)
        if diag.message_detail:
            text += f" ({diag.message_detail})"
        return f"{type(exc).__name__}: {text}"
    return f"{type(exc).__name__}: {exc}"


class _Heartbeat:
    """Touches heartbeat_at on its own connection while the batch runs."""

    def __init__(
        self, item: WorkItem, key: dict[str, Any], every: float, opts: ConnOptions
    ) -> None:
        self.item, self.key, self.every, self.opts = item, key, every, opts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        conn = None
        while not self._stop.wait(self.every):
            try:
                conn = conn or connect(
                    self.item.dsn, self.item.tenant, autocommit=True, opts=self.opts
                )
                conn.execute(Q("batch_heartbeat"), self.key)
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None  # try again next beat; staleness is the engine's call
        if conn is not None:
            conn.close()


def item_from_env(env: dict[str, str] | None = None) -> WorkItem:
    env = dict(os.environ if env is None else env)
    missing = [v for v in ENV.values() if not env.get(v)]
    if missing:
        raise ValueError("missing worker settings: " + ", ".join(missing))
    return WorkItem(
        env[ENV["dsn"]],
        env[ENV["tenant"]],
        env[ENV["job_id"]],
        env[ENV["batch_id"]],
        int(env[ENV["dispatch_seq"]]),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m importwaves.worker` (settings from the environment; see ENV)."""
    try:
        item = item_from_env()
    except ValueError as exc:
        print(f"importwaves worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    source = f"the DSN in {ENV['dsn']}"
    try:
        redact.check_dsn(item.dsn, source)
    except ValueError as exc:
        print(f"importwaves worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    redact.remember(item.dsn)
    # a testing aid: hold each batch this long (IWTEST_* because worker.env may not set
    # IMPORTWAVES_* variables on pods)
    hold = float(
        os.environ.get("IMPORTWAVES_WORKER_HOLD_SECONDS")
        or os.environ.get("IWTEST_WORKER_HOLD_SECONDS")
        or 0
    )
    try:
        result = run_batch(item, hold_seconds=hold)
    except psycopg.Error as exc:  # could not connect, or lost the database: nothing recorded
        print(
            f"importwaves worker: batch {item.batch_id}: {redact.describe(exc, source).message}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except Exception as exc:  # never a traceback: psycopg's texts may quote the DSN
        text = redact.scrub(f"{type(exc).__name__}: {exc}", item.dsn)
        print(f"importwaves worker: batch {item.batch_id}: {text}", file=sys.stderr)
        return EXIT_FAILED
    stream = sys.stdout if result.exit_code == EXIT_OK else sys.stderr
    print(redact.scrub(result.message, item.dsn), file=stream)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
