"""spec_change_problems: which spec changes a running import accepts."""

from __future__ import annotations

from typing import Any

import pytest

from importwaves.engine.jobs import MUTABLE_FIELDS, SpecChangeRefused, spec_change_problems
from importwaves.spec import ImportSpec, WorkerPod


def spec(**overrides: Any) -> ImportSpec:
    data: dict[str, Any] = {
        "tenant": "acme",
        "recordTypes": [
            {"name": "Customer", "recordTypeId": -2, "batchSize": 500},
            {"name": "SalesOrder", "recordTypeId": -30, "parentTypes": ["Customer"]},
        ],
        "derivedTypes": [{"name": "TransactionLine", "parentTypes": ["SalesOrder"]}],
    }
    data.update(overrides)
    return ImportSpec.model_validate(data)


def test_mutable_fields_are_spec_fields() -> None:
    assert set(ImportSpec.model_fields) >= MUTABLE_FIELDS


@pytest.mark.parametrize(
    "change",
    [
        {"parallelism": 9},
        {"retries": 0},
        {"staleAfterSeconds": 60},
        {"suspend": True},
        {"completionThreshold": 50},
        {"worker": WorkerPod(image="other:1").model_dump()},
        {"parallelism": 1, "suspend": True, "retries": 7},
    ],
)
@pytest.mark.parametrize("planned", [True, False])
def test_runtime_fields_may_change(change: dict[str, Any], planned: bool) -> None:
    assert spec_change_problems(spec(), spec(**change), planned=planned) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {
                "recordTypes": [
                    {"name": "Customer", "recordTypeId": -2, "batchSize": 10},
                    {"name": "SalesOrder", "recordTypeId": -30, "parentTypes": ["Customer"]},
                ]
            },
            "recordTypes",
        ),
        ({"derivedTypes": []}, "derivedTypes"),
        ({"tenant": "other"}, "tenant"),
    ],
)
def test_plan_shaping_fields_are_refused_once_planned(change: dict[str, Any], field: str) -> None:
    problems = spec_change_problems(spec(), spec(**change), planned=True)
    assert len(problems) == 1
    assert problems[0].startswith(f"{field} cannot change once the import is planned")


def test_before_planning_only_the_tenant_is_fixed() -> None:
    new = spec(
        derivedTypes=[], recordTypes=[{"name": "Customer", "recordTypeId": -2}], parallelism=1
    )
    assert spec_change_problems(spec(), new, planned=False) == []
    problems = spec_change_problems(spec(), spec(tenant="other"), planned=False)
    assert problems == ["tenant cannot change (was 'acme', now 'other')"]


def test_every_refused_field_is_listed() -> None:
    new = spec(tenant="other", derivedTypes=[], parallelism=2)
    problems = spec_change_problems(spec(), new, planned=True)
    assert sorted(p.split(" ")[0] for p in problems) == ["derivedTypes", "tenant"]
    err = SpecChangeRefused(problems)
    assert err.problems == problems
    assert str(err).startswith("spec change refused: ")


def test_identical_spec_has_no_problems() -> None:
    assert spec_change_problems(spec(), spec(), planned=True) == []
