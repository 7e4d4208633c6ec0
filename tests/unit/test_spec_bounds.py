"""Bad input, engine side: every ImportJob spec field at and beyond its bounds, wrong types,
unknown and missing fields, huge lists, hostile names (tests/spec_cases.py, the same table the
e2e tests send to the API server). Rejections are SpecErrors naming the field; acceptances
round-trip. A hypothesis fuzz puts arbitrary JSON anywhere in a spec: the answer is a valid spec
or a SpecError, never another exception."""

from __future__ import annotations

import time
from typing import Any

import pytest
from annotated_types import Ge, Le, MaxLen, MinLen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from importwaves.engine.planner import wave_plan
from importwaves.k8s.crd import DatabaseRef, ImportJobSpec
from importwaves.spec import (
    DerivedType,
    ImportSpec,
    RecordType,
    RetryBackoff,
    SpecError,
    WorkerPod,
    parse_spec,
)
from spec_cases import (
    ALL_CASES,
    BOUNDS,
    HOSTILE_NAMES,
    HOSTILE_TENANTS,
    HUGE,
    Case,
    apply_case,
    base_crd_spec,
    base_spec,
)


def problems_of(exc: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    ]


def names_field(problems: list[str], field: str) -> bool:
    """Some problem line is about `field` (the dotted path, or a deeper one under it)."""
    return any(
        p.startswith((f"{field}:", f"{field}.")) or p.startswith(f": {field}:") for p in problems
    )


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_spec_case(case: Case) -> None:
    t0 = time.perf_counter()
    if not case.crd_only:
        data = apply_case(base_spec(), case)
        if case.ok:
            spec = parse_spec(data)
            assert ImportSpec.model_validate(spec.model_dump(mode="json")) == spec
            assert wave_plan(spec)
        else:
            with pytest.raises(SpecError) as info:
                parse_spec(data)
            assert names_field(info.value.problems, case.field), info.value.problems
    crd = apply_case(base_crd_spec(), case)
    if case.ok:
        ij = ImportJobSpec.model_validate(crd)
        assert ij.engine_spec().tenant == ij.tenant
    else:
        with pytest.raises(ValidationError) as err:
            ImportJobSpec.model_validate(crd)
        assert names_field(problems_of(err.value), case.field), problems_of(err.value)
    assert time.perf_counter() - t0 < 2.0, "validation took too long"


# -- the table covers every constrained field ----------------------------------------------------
#: (model, field) -> the case-id prefix of its bound cases in spec_cases.BOUNDS
FIELD_CASES = {
    ("ImportSpec", "tenant"): "tenant=",
    ("ImportSpec", "recordTypes"): "recordTypes=",
    ("ImportSpec", "derivedTypes"): "derivedTypes=",
    ("ImportSpec", "completionThreshold"): "completionThreshold=",
    ("ImportSpec", "parallelism"): "parallelism=",
    ("ImportSpec", "retries"): "retries=",
    ("ImportSpec", "priority"): "priority=",
    ("ImportSpec", "staleAfterSeconds"): "staleAfterSeconds=",
    ("ImportSpec", "claimTimeoutSeconds"): "claimTimeoutSeconds=",
    ("RecordType", "name"): "recordTypes.0.name=",
    ("RecordType", "recordTypeId"): "recordTypes.0.recordTypeId=",
    ("RecordType", "batchSize"): "recordTypes.0.batchSize=",
    ("RecordType", "parentTypes"): "recordTypes.parentTypes=",
    ("DerivedType", "name"): "derivedTypes.0.name=",
    ("DerivedType", "recordTypeId"): "derivedTypes.0.recordTypeId=",
    ("DerivedType", "batchSize"): "derivedTypes.0.batchSize=",
    ("DerivedType", "parentTypes"): "derivedTypes.parentTypes=",
    ("WorkerPod", "image"): "worker.image=",
    ("WorkerPod", "command"): "worker.command=",
    ("WorkerPod", "args"): "worker.args=",
    ("WorkerPod", "env"): "worker.env=",
    ("WorkerPod", "serviceAccountName"): "worker.serviceAccountName=",
    ("WorkerPod", "tolerations"): "worker.tolerations=",
    ("WorkerPod", "activeDeadlineSeconds"): "worker.activeDeadlineSeconds=",
    ("ImportJobSpec", "importId"): "importId=",
    ("DatabaseRef", "secretName"): "database.secretName=",
    ("DatabaseRef", "key"): "database.key=",
    ("RetryBackoff", "baseSeconds"): "retryBackoff.baseSeconds=",
    ("RetryBackoff", "capSeconds"): "retryBackoff.capSeconds=",
}
MODELS: list[type[BaseModel]] = [
    ImportSpec,
    RecordType,
    DerivedType,
    WorkerPod,
    ImportJobSpec,
    DatabaseRef,
    RetryBackoff,
]


