"""Generate a tenant's staging data for the reference import (server-side, fast).

Customers (-2) <- SalesOrders (-30) <- TransactionLines (-13): order i has 1 + (7i mod 9) lines,
so 20,000 orders give 100,004 lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg

from importwaves.spec import DERIVED_RECORD_TYPE_ID, ImportSpec

CUSTOMER = -2
SALES_ORDER = -30

_CUSTOMERS: LiteralString = """
INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload)
SELECT %(job_id)s, -2, i, NULL, jsonb_build_object('name', 'Customer ' || i)
FROM generate_series(1, %(customers)s) AS i
ON CONFLICT DO NOTHING"""

_ORDERS: LiteralString = """
INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload)
SELECT %(job_id)s, -30, i, ((i - 1) %% %(customers)s) + 1,
       jsonb_build_object('amount', to_char((i %% 997) * 3.17, 'FM9999990.00'),
                          'number', 'SO-' || i)
FROM generate_series(1, %(orders)s) AS i
ON CONFLICT DO NOTHING"""

_LINES: LiteralString = """
INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload)
SELECT %(job_id)s, -13, row_number() OVER (ORDER BY o, l), o,
       jsonb_build_object('amount', to_char(l * 1.25, 'FM9999990.00'), 'line', l)
FROM generate_series(1, %(orders)s) AS o,
     LATERAL generate_series(1, 1 + (7 * o) %% 9) AS l
ON CONFLICT DO NOTHING"""


@dataclass(frozen=True)
class DataSet:
    customers: int
    orders: int
    lines: int


def generate(
    conn: psycopg.Connection[Any],
    job_id: str,
    *,
    orders: int = 20_000,
    customers: int | None = None,
) -> DataSet:
    customers = customers or max(1, orders // 10)
    params = {"job_id": job_id, "customers": customers, "orders": orders}
    with conn.transaction():
        conn.execute(_CUSTOMERS, params)
        conn.execute(_ORDERS, params)
        conn.execute(_LINES, params)
        row = conn.execute(
            "SELECT count(*) FROM staging_records WHERE job_id = %s AND record_type_id = -13",
            (job_id,),
        ).fetchone()
    lines = int(next(iter(row.values())) if isinstance(row, dict) else row[0])  # type: ignore[index]
    return DataSet(customers, orders, lines)


def reference_spec(tenant: str, **overrides: Any) -> ImportSpec:
    """The spec the demo data satisfies: customers, then sales orders, then derived lines."""
    data: dict[str, Any] = {
        "tenant": tenant,
        "recordTypes": [
            {"name": "Customer", "recordTypeId": CUSTOMER, "batchSize": 500},
            {
                "name": "SalesOrder",
                "recordTypeId": SALES_ORDER,
                "batchSize": 500,
                "parentTypes": ["Customer"],
            },
        ],
        "derivedTypes": [
            {
                "name": "TransactionLine",
                "recordTypeId": DERIVED_RECORD_TYPE_ID,
                "batchSize": 2500,
                "parentTypes": ["SalesOrder"],
            },
        ],
        "parallelism": 4,
    }
    data.update(overrides)
    return ImportSpec.model_validate(data)
