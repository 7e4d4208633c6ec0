"""The reference worker's completion transaction on the real server: the validation query's plan
and results, and the pipelined completion (issue 12, benchmarks).

* `invalid_staging_rows` costs per batch row, whatever the size of the parent table: its plan
  for a TransactionLine batch probes `transactions` by primary key and never scans it (it was a
  hashed subplan reading the whole table once per batch: the import's total grew with its
  square). Checked on the plan the server makes for the worker's own parameters, and on the
  generic plan a prepared statement may switch to; no timing.
* Every problem kind is reported with its message, and only the rows that have one.
* The completion transaction is sent in pipeline mode: a fenced-out batch, invalid staging rows
  (which the upsert skips: it writes less than planned, and the rows are then named) and a
  write count that differs from the plan each roll everything back, on a connection that goes
  on completing batches afterwards (past psycopg's prepare threshold, as a worker that runs
  many batches does). A missing parent (the upsert fails on its foreign key) is covered through
  the whole worker in test_bad_input.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from helpers import CUSTOMER, LINE, SALES_ORDER, small_spec, stage, tenant_conn
from importwaves.db.connect import connect
from importwaves.db.queries import Q
from importwaves.engine.app import Engine
from importwaves.worker import (
    BatchDataError,
    WorkItem,
    _Fenced,
    _import_and_complete,
    import_statement,
)

pytestmark = pytest.mark.integration

#: Parent rows imported before the plans are read: enough that reading the whole table would be
#: a real cost, so a plan that does it anyway is the query's fault, not the statistics'.
PARENTS = 50_000


def _params(spec: dict[str, Any], record_type_id: int, ids: list[int]) -> dict[str, Any]:
    """The parameters the worker passes to invalid_staging_rows (worker.import_statement)."""
    _, params = import_statement(spec, record_type_id)
    parent_type = SALES_ORDER if record_type_id == LINE else None
    return {
        "job_id": "job",
        "record_type_id": record_type_id,
        "ids": ids,
        "parent_record_type_id": parent_type,
        **params,
    }


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _scans(plan: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(node type, relation, index) of every scan node."""
    return [
        (n["Node Type"], n.get("Relation Name", ""), n.get("Index Name", ""))
        for n in _nodes(plan)
        if "Relation Name" in n
    ]


