"""Bad (and barely good) ImportJob specs: one table for the engine model's unit tests and for the
API server's validation of the CRD in the e2e tests, so both are held to the same answers.

Every constrained field of the spec models appears at its bounds (accepted) and beyond them
(rejected): numbers at ge/le and one past, strings and lists at max length and one past (and
below their minimum), then wrong types, unknown fields, huge lists and hostile names (quotes, SQL
metacharacters) in the tenant, the record type names and the other name-like fields.
`tests/unit/test_spec_bounds.py` checks the table covers every constrained field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

_DELETE = object()


@dataclass(frozen=True)
class Case:
    id: str
    #: dotted path in the spec (list indexes as numbers), "" for the whole spec
    path: str
    value: Any
    ok: bool
    #: only the CRD's model has this field (database, importId)
    crd_only: bool = False
    #: the dotted field a rejection must name (default: `path`)
    names: str | None = None
    #: what the API server answers when it differs: it prunes a null and then defaults the
    #: field (the engine never sees the null)
    api_ok: bool | None = None

    @property
    def ok_for_api(self) -> bool:
        return self.ok if self.api_ok is None else self.api_ok

    @property
    def field(self) -> str:
        return self.path if self.names is None else self.names


def base_spec(tenant: str = "acme") -> dict[str, Any]:
    """A valid engine spec (the reference import)."""
    return {
        "tenant": tenant,
        "recordTypes": [
            {"name": "Customer", "recordTypeId": -2, "batchSize": 500},
            {
                "name": "SalesOrder",
                "recordTypeId": -30,
                "batchSize": 500,
                "parentTypes": ["Customer"],
            },
        ],
        "derivedTypes": [
            {
                "name": "TransactionLine",
                "recordTypeId": -13,
                "batchSize": 2500,
                "parentTypes": ["SalesOrder"],
            }
        ],
        "completionThreshold": 100,
        "parallelism": 4,
        "retries": 3,
        "staleAfterSeconds": 300,
        "suspend": False,
        "worker": {"image": "importwaves:test", "command": ["importwaves", "worker"]},
    }


def base_crd_spec(tenant: str = "acme") -> dict[str, Any]:
    """A valid ImportJob `spec` (the engine spec plus the Secret reference)."""
    return {**base_spec(tenant), "database": {"secretName": "tenant-db", "key": "dsn"}}


def apply_case(spec: dict[str, Any], case: Case) -> dict[str, Any]:
    """`spec` with the case's value put at its path."""
    out = copy.deepcopy(spec)
    if case.path == "":
        assert isinstance(case.value, dict)
        out.update(copy.deepcopy(case.value))
        return out
    *parents, last = case.path.split(".")
    node: Any = out
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if case.value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = copy.deepcopy(case.value)
    else:
        node[last] = copy.deepcopy(case.value)
    return out


# -- builders for lists at their maximum length ---------------------------------------------------
def _main(name: str, rid: int, parents: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "recordTypeId": rid, "batchSize": 10}
    if parents:
        out["parentTypes"] = parents
    return out


def record_types(n: int) -> list[dict[str, Any]]:
    """`n` main types: Customer, SalesOrder, then independent extra types."""
    base = base_spec()["recordTypes"]
    return base + [_main(f"Extra{i}", 100 + i) for i in range(n - len(base))]


def derived_types(n: int) -> list[dict[str, Any]]:
    return [
        {"name": f"Derived{i}", "recordTypeId": -100 - i, "parentTypes": ["SalesOrder"]}
        for i in range(n)
    ]


def main_with_parents(n: int) -> dict[str, Any]:
    """recordTypes whose last type has `n` parents (all listed before it)."""
    parents = [_main(f"P{i}", 200 + i) for i in range(n)]
    last = _main("SalesOrder", -30, [p["name"] for p in parents])
    return {
        "recordTypes": [*parents, last],
        "derivedTypes": [{"name": "TransactionLine", "parentTypes": ["SalesOrder"]}],
    }


def derived_with_parents(n: int) -> dict[str, Any]:
    mains = [_main(f"P{i}", 200 + i) for i in range(n)]
    return {
        "recordTypes": mains,
        "derivedTypes": [{"name": "TransactionLine", "parentTypes": [m["name"] for m in mains]}],
    }


def long_name(n: int) -> str:
    return "A" + "b" * (n - 1)


