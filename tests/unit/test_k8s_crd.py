"""The ImportJob CRD: one source of truth, described, structural, in step with the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from importwaves.k8s.crd import CEL_RULES, ImportJobSpec, build_crd, crd_yaml
from importwaves.spec import ImportSpec

REPO = Path(__file__).resolve().parents[2]


def root_schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path (`[]` for list items, `{}` for map values)."""
    yield path or ".", node
    for key, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_is_the_generated_one() -> None:
    committed = (REPO / "crds" / "importjob.yaml").read_text()
    assert committed == crd_yaml(), (
        "crds/importjob.yaml is out of date: run `importwaves crd > crds/importjob.yaml`"
    )


def test_cli_prints_the_crd() -> None:
    from click.testing import CliRunner

    from importwaves.cli import main

    out = CliRunner().invoke(main, ["crd"])
    assert out.exit_code == 0, out.output
    assert out.output == crd_yaml()


def test_every_property_has_a_description() -> None:
    missing = []
    for path, node in walk(root_schema()):
        for key, child in (node.get("properties") or {}).items():
            if path == "." and key == "metadata":
                # The API server refuses anything but name/generateName restrictions here
                # ("must not specify anything other than name and generateName").
                assert child == {"type": "object"}
                continue
            if not str(child.get("description") or "").strip():
                missing.append(f"{path.rstrip('.')}.{key}")
    assert not missing, f"schema properties without a description: {missing}"


def test_schema_is_structural() -> None:
    """No $ref/anyOf/allOf/oneOf (forbidden or pointless in a structural schema); every node
    says its type unless it preserves unknown fields; objects say what they hold."""
    problems = []
    for path, node in walk(root_schema()):
        for bad in ("$ref", "anyOf", "allOf", "oneOf", "$defs", "title"):
            if bad in node:
                problems.append(f"{path}: has {bad}")
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}: no type")
        if node.get("type") == "object" and not (
            "properties" in node
            or "additionalProperties" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or path == ".metadata"
        ):
            problems.append(f"{path}: object without properties")
    assert not problems, problems


def test_spec_schema_follows_the_model() -> None:
    spec = root_schema()["properties"]["spec"]
    assert set(spec["properties"]) == set(ImportJobSpec.model_fields)
    assert set(spec["required"]) == {"tenant", "recordTypes", "database"}
    props = spec["properties"]
    assert props["completionThreshold"]["minimum"] == 1
    assert props["completionThreshold"]["maximum"] == 100
    rt = props["recordTypes"]
    assert rt["minItems"] == 1
    assert rt["x-kubernetes-list-type"] == "map"
    assert rt["x-kubernetes-list-map-keys"] == ["name"]
    assert rt["items"]["properties"]["batchSize"]["minimum"] == 1
    assert props["tenant"]["pattern"] == ImportSpec.model_fields["tenant"].metadata[0].pattern
    # Optional fields become nullable, never anyOf; the database ref is required.
    assert props["importId"]["nullable"] is True
    assert set(props["database"]["required"]) == {"secretName"}
    assert spec["x-kubernetes-validations"] == CEL_RULES
    for rule in CEL_RULES:
        assert rule["message"] and rule["fieldPath"].startswith(".")


def test_printer_columns() -> None:
    version = build_crd()["spec"]["versions"][0]
    columns = version["additionalPrinterColumns"]
    cols = {c["name"]: c["jsonPath"] for c in columns}
    assert list(cols) == [
        "Ready",
        "Status",
        "Progress",
        "Active",
        "Failed",
        "Waiting",
        "Age",
        "Message",
        "Started",
        "Duration",
    ]
    # -o wide only: the message, start time and duration
    assert [c["name"] for c in columns if c.get("priority") == 1] == [
        "Message",
        "Started",
        "Duration",
    ]
    assert cols["Ready"] == '.status.conditions[?(@.type=="Completed")].status'
    status = root_schema()["properties"]["status"]["properties"]
    for name, path in cols.items():
        if path.startswith(".status."):
            assert path.removeprefix(".status.").split("[")[0] in status, name
    assert version["subresources"] == {"status": {}}


def test_status_schema_is_generated_from_the_status_model() -> None:
    from importwaves.k8s.crd import structural
    from importwaves.k8s.status import PENDING_MESSAGE, ImportJobStatus

    status = root_schema()["properties"]["status"]
    generated = structural(ImportJobStatus.model_json_schema(mode="serialization"))
    assert status["properties"] == generated["properties"]
    assert set(status["properties"]) == set(ImportJobStatus.model_fields)
    assert status["properties"]["startTime"]["format"] == "date-time"
    # before the operator's first write the API server shows STATUS Pending and a MESSAGE
    assert status["default"] == {}
    assert status["properties"]["summary"]["default"] == "Pending"
    assert status["properties"]["message"]["default"] == PENDING_MESSAGE
    cond = status["properties"]["conditions"]
    assert cond["x-kubernetes-list-type"] == "map"
    assert cond["x-kubernetes-list-map-keys"] == ["type"]


def test_plan_shaping_fields_are_immutable_by_cel() -> None:
    rules = {r["fieldPath"]: r["rule"] for r in CEL_RULES if "oldSelf" in r["rule"]}
    assert "self.recordTypes == oldSelf.recordTypes" in rules[".recordTypes"]
    assert "self.derivedTypes == oldSelf.derivedTypes" in rules[".derivedTypes"]
    assert ".tenant" in rules and ".importId" in rules


def test_example_manifest_is_a_valid_spec() -> None:
    manifest = yaml.safe_load((REPO / "examples" / "importjob.yaml").read_text())
    assert manifest["apiVersion"] == "importwaves.io/v1alpha1"
    assert manifest["kind"] == "ImportJob"
    spec = ImportJobSpec.model_validate(manifest["spec"])
    assert spec.job_id("imports", "demo-import") == "demo-import"
    assert spec.engine_spec().tenant == "demo"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"completionThreshold": 0}, "completionThreshold"),
        ({"database": {}}, "database.secretName"),
        ({"database": {"secretName": "x", "dsn": "postgresql://inline"}}, "database.dsn"),
        ({"importId": "Bad Id"}, "importId"),
    ],
)
def test_spec_model_rejects_with_the_field(patch: dict[str, Any], field: str) -> None:
    from pydantic import ValidationError

    from importwaves.spec import format_validation_error

    data = yaml.safe_load((REPO / "examples" / "importjob.yaml").read_text())["spec"]
    data.update(patch)
    with pytest.raises(ValidationError) as info:
        ImportJobSpec.model_validate(data)
    assert format_validation_error(info.value).startswith(field)


def test_spec_descriptions_state_range_and_default() -> None:
    """`kubectl explain importjob.spec.<field>` says the field's range and its default: every
    bounded number names both bounds, every field with a default says "default"."""
    spec = root_schema()["properties"]["spec"]
    problems = []
    for path, node in walk(spec, ".spec"):
        text = str(node.get("description") or "")
        for bound in ("minimum", "maximum"):
            if bound in node and str(node[bound]) not in text:
                problems.append(f"{path}: {bound} {node[bound]} not in {text!r}")
        if "default" in node and "default" not in text:
            problems.append(f"{path}: has a default, description does not say it: {text!r}")
    assert not problems, "\n".join(problems)


def test_completion_threshold_explains_what_it_gates() -> None:
    node = root_schema()["properties"]["spec"]["properties"]["completionThreshold"]
    assert (node["minimum"], node["maximum"], node["default"]) == (1, 100, 100)
    text = node["description"]
    assert "1..100" in text and "default 100" in text
    assert "parent batches" in text and "derived" in text