def constrained_fields() -> set[tuple[str, str]]:
    out = set()
    for model in MODELS:
        for name, info in model.model_fields.items():
            if model is ImportJobSpec and name in ImportSpec.model_fields:
                continue
            meta = info.metadata
            if any(isinstance(m, Ge | Le | MinLen | MaxLen) for m in meta) or any(
                getattr(m, "pattern", None) for m in meta
            ):
                out.add((model.__name__, name))
    return out


def test_every_constrained_field_has_cases_at_and_beyond_its_bounds() -> None:
    fields = constrained_fields()
    assert fields == set(FIELD_CASES), (
        f"without bound cases: {sorted(fields - set(FIELD_CASES))}; "
        f"gone from the models: {sorted(set(FIELD_CASES) - fields)}"
    )
    for key, prefix in FIELD_CASES.items():
        mine = [c for c in BOUNDS if c.id.startswith(prefix)]
        assert any(c.ok for c in mine), f"{key}: no case at a bound"
        assert any(not c.ok for c in mine), f"{key}: no case beyond a bound"


def test_hostile_names_and_huge_lists_are_all_in_the_table() -> None:
    ids = {c.id for c in ALL_CASES}
    assert len(ids) == len(ALL_CASES), "duplicate case ids"
    assert len([c for c in ALL_CASES if c.id.startswith("hostile-tenant")]) == len(HOSTILE_TENANTS)
    assert len([c for c in ALL_CASES if c.id.startswith("hostile-name")]) == len(HOSTILE_NAMES)
    assert all(not c.ok for c in HUGE)


# -- fuzz ------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else k
            out += [p, *_paths(v, p)]
    elif isinstance(node, list):
        for i, v in enumerate(node):
            p = f"{prefix}.{i}"
            out += [p, *_paths(v, p)]
    return out


PATHS = [*_paths(base_crd_spec()), "bogus", "worker.bogus", "recordTypes.0.bogus"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=JSON)
def test_any_value_anywhere_is_a_valid_spec_or_a_spec_error(path: str, value: Any) -> None:
    case = Case("fuzz", path, value, ok=False)
    crd = apply_case(base_crd_spec(), case)
    try:
        ij = ImportJobSpec.model_validate(crd)
    except ValidationError as exc:
        assert all(p.strip() for p in problems_of(exc))
    else:
        assert ImportJobSpec.model_validate(ij.model_dump(mode="json")) == ij
    if path.split(".", maxsplit=1)[0] in ("database", "importId"):
        return
    try:
        spec = parse_spec(apply_case(base_spec(), case))
    except SpecError as exc:
        assert exc.problems and all(p.strip() for p in exc.problems)
    else:
        assert ImportSpec.model_validate(spec.model_dump(mode="json")) == spec
        assert len(wave_plan(spec)) == len(spec.recordTypes) + len(spec.derivedTypes)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from([*ImportSpec.model_fields, "x"]) | st.text(max_size=6), JSON)
)
def test_any_mapping_is_a_valid_spec_or_a_spec_error(data: dict[str, Any]) -> None:
    try:
        parse_spec(data)
    except SpecError as exc:
        assert exc.problems