HOSTILE_TENANTS = [
    'x"; DROP SCHEMA public CASCADE; --',
    "Robert'); DROP TABLE import_jobs;--",
    "acme'",
    'acme"',
    "acme;",
    "acme--",
    "acme corp",
    "acme\n",
    "acme\x00",
    "acme$1",
    "a.b",
    "a/b",
    "Acme",
    "1acme",
    "_acme",
    "ACME",
    "acmé",
    "",
    "a" * 49,
]
HOSTILE_NAMES = [
    "O'Brien",
    'Order"s',
    "Robert'); DROP TABLE import_jobs;--",
    "Line; DELETE FROM wave_batches",
    "Line--",
    "Line Item",
    "Line\t",
    "Line%s",
    "Line%(job_id)s",
    "Línea",
    "1Line",
    "_Line",
    "",
    long_name(64),
]


def _bounds() -> list[Case]:
    c: list[Case] = []

    def num(path: str, lo: int, hi: int, crd_only: bool = False) -> None:
        c.extend(
            [
                Case(f"{path}=min", path, lo, True, crd_only),
                Case(f"{path}=max", path, hi, True, crd_only),
                Case(f"{path}=min-1", path, lo - 1, False, crd_only),
                Case(f"{path}=max+1", path, hi + 1, False, crd_only),
            ]
        )

    num("completionThreshold", 1, 100)
    num("parallelism", 1, 1000)
    num("retries", 0, 100)
    num("priority", 1, 100)
    num("staleAfterSeconds", 5, 86_400)
    num("claimTimeoutSeconds", 5, 86_400)
    num("worker.activeDeadlineSeconds", 1, 604_800)
    num("recordTypes.0.recordTypeId", -1_000_000, 1_000_000)
    num("recordTypes.0.batchSize", 1, 100_000)
    num("derivedTypes.0.recordTypeId", -1_000_000, 1_000_000)
    num("derivedTypes.0.batchSize", 1, 100_000)

    # retryBackoff: capSeconds may not be below baseSeconds, so each bound case sets both
    def backoff(case_id: str, base: float, cap: float, ok: bool) -> None:
        value = {"retryBackoff": {"baseSeconds": base, "capSeconds": cap}}
        c.append(Case(case_id, "", value, ok, names="retryBackoff"))

    backoff("retryBackoff.baseSeconds=min", 0, 0, True)
    backoff("retryBackoff.baseSeconds=max", 3600, 86_400, True)
    backoff("retryBackoff.baseSeconds=min-1", -1, 60, False)
    backoff("retryBackoff.baseSeconds=max+1", 3601, 86_400, False)
    backoff("retryBackoff.capSeconds=min", 0, 0, True)
    backoff("retryBackoff.capSeconds=max", 1, 86_400, True)
    backoff("retryBackoff.capSeconds=min-1", 0, -1, False)
    backoff("retryBackoff.capSeconds=max+1", 1, 86_401, False)
    backoff("retryBackoff.cap<base", 10, 5, False)
    backoff("retryBackoff.fractional", 0.5, 2.5, True)
    c.append(Case("parallelism=1e30", "parallelism", 10**30, False))
    c.append(Case("retries=-2^63", "retries", -(2**63), False))

    # strings: at max length, one past, below the minimum
    c += [
        Case("tenant=len48", "tenant", "a" + "b" * 47, True),
        Case("tenant=len49", "tenant", "a" + "b" * 48, False),
        Case(
            "recordTypes.0.name=len63",
            "",
            {"recordTypes": [_main(long_name(63), -2), _main("SalesOrder", -30, [long_name(63)])]},
            True,
        ),
        Case("recordTypes.0.name=len64", "recordTypes.0.name", long_name(64), False),
        Case("derivedTypes.0.name=len63", "derivedTypes.0.name", long_name(63), True),
        Case("derivedTypes.0.name=len64", "derivedTypes.0.name", long_name(64), False),
        Case(
            "parentTypes.item=len63",
            "",
            {"recordTypes": [_main(long_name(63), 1), _main("SalesOrder", -30, [long_name(63)])]},
            True,
        ),
        Case(
            "parentTypes.item=len64",
            "recordTypes.1.parentTypes",
            [long_name(64)],
            False,
            names="recordTypes.1.parentTypes.0",
        ),
        Case("worker.image=len512", "worker.image", "i" * 512, True),
        Case("worker.image=len513", "worker.image", "i" * 513, False),
        Case("worker.image=empty", "worker.image", "", False),
        Case("worker.command.item=len4096", "worker.command.0", "c" * 4096, True),
        Case("worker.command.item=len4097", "worker.command.0", "c" * 4097, False),
        Case("worker.args.item=len4096", "worker.args", ["a" * 4096], True),
        Case(
            "worker.args.item=len4097",
            "worker.args",
            ["a" * 4097],
            False,
            names="worker.args.0",
        ),
        Case("worker.serviceAccountName=len253", "worker.serviceAccountName", "s" * 253, True),
        Case("worker.serviceAccountName=len254", "worker.serviceAccountName", "s" * 254, False),
        Case("importId=len128", "importId", "i" * 128, True, crd_only=True),
        Case("importId=len129", "importId", "i" * 129, False, crd_only=True),
        Case("importId=empty", "importId", "", False, crd_only=True),
        Case("database.secretName=len253", "database.secretName", "s" * 253, True, True),
        Case("database.secretName=len254", "database.secretName", "s" * 254, False, True),
        Case("database.secretName=empty", "database.secretName", "", False, True),
        Case("database.key=len253", "database.key", "k" * 253, True, True),
        Case("database.key=len254", "database.key", "k" * 254, False, True),
        Case("database.key=empty", "database.key", "", False, True),
    ]

    # lists: at max length, one past, below the minimum
    c += [
        Case("recordTypes=len64", "recordTypes", record_types(64), True),
        Case("recordTypes=len65", "recordTypes", record_types(65), False),
        Case("recordTypes=empty", "recordTypes", [], False),
        Case("derivedTypes=len16", "derivedTypes", derived_types(16), True),
        Case("derivedTypes=len17", "derivedTypes", derived_types(17), False),
        Case("derivedTypes=empty", "derivedTypes", [], True),
        Case("recordTypes.parentTypes=len32", "", main_with_parents(32), True),
        Case(
            "recordTypes.parentTypes=len33",
            "",
            main_with_parents(33),
            False,
            names="recordTypes.33.parentTypes",
        ),
        Case("derivedTypes.parentTypes=len32", "", derived_with_parents(32), True),
        Case(
            "derivedTypes.parentTypes=len33",
            "",
            derived_with_parents(33),
            False,
            names="derivedTypes.0.parentTypes",
        ),
        Case("derivedTypes.parentTypes=empty", "derivedTypes.0.parentTypes", [], False),
        Case("worker.command=len64", "worker.command", ["c"] * 64, True),
        Case("worker.command=len65", "worker.command", ["c"] * 65, False),
        Case("worker.command=empty", "worker.command", [], False),
        Case("worker.args=len64", "worker.args", ["a"] * 64, True),
        Case("worker.args=len65", "worker.args", ["a"] * 65, False),
        Case(
            "worker.env=len128",
            "worker.env",
            [{"name": f"V{i}", "value": "x"} for i in range(128)],
            True,
        ),
        Case(
            "worker.env=len129",
            "worker.env",
            [{"name": f"V{i}", "value": "x"} for i in range(129)],
            False,
        ),
        Case(
            "worker.tolerations=len64",
            "worker.tolerations",
            [{"key": f"k{i}", "operator": "Exists"} for i in range(64)],
            True,
        ),
        Case(
            "worker.tolerations=len65",
            "worker.tolerations",
            [{"key": f"k{i}", "operator": "Exists"} for i in range(65)],
            False,
        ),
    ]
    return c


