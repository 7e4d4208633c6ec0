"""A coordinator run's transaction on real PostgreSQL: BEGIN travels with the job lock and the
snapshot, COMMIT with the dispatches (`db/pipelined.py`); the listener's exit check, sent in that
first round trip with the spec of the job's last run, is redone when the spec changed since.

Round trips are counted in a libpq trace of the run's connection: each client Sync is one.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import batches, launched, setup_job, small_spec, tenant_conn
from importwaves.db.connect import Conn
from importwaves.db.pipelined import pipelined_transaction

pytestmark = pytest.mark.integration


class _TracedPool:
    """The coordinator's pool, with a libpq trace of every connection it lends."""

    def __init__(self, pool: Any, path: Path) -> None:
        self._pool = pool
        self.path = path

    @contextmanager
    def connection(self, *args: Any, **kwargs: Any) -> Iterator[Conn]:
        with self._pool.connection(*args, **kwargs) as conn, open(self.path, "a") as f:
            conn.pgconn.trace(f.fileno())
            conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                yield conn
            finally:
                conn.pgconn.untrace()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def round_trips(self) -> list[list[str]]:
        """The statements the client executed (the first line of each), grouped by the Sync
        that ended each group. A Parse names its statement ("" unnamed, or psycopg's prepared
        name); a Bind says which statement it runs; an Execute runs it."""
        groups: list[list[str]] = [[]]
        texts: dict[str, str] = {}
        bound = ""
        for line in self.path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 3 or parts[0] != "F":
                continue  # a reply, or a continuation line of a multi-line query
            msg, payload = parts[2], (parts[3] if len(parts) > 3 else "")
            if msg == "Sync":
                groups.append([])
            elif msg == "Parse":
                m = re.match(r'\s*"([^"]*)" "([^"]*)', payload)
                assert m is not None, line
                texts[m.group(1)] = " ".join(m.group(2).split())
            elif msg == "Bind":
                m = re.match(r'\s*"[^"]*" "([^"]*)"', payload)
                assert m is not None, line
                bound = texts[m.group(1)]
            elif msg == "Execute":
                groups[-1].append(bound)
            elif msg == "Query":
                groups[-1].append(payload.strip().strip('"'))
                groups.append([])
        return [g for g in groups if g]

    def reset(self) -> None:
        self.path.write_text("")


