"""A transaction whose BEGIN and COMMIT travel in pipelines with its statements.

psycopg spends a round trip of its own on a transaction's BEGIN: its implicit BEGIN and
`conn.transaction()` both wait for BEGIN's reply, in pipeline mode too (a libpq trace shows
BEGIN, Sync, ReadyForQuery, then the first statement). A COMMIT is one more. On the coordinator's
path (a parent batch's completion to the derived wave's dispatch) those are two of its round trips.
Here the connection is put in autocommit mode for the block (no implicit BEGIN), the caller sends
`BEGIN` in its first pipeline and may send `COMMIT` after the last statement of its last one:

    with pipelined_transaction(conn) as tx:
        with conn.pipeline():
            tx.begin()
            lock = conn.execute(...)       # BEGIN and these in ONE round trip
        ...                                # any statements: they run in the transaction
        with conn.pipeline():
            conn.execute(...)
            tx.commit()                    # skipped by the server if a statement before it fails

A block that sends no COMMIT is committed at its end (one round trip, as `conn.transaction()`);
one that raises, or fails in a pipeline (the server then skips the COMMIT queued behind the
error), or calls `rollback_at_end()`, is rolled back. The connection's autocommit setting is given
back as found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psycopg
from psycopg import pq

from importwaves.db.connect import Conn

_IDLE = pq.TransactionStatus.IDLE


class PipelinedTransaction:
    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self._began = False
        self._commit_sent = False
        self._rollback = False

    def begin(self) -> None:
        """Send BEGIN: first, in the block's first pipeline (outside one it costs a round trip)."""
        if self._began:
            raise psycopg.ProgrammingError("BEGIN sent twice")
        self._conn.execute("BEGIN")
        self._began = True

    def commit(self) -> None:
        """Send COMMIT behind the statements of the current pipeline: nothing may follow it."""
        if not self._began or self._commit_sent:
            raise psycopg.ProgrammingError("COMMIT without BEGIN, or sent twice")
        self._conn.execute("COMMIT")
        self._commit_sent = True

    def rollback_at_end(self) -> None:
        """Roll back at the block's end whatever it sent (a COMMIT must not have been sent)."""
        if self._commit_sent:
            raise psycopg.ProgrammingError("COMMIT already sent")
        self._rollback = True


@contextmanager
def pipelined_transaction(conn: Conn) -> Iterator[PipelinedTransaction]:
    """See the module docstring. `conn` must be idle (no transaction open)."""
    if conn.info.transaction_status != _IDLE:
        raise psycopg.ProgrammingError("pipelined_transaction needs an idle connection")
    was = conn.autocommit
    conn.autocommit = True
    tx = PipelinedTransaction(conn)
    try:
        yield tx
        if conn.info.transaction_status != _IDLE:
            if tx._rollback:
                conn.rollback()
            else:
                conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status != _IDLE:
            with suppress(psycopg.Error):  # the block's error says more than the rollback's
                conn.rollback()
        raise
    finally:
        if not conn.closed and conn.info.transaction_status == _IDLE:
            conn.autocommit = was