def _wrong_types() -> list[Case]:
    c = []
    for path, values in {
        "parallelism": ["4", True, 4.5, None, [4], {"n": 4}],
        "retries": ["3", False],
        "completionThreshold": ["100", 99.5],
        "staleAfterSeconds": ["300s", True],
        "suspend": ["yes", "true", 1, 0],
        "tenant": [5, ["acme"], {"name": "acme"}, None],
        "recordTypes": ["Customer", {"name": "Customer"}, None],
        "recordTypes.0": ["Customer", 1],
        "recordTypes.0.name": [1, None, ["Customer"]],
        "recordTypes.0.recordTypeId": ["-2", None, -2.5],
        "recordTypes.0.batchSize": ["500", True],
        "recordTypes.1.parentTypes": ["Customer", [1]],
        "derivedTypes": [{"name": "TransactionLine"}, "TransactionLine"],
        "derivedTypes.0.parentTypes": ["SalesOrder"],
        "worker": ["importwaves:test", ["importwaves:test"]],
        "worker.image": [1, ["a"]],
        "worker.command": ["importwaves worker", [1]],
        "worker.env": [{"name": "A"}, ["A=1"]],
        "worker.nodeSelector": [["a"], {"disk": 1}],
        "worker.resources": ["1cpu"],
        "database": ["tenant-db", None],
        "database.secretName": [1],
        "importId": [1, ["a"]],
    }.items():
        for v in values:
            c.append(
                Case(
                    f"type:{path}={v!r}"[:80],
                    path,
                    v,
                    False,
                    crd_only=path.startswith(("database", "importId")),
                    api_ok=True if v is None and path == "parallelism" else None,
                )
            )
    return c


