"""Import spec validation: every bad spec fails with a SpecError naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from importwaves.spec import DERIVED_RECORD_TYPE_ID, ImportSpec, SpecError, parse_spec


def good() -> dict[str, Any]:
    return {
        "tenant": "acme",
        "recordTypes": [
            {"name": "Customer", "recordTypeId": -2, "batchSize": 500},
            {
                "name": "SalesOrder",
                "recordTypeId": -30,
                "batchSize": 500,
                "parentTypes": ["Customer"],
            },
        ],
        "derivedTypes": [{"name": "TransactionLine", "parentTypes": ["SalesOrder"]}],
    }


def with_(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(good())
    *parents, last = path.split(".")
    node: Any = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_good_spec_and_defaults() -> None:
    spec = parse_spec(good())
    assert spec.completionThreshold == 100
    assert spec.parallelism == 4
    assert spec.retries == 3 and spec.max_attempts == 4
    assert spec.staleAfterSeconds == 300
    assert spec.suspend is False
    assert spec.derivedTypes[0].recordTypeId == DERIVED_RECORD_TYPE_ID == -13
    assert spec.derivedTypes[0].batchSize == 2000
    assert spec.parent_ids_of(spec.derivedTypes[0]) == [-30]
    assert spec.derived_parent_type_ids() == {-30}
    assert spec.main_type("Customer").recordTypeId == -2
    with pytest.raises(KeyError):
        spec.main_type("Nope")


def test_spec_round_trips_through_json() -> None:
    spec = parse_spec(good())
    assert ImportSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_spec_is_frozen() -> None:
    spec = parse_spec(good())
    with pytest.raises(ValidationError):
        spec.parallelism = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        # unknown parent type, in a derived type and in a main type
        (
            with_("derivedTypes.0.parentTypes", ["Invoice"]),
            "derivedTypes.0.parentTypes",
            "unknown parent type 'Invoice'",
        ),
        (
            with_("recordTypes.1.parentTypes", ["Vendor"]),
            "recordTypes.1.parentTypes",
            "unknown parent type 'Vendor'",
        ),
        # zero and negative batch sizes
        (with_("recordTypes.0.batchSize", 0), "recordTypes.0.batchSize", "greater than or equal"),
        (with_("recordTypes.1.batchSize", -5), "recordTypes.1.batchSize", "greater than or equal"),
        (with_("derivedTypes.0.batchSize", 0), "derivedTypes.0.batchSize", "greater than or equal"),
        (with_("recordTypes.0.batchSize", 100_001), "recordTypes.0.batchSize", "less than"),
        # threshold outside 1..100
        (with_("completionThreshold", 0), "completionThreshold", "greater than or equal to 1"),
        (with_("completionThreshold", 101), "completionThreshold", "less than or equal to 100"),
        (with_("completionThreshold", -1), "completionThreshold", "greater than or equal to 1"),
        # other bounds
        (with_("parallelism", 0), "parallelism", "greater than or equal to 1"),
        (with_("retries", -1), "retries", "greater than or equal to 0"),
        (with_("staleAfterSeconds", 4), "staleAfterSeconds", "greater than or equal to 5"),
        (with_("tenant", "Acme-Corp"), "tenant", "pattern"),
        (with_("tenant", "a" * 49), "tenant", "pattern"),
        (with_("recordTypes.0.name", "1abc"), "recordTypes.0.name", "pattern"),
        (with_("recordTypes", []), "recordTypes", "at least 1"),
        (with_("derivedTypes.0.parentTypes", []), "derivedTypes.0.parentTypes", "at least 1"),
        (with_("bogus", 1), "bogus", "Extra inputs are not permitted"),
        (with_("recordTypes.0.bogus", 1), "recordTypes.0.bogus", "Extra inputs"),
        # duplicates and order
        (
            with_("recordTypes.1.name", "Customer"),
            "recordTypes.1.name",
            "duplicate record type name 'Customer'",
        ),
        (
            with_("recordTypes.1.recordTypeId", -2),
            "recordTypes.1.recordTypeId",
            "duplicate record type id -2",
        ),
        (
            with_("derivedTypes.0.recordTypeId", -30),
            "derivedTypes.0.recordTypeId",
            "duplicate record type id -30",
        ),
        (
            with_(
                "recordTypes",
                [
                    {"name": "SalesOrder", "recordTypeId": -30, "parentTypes": ["Customer"]},
                    {"name": "Customer", "recordTypeId": -2},
                ],
            ),
            "recordTypes.0.parentTypes",
            "list record types parent-first",
        ),
    ],
)
def test_invalid_spec_names_the_field(data: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    err = info.value
    assert str(err).startswith("invalid import spec: ")
    matching = [p for p in err.problems if p.startswith(field + ":")]
    assert matching, err.problems
    assert any(words in p for p in matching), err.problems


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        ({"A": ["B"], "B": ["A"]}, "A -> B -> A"),
        ({"A": ["A"]}, "A -> A"),
        ({"A": [], "B": ["C"], "C": ["D"], "D": ["B"]}, "B -> C -> D -> B"),
    ],
)
def test_dependency_cycle_is_named(edges: dict[str, list[str]], cycle: str) -> None:
    data = good()
    data["recordTypes"] = [
        {"name": n, "recordTypeId": -100 - i, "parentTypes": ps}
        for i, (n, ps) in enumerate(edges.items())
    ]
    data["derivedTypes"] = []
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert info.value.problems == [f"recordTypes.parentTypes: dependency cycle {cycle}"]


def test_several_problems_are_all_reported() -> None:
    data = with_("completionThreshold", 0)
    data["parallelism"] = 0
    data["recordTypes"][0]["batchSize"] = 0
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    fields = sorted(p.split(":")[0] for p in info.value.problems)
    assert fields == ["completionThreshold", "parallelism", "recordTypes.0.batchSize"]


def test_wrong_type_names_the_field() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(with_("parallelism", "many"))
    assert info.value.problems[0].startswith("parallelism:")


def test_boundaries_are_accepted() -> None:
    data = good()
    data.update(completionThreshold=1, parallelism=1, retries=0, staleAfterSeconds=5)
    data["recordTypes"][0]["batchSize"] = 1
    spec = parse_spec(data)
    assert (spec.completionThreshold, spec.max_attempts, spec.staleAfterSeconds) == (1, 1, 5)
    assert parse_spec(with_("completionThreshold", 100)).completionThreshold == 100


def test_derived_with_several_parents() -> None:
    data = good()
    data["derivedTypes"][0]["parentTypes"] = ["Customer", "SalesOrder"]
    spec = parse_spec(data)
    assert spec.parent_ids_of(spec.derivedTypes[0]) == [-2, -30]
    assert spec.derived_parent_type_ids() == {-2, -30}