@pytest.fixture
def traced(engine: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[_TracedPool]:
    with tempfile.TemporaryDirectory() as d:
        pool = _TracedPool(engine.coordinator.pool, Path(d) / "trace.txt")
        pool.reset()
        monkeypatch.setattr(engine.coordinator, "pool", pool)
        yield pool


def test_a_dispatching_run_takes_two_round_trips(engine: Any, traced: _TracedPool) -> None:
    setup_job(engine, "job")
    engine.check("job")  # plans the job (planning has its own round trips) and dispatches
    b = launched(engine)[0]
    traced.reset()
    # a worker exits without completing its batch: the run counts the failed attempt, reads
    # the batch and the snapshot, and dispatches the batch again (no back-off)
    result = engine.listener.on_worker_exited_ok("job", b.batch_id, b.dispatch_seq)
    assert result.dispatched, "the failed attempt's batch (no back-off) is dispatched again"
    trips = traced.round_trips()
    assert len(trips) == 2, trips
    first, last = trips
    # BEGIN, the job lock, the exit check, the batch's read, the snapshot
    assert first[0] == "BEGIN" and len(first) == 5 and "COMMIT" not in first, first
    assert last[-1] == "COMMIT" and "BEGIN" not in last, last


def test_a_run_with_nothing_to_do_takes_two_round_trips(engine: Any, traced: _TracedPool) -> None:
    setup_job(engine, "job")
    engine.check("job")
    traced.reset()
    result = engine.check("job")
    assert not result.dispatched  # every slot is taken
    trips = traced.round_trips()
    assert len(trips) == 2, trips
    assert trips[0][0] == "BEGIN" and trips[-1][-1] == "COMMIT", trips


def test_an_exit_check_uses_the_spec_the_job_has_now(
    engine: Any, dsn: str, tenant: str, traced: _TracedPool
) -> None:
    # The job's last run saw retries 0 (one attempt). The spec then allows two retries; a
    # worker exits without completing: the attempt it failed is not its last.
    setup_job(engine, "job", retries=0)
    engine.check("job")
    b = launched(engine)[0]
    assert engine.submit("job", small_spec(tenant, retries=2)) is False
    traced.reset()
    engine.listener.on_worker_exited_ok("job", b.batch_id, b.dispatch_seq)
    row = next(r for r in batches(dsn, tenant, "job") if r["batch_id"] == b.batch_id)
    assert row["attempts"] == 1
    assert row["status"] in ("pending", "dispatched"), row  # dispatched again at once
    # the guess (sent with retries 0) was rolled back and the run redone with the new spec
    assert sum(1 for t in traced.round_trips() if t and t[0] == "BEGIN") == 2


def test_an_exit_check_of_a_cancelled_job_is_rolled_back(
    engine: Any, dsn: str, tenant: str
) -> None:
    setup_job(engine, "job", retries=0)
    engine.check("job")
    b = launched(engine)[0]
    assert b.batch_id in (engine.cancel("job", "deleted") or [])
    # Cancelling released the batch; put it back in the exited worker's hands, so an exit check
    # run on the cancelled job would count a failed attempt (with retries 0: fail the batch).
    with tenant_conn(dsn, tenant) as c:
        c.execute(
            "UPDATE wave_batches SET status = 'dispatched', dispatch_seq = %s "
            "WHERE job_id = 'job' AND batch_id = %s",
            (b.dispatch_seq, b.batch_id),
        )
    before = next(r for r in batches(dsn, tenant, "job") if r["batch_id"] == b.batch_id)
    assert before["status"] == "dispatched"
    result = engine.listener.on_worker_exited_ok("job", b.batch_id, b.dispatch_seq)
    after = next(r for r in batches(dsn, tenant, "job") if r["batch_id"] == b.batch_id)
    assert not result.dispatched
    assert (after["status"], after["attempts"]) == (before["status"], before["attempts"])


# -- pipelined_transaction itself ------------------------------------------------------------


@pytest.fixture
def conn(dsn: str, tenant: str) -> Iterator[Conn]:
    with tenant_conn(dsn, tenant) as c:
        c.autocommit = False
        c.execute("CREATE TABLE IF NOT EXISTS pt_probe (k int PRIMARY KEY)")
        c.execute("TRUNCATE pt_probe")
        c.commit()
        yield c


def _keys(c: Conn) -> list[int]:
    rows = c.execute("SELECT k FROM pt_probe ORDER BY k").fetchall()
    c.commit()
    return [r["k"] for r in rows]


def test_statements_and_commit_in_one_pipeline_commit(conn: Conn) -> None:
    with pipelined_transaction(conn) as tx:
        with conn.pipeline():
            tx.begin()
            conn.execute("INSERT INTO pt_probe VALUES (1)")
        conn.execute("INSERT INTO pt_probe VALUES (2)")
        with conn.pipeline():
            conn.execute("INSERT INTO pt_probe VALUES (3)")
            tx.commit()
    assert conn.autocommit is False
    assert _keys(conn) == [1, 2, 3]


def test_a_failing_statement_skips_the_commit_behind_it(conn: Conn) -> None:
    with (
        pytest.raises(psycopg.errors.UniqueViolation),
        pipelined_transaction(conn) as tx,
        conn.pipeline(),
    ):
        tx.begin()
        conn.execute("INSERT INTO pt_probe VALUES (1)")
        conn.execute("INSERT INTO pt_probe VALUES (1)")
        tx.commit()
    assert conn.autocommit is False
    assert _keys(conn) == []


def test_a_block_without_commit_commits_at_its_end_unless_told_to_roll_back(conn: Conn) -> None:
    with pipelined_transaction(conn) as tx, conn.pipeline():
        tx.begin()
        conn.execute("INSERT INTO pt_probe VALUES (1)")
    with pipelined_transaction(conn) as tx:
        with conn.pipeline():
            tx.begin()
            conn.execute("INSERT INTO pt_probe VALUES (2)")
        tx.rollback_at_end()
    assert _keys(conn) == [1]


def test_a_block_that_raises_rolls_back(conn: Conn) -> None:
    with pytest.raises(RuntimeError, match="in the block"), pipelined_transaction(conn) as tx:
        with conn.pipeline():
            tx.begin()
            conn.execute("INSERT INTO pt_probe VALUES (1)")
        raise RuntimeError("in the block")
    assert conn.autocommit is False
    assert _keys(conn) == []


def test_it_refuses_a_connection_in_a_transaction(conn: Conn) -> None:
    conn.execute("SELECT 1")
    with pytest.raises(psycopg.ProgrammingError, match="idle"), pipelined_transaction(conn):
        pass
    conn.rollback()


def test_a_run_whose_writes_fail_commits_nothing(engine: Any, dsn: str, tenant: str) -> None:
    # The first run plans the job (its own round trips) and sends its first dispatch, the prompt
    # and the COMMIT in one round trip; the dispatch (its CTE stamps the job's dispatch lag) is
    # refused: the COMMIT queued behind it is skipped and the planning rolls back with it.
    with tenant_conn(dsn, tenant) as c:
        c.execute(
            "CREATE FUNCTION refuse_lag() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused: dispatch lag'; END $$"
        )
        c.execute(
            "CREATE TRIGGER refuse_lag BEFORE UPDATE ON import_jobs FOR EACH ROW "
            "WHEN (NEW.last_dispatch_lag_seconds IS DISTINCT FROM OLD.last_dispatch_lag_seconds) "
            "EXECUTE FUNCTION refuse_lag()"
        )
    setup_job(engine, "job")
    with pytest.raises(psycopg.errors.RaiseException, match="refused: dispatch lag"):
        engine.check("job")
    assert not launched(engine)
    with tenant_conn(dsn, tenant) as c:
        job = c.execute("SELECT planned_at FROM import_jobs WHERE job_id = 'job'").fetchone()
        assert job == {"planned_at": None}
        assert c.execute("SELECT count(*) AS n FROM wave_batches").fetchone() == {"n": 0}
        c.execute("DROP TRIGGER refuse_lag ON import_jobs")
    # the engine's connection went back to its pool usable: the next run does it all
    result = engine.check("job")
    assert result.dispatched and launched(engine)
    with tenant_conn(dsn, tenant) as c:
        n = c.execute("SELECT count(*) AS n FROM wave_batches WHERE status = 'dispatched'")
        assert n.fetchone() == {"n": len(result.dispatched)}