def _generic(query: str) -> str:
    """A queries.sql statement with $n parameters (EXPLAIN (GENERIC_PLAN) takes no values)."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", number, query).replace("%%", "%")


@pytest.fixture
def imported_parents(dsn: str, tenant: str) -> dict[str, Any]:
    """Staged orders and lines, PARENTS customers and transactions imported, statistics fresh;
    the spec as the worker reads it."""
    stage(dsn, tenant, "job", orders=300)  # 30 customers, 300 orders (ids 1..300), their lines
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "INSERT INTO customers (id, name, imported_job) "
            "SELECT i, 'c' || i, 'job' FROM generate_series(1, %s) i",
            (PARENTS,),
        )
        conn.execute(
            "INSERT INTO transactions (id, record_type_id, customer_id, amount, payload, "
            "imported_job) SELECT i, -30, 1 + i %% 30, 1, '{}', 'job' "
            "FROM generate_series(1, %s) i",
            (PARENTS,),
        )
        conn.execute("ANALYZE")
    return small_spec(tenant).model_dump(mode="json")


@pytest.mark.parametrize(
    ("record_type_id", "parent_table"),
    [(LINE, "transactions"), (SALES_ORDER, "customers")],
    ids=["line-batch", "order-batch"],
)
def test_validation_probes_parents_by_primary_key_never_scans_them(
    dsn: str,
    tenant: str,
    imported_parents: dict[str, Any],
    record_type_id: int,
    parent_table: str,
) -> None:
    params = _params(imported_parents, record_type_id, list(range(101, 201)))
    with tenant_conn(dsn, tenant) as conn:
        custom = conn.execute(
            "EXPLAIN (FORMAT JSON) " + Q("invalid_staging_rows"), params
        ).fetchone()
        generic = conn.execute(
            "EXPLAIN (GENERIC_PLAN, FORMAT JSON) " + _generic(Q("invalid_staging_rows"))
        ).fetchone()
    assert custom is not None and generic is not None
    for row in (custom, generic):
        scans = _scans(next(iter(row.values()))[0]["Plan"])
        on_parent = [s for s in scans if s[1] == parent_table]
        assert on_parent, scans
        assert all(
            kind in ("Index Scan", "Index Only Scan") and index == f"{parent_table}_pkey"
            for kind, _, index in on_parent
        ), scans
        assert not any(
            kind == "Seq Scan" and rel in ("customers", "transactions") for kind, rel, _ in scans
        ), scans


def test_validation_names_every_problem_kind_and_only_rows_with_one(
    dsn: str, tenant: str, imported_parents: dict[str, Any]
) -> None:
    spec = imported_parents
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "UPDATE staging_records SET payload = '\"x\"' WHERE record_type_id = -2 "
            "AND record_id = 3"
        )
        conn.execute(
            'UPDATE staging_records SET payload = \'{"name": ""}\' WHERE record_type_id = -2 '
            "AND record_id = 4"
        )
        conn.execute(
            "UPDATE staging_records SET payload = payload - 'amount' "
            "WHERE record_type_id = -30 AND record_id = 10"
        )
        conn.execute(
            'UPDATE staging_records SET payload = \'{"amount": "12,5"}\' '
            "WHERE record_type_id = -30 AND record_id = 11"
        )
        conn.execute(
            "UPDATE staging_records SET parent_id = 999999 WHERE record_type_id = -30 "
            "AND record_id = 12"
        )
        # order 60_001 was never imported: its staged lines name a missing parent
        conn.execute(
            "UPDATE staging_records SET parent_id = 60001 WHERE record_type_id = -13 "
            "AND parent_id = 20"
        )
        moved = [
            r["record_id"]
            for r in conn.execute(
                "SELECT record_id FROM staging_records WHERE record_type_id = -13 "
                "AND parent_id = 60001 ORDER BY record_id"
            ).fetchall()
        ]

        def problems(record_type_id: int, ids: list[int]) -> list[tuple[int, str]]:
            rows = conn.execute(
                Q("invalid_staging_rows"), _params(spec, record_type_id, ids)
            ).fetchall()
            return [(r["record_id"], r["problem"]) for r in rows]

        assert problems(CUSTOMER, list(range(1, 31))) == [
            (3, "payload is not an object"),
            (4, "missing name"),
        ]
        assert problems(SALES_ORDER, list(range(1, 101))) == [
            (10, "missing amount"),
            (11, "amount is not a number"),
            (12, "parent customer 999999 not imported"),
        ]
        assert moved
        assert problems(LINE, [19, 20, 21, 60001]) == [
            (rid, "parent transaction 60001 not imported") for rid in moved
        ]
        assert problems(LINE, list(range(1, 11))) == []


# -- the pipelined completion ------------------------------------------------------------------
@pytest.fixture
def claimed(dsn: str, tenant: str, engine: Engine) -> dict[str, Any]:
    """A job of 30 Customer batches of one record (ids 1..30, `_batch`), every one claimed
    (dispatch 1), nothing imported yet; the spec as the worker reads it."""
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "INSERT INTO staging_records (job_id, record_type_id, record_id, payload) "
            "SELECT 'job', -2, i, jsonb_build_object('name', 'c' || i) "
            "FROM generate_series(1, 30) i"
        )
    spec = small_spec(
        tenant,
        recordTypes=[{"name": "Customer", "recordTypeId": CUSTOMER, "batchSize": 1}],
        derivedTypes=[],
    )
    assert engine.submit("job", spec)
    engine.check("job", cause="test")
    with tenant_conn(dsn, tenant) as conn:
        conn.execute(
            "UPDATE wave_batches SET status = 'processing', dispatch_seq = 1, attempts = 1, "
            "started_at = clock_timestamp() WHERE job_id = 'job'"
        )
    return spec.model_dump(mode="json")


def _batch(n: int) -> str:
    """The batch of record n (planned in id order, batch numbers from 0)."""
    return f"Customer-{n - 1:06d}"


def _complete(
    conn: psycopg.Connection[Any], dsn: str, tenant: str, spec: dict[str, Any], n: int
) -> None:
    item = WorkItem(dsn, tenant, "job", _batch(n), 1)
    key = {"job_id": "job", "batch_id": item.batch_id, "dispatch_seq": 1}
    _import_and_complete(conn, item, key, spec, {"record_type_id": CUSTOMER, "chunk_ids_json": [n]})


def _state(dsn: str, tenant: str, n: int) -> tuple[str, int | None, bool]:
    with tenant_conn(dsn, tenant) as conn:
        b = conn.execute(
            "SELECT status, rows_written, chunk_ids_json FROM wave_batches "
            "WHERE job_id = 'job' AND batch_id = %s",
            (_batch(n),),
        ).fetchone()
        c = conn.execute("SELECT 1 FROM customers WHERE id = %s", (n,)).fetchone()
    assert b is not None and b["chunk_ids_json"] == [n]
    return b["status"], b["rows_written"], c is not None


def test_pipelined_completion_rolls_back_every_refusal_and_the_connection_goes_on(
    dsn: str, tenant: str, claimed: dict[str, Any]
) -> None:
    spec = claimed
    with tenant_conn(dsn, tenant) as admin:
        # 3: invalid although the column takes it (empty name): the upsert skips it
        admin.execute(
            'UPDATE staging_records SET payload = \'{"name": ""}\' '
            "WHERE record_type_id = -2 AND record_id = 3"
        )
        # 4: no name at all (NOT NULL column): skipped as well
        admin.execute(
            "UPDATE staging_records SET payload = '{}' WHERE record_type_id = -2 AND record_id = 4"
        )
        # 5: requeued under a newer dispatch while "its worker ran"
        admin.execute(
            "UPDATE wave_batches SET dispatch_seq = 2 WHERE job_id = 'job' AND batch_id = %s",
            (_batch(5),),
        )
        # 6: no staging row any more: the upsert writes 0 of 1 planned rows
        admin.execute("DELETE FROM staging_records WHERE record_type_id = -2 AND record_id = 6")
    with connect(dsn, tenant, autocommit=True) as conn:
        for n in range(1, 31):  # past the prepare threshold, refusals in between
            if n == 3:
                with pytest.raises(BatchDataError, match="record 3: missing name"):
                    _complete(conn, dsn, tenant, spec, n)
            elif n == 4:
                with pytest.raises(BatchDataError, match="record 4: missing name"):
                    _complete(conn, dsn, tenant, spec, n)
            elif n == 5:
                with pytest.raises(_Fenced, match="requeued"):
                    _complete(conn, dsn, tenant, spec, n)
            elif n == 6:
                with pytest.raises(BatchDataError, match="wrote 0 row"):
                    _complete(conn, dsn, tenant, spec, n)
            else:
                _complete(conn, dsn, tenant, spec, n)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        for n in (3, 4, 5, 6):
            assert _state(dsn, tenant, n) == ("processing", None, False), n
        for n in (1, 2, 7, 29, 30):
            assert _state(dsn, tenant, n) == ("completed", 1, True), n
        # a completion delivered twice changes nothing the second time: fenced, rolled back
        with pytest.raises(_Fenced):
            _complete(conn, dsn, tenant, spec, 7)
        assert _state(dsn, tenant, 7) == ("completed", 1, True)


def test_a_completion_that_fails_in_the_second_round_trip_commits_nothing(
    dsn: str, tenant: str, claimed: dict[str, Any]
) -> None:
    """The COMMIT travels with the completion statement (round trip 2): when that statement
    fails, the COMMIT queued behind it is not run and the upsert of round trip 1 is rolled
    back. The failure here is a trigger refusing batch 8's completion, after its upsert."""
    with tenant_conn(dsn, tenant) as admin:
        admin.execute(
            "CREATE FUNCTION refuse_completion() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'completion refused by the test'; END $$"
        )
        admin.execute(
            "CREATE TRIGGER refuse_completion BEFORE UPDATE ON wave_batches FOR EACH ROW "
            f"WHEN (NEW.status = 'completed' AND NEW.batch_id = '{_batch(8)}') "
            "EXECUTE FUNCTION refuse_completion()"
        )
    with connect(dsn, tenant, autocommit=True) as conn:
        _complete(conn, dsn, tenant, claimed, 7)
        with pytest.raises(psycopg.errors.RaiseException, match="refused by the test"):
            _complete(conn, dsn, tenant, claimed, 8)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        _complete(conn, dsn, tenant, claimed, 9)
    assert _state(dsn, tenant, 7) == ("completed", 1, True)
    assert _state(dsn, tenant, 8) == ("processing", None, False)
    assert _state(dsn, tenant, 9) == ("completed", 1, True)


def test_completion_refuses_a_connection_in_a_transaction(
    dsn: str, tenant: str, claimed: dict[str, Any]
) -> None:
    with (
        connect(dsn, tenant, autocommit=False) as conn,
        pytest.raises(ValueError, match="autocommit"),
    ):
        _complete(conn, dsn, tenant, claimed, 1)
    assert _state(dsn, tenant, 1) == ("processing", None, False)