def _unknown_and_missing() -> list[Case]:
    return [
        Case("unknown:top", "bogus", 1, False),
        Case("unknown:dsn", "dsn", "postgresql://u:p@h/db", False),
        Case("unknown:recordTypes.0", "recordTypes.0.bogus", 1, False),
        Case("unknown:derivedTypes.0", "derivedTypes.0.bogus", 1, False),
        Case("unknown:worker", "worker.bogus", 1, False),
        Case("unknown:database", "database.dsn", "postgresql://u:p@h/db", False, True),
        Case("missing:tenant", "tenant", _DELETE, False),
        Case("missing:recordTypes", "recordTypes", _DELETE, False),
        Case("missing:recordTypes.0.name", "recordTypes.0.name", _DELETE, False),
        Case("missing:recordTypes.0.recordTypeId", "recordTypes.0.recordTypeId", _DELETE, False),
        Case("missing:derivedTypes.0.parentTypes", "derivedTypes.0.parentTypes", _DELETE, False),
        Case("missing:database", "database", _DELETE, False, True),
        Case("missing:database.secretName", "database.secretName", _DELETE, False, True),
    ]


def _huge() -> list[Case]:
    return [
        Case("huge:recordTypes=10000", "recordTypes", record_types(10_000), False),
        Case("huge:derivedTypes=5000", "derivedTypes", derived_types(5000), False),
        Case("huge:worker.args=20000", "worker.args", ["a"] * 20_000, False),
        Case("huge:tenant=100k chars", "tenant", "a" * 100_000, False),
        Case("huge:recordTypes.0.name=100k chars", "recordTypes.0.name", "A" * 100_000, False),
    ]


#: Tenant names the pattern allows but PostgreSQL owns (refused by a CEL rule and spec.py).
RESERVED_TENANT_NAMES = ["public", "information_schema", "pg_catalog", "pg_toast", "pg_"]
#: Worker env entries that would override what the operator sets.
RESERVED_ENV = ["IMPORTWAVES_DSN", "IMPORTWAVES_TENANT", "IMPORTWAVES_DISPATCH_SEQ"]


def _reserved() -> list[Case]:
    c = [Case(f"reserved-tenant:{t}", "tenant", t, False) for t in RESERVED_TENANT_NAMES]
    # near misses stay allowed
    c += [Case(f"reserved-tenant-near:{t}", "tenant", t, True) for t in ("pgx", "publicx")]
    c += [
        Case(
            f"reserved-env:{n}",
            "worker.env",
            [{"name": "OK", "value": "1"}, {"name": n, "value": "postgresql://u:p@h/db"}],
            False,
        )
        for n in RESERVED_ENV
    ]
    c.append(
        Case("reserved-env-near:importwaves_dsn", "worker.env", [{"name": "importwaves_dsn"}], True)
    )
    return c


def _hostile() -> list[Case]:
    c = [Case(f"hostile-tenant:{t!r}"[:80], "tenant", t, False) for t in HOSTILE_TENANTS]
    c += [Case(f"hostile-name:{n!r}"[:80], "recordTypes.0.name", n, False) for n in HOSTILE_NAMES]
    c += [
        Case(f"hostile-derived-name:{n!r}"[:80], "derivedTypes.0.name", n, False)
        for n in HOSTILE_NAMES[:4]
    ]
    c += [
        Case(
            f"hostile-parent:{n!r}"[:80],
            "recordTypes.1.parentTypes",
            [n],
            False,
            names="recordTypes.1.parentTypes.0",
        )
        for n in HOSTILE_NAMES[:4]
    ]
    c += [
        Case("hostile-importId", "importId", "a'; DROP TABLE import_jobs;--", False, True),
        Case("hostile-secretName", "database.secretName", "db; rm -rf /", False, True),
        Case("hostile-key", "database.key", "dsn'--", False, True),
    ]
    return c


BOUNDS = _bounds()
WRONG_TYPES = _wrong_types()
UNKNOWN_AND_MISSING = _unknown_and_missing()
HUGE = _huge()
HOSTILE = _hostile()
RESERVED = _reserved()
ALL_CASES = BOUNDS + WRONG_TYPES + UNKNOWN_AND_MISSING + HUGE + HOSTILE + RESERVED
