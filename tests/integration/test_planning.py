"""Planning facts: main and derived batch rows cover every staged record exactly once, with the
configured batch sizes, whatever the sizes."""

from __future__ import annotations

import pytest

from helpers import (
    CUSTOMER,
    LINE,
    SALES_ORDER,
    drive,
    expected_batches,
    lines_of,
    rows_by_type,
    setup_job,
    tenant_conn,
)

pytestmark = pytest.mark.integration


def chunks(dsn: str, tenant: str, record_type_id: int) -> list[tuple[str, list[int], int]]:
    with tenant_conn(dsn, tenant) as conn:
        rows = conn.execute(
            "SELECT batch_id, chunk_ids_json, record_count FROM wave_batches "
            "WHERE job_id = 'job' AND record_type_id = %s ORDER BY id",
            (record_type_id,),
        ).fetchall()
    return [(r["batch_id"], [int(x) for x in r["chunk_ids_json"]], r["record_count"]) for r in rows]


@pytest.mark.parametrize(
    ("parent_size", "line_size"),
    [(100, 250), (100, 1), (70, 33), (1000, 5000)],
)
def test_batches_cover_every_record_once_with_the_configured_sizes(
    engine, dsn, tenant, redis_url, parent_size: int, line_size: int
) -> None:
    ds, spec = setup_job(
        engine,
        "job",
        orders=600,
        recordTypes=[
            {"name": "Customer", "recordTypeId": CUSTOMER, "batchSize": 25},
            {
                "name": "SalesOrder",
                "recordTypeId": SALES_ORDER,
                "batchSize": parent_size,
                "parentTypes": ["Customer"],
            },
        ],
        derivedTypes=[
            {
                "name": "TransactionLine",
                "recordTypeId": LINE,
                "batchSize": line_size,
                "parentTypes": ["SalesOrder"],
            }
        ],
    )
    drive(engine, dsn, tenant, "job", run_if=lambda b: b.record_type_id != LINE)
    assert dict(rows_by_type(dsn, tenant, "job")) == expected_batches(ds, spec)

    orders = chunks(dsn, tenant, SALES_ORDER)
    assert sorted(i for _, ids, _ in orders for i in ids) == list(range(1, ds.orders + 1))
    assert all(len(ids) == n <= parent_size for _, ids, n in orders)
    assert sum(len(ids) == parent_size for _, ids, _ in orders) == ds.orders // parent_size

    lines = chunks(dsn, tenant, LINE)
    parents = [i for _, ids, _ in lines for i in ids]
    assert sorted(parents) == list(range(1, ds.orders + 1))  # every order's lines, once
    assert sum(n for *_, n in lines) == ds.lines
    for _, ids, n in lines:
        assert n == sum(lines_of(i) for i in ids)
        # a parent's lines are never split, so a batch exceeds the size by less than one parent
        assert n - max(lines_of(i) for i in ids) < line_size


def test_derived_batch_ids_do_not_collide_in_a_wide_parent_batch(
    engine, dsn, tenant, redis_url
) -> None:
    """One parent batch holding more than 10,000 lines, cut into derived batches of one
    parent each: every derived batch must get its own id (a colliding id is dropped by the
    idempotent upsert, and its lines would silently never be imported)."""
    ds, spec = setup_job(
        engine,
        "job",
        orders=2100,
        recordTypes=[
            {"name": "Customer", "recordTypeId": CUSTOMER, "batchSize": 1000},
            {
                "name": "SalesOrder",
                "recordTypeId": SALES_ORDER,
                "batchSize": 5000,
                "parentTypes": ["Customer"],
            },
        ],
        derivedTypes=[
            {
                "name": "TransactionLine",
                "recordTypeId": LINE,
                "batchSize": 1,
                "parentTypes": ["SalesOrder"],
            }
        ],
    )
    assert ds.lines > 10_000
    drive(engine, dsn, tenant, "job", run_if=lambda b: b.record_type_id != LINE)
    lines = chunks(dsn, tenant, LINE)
    assert len(lines) == ds.orders == expected_batches(ds, spec)[LINE]
    assert sum(n for *_, n in lines) == ds.lines
    assert len({b for b, _, _ in lines}) == len(lines)
