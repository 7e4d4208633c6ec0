"""Bad input, API side: the same table as the engine model's unit tests (tests/spec_cases.py:
every field at and beyond its bounds, wrong types, unknown and missing fields, huge lists,
hostile tenant and record type names), each sent to the real API server as an ImportJob with a
server-side dry run. What the engine rejects, the API server rejects (naming the field); what the
engine accepts at a bound, the API server accepts. Nothing is created.

All cases go in one `kubectl apply --dry-run=server` (one object each, answered one by one);
each case is then its own test.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from spec_cases import ALL_CASES, Case, apply_case, base_crd_spec

from .harness.cluster import Cluster

NAMESPACE = "bad-input-dry-run"


def _name(i: int) -> str:
    return f"case-{i:03d}"


def _manifest(i: int, case: Case) -> dict[str, Any]:
    return {
        "apiVersion": "importwaves.io/v1alpha1",
        "kind": "ImportJob",
        "metadata": {"name": _name(i), "namespace": NAMESPACE},
        "spec": apply_case(base_crd_spec(), case),
    }


@pytest.fixture(scope="module")
def answers(k8s_cluster: Cluster, crds: None) -> dict[str, tuple[bool, str]]:
    """name -> (accepted, the server's message), for every case, from one dry run."""
    k8s_cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    docs = yaml.safe_dump_all(
        [_manifest(i, c) for i, c in enumerate(ALL_CASES)], allow_unicode=False, width=10**9
    )
    r = k8s_cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=docs,
        check=False,
        timeout=300,
    )
    accepted = set(
        re.findall(r"importjob\.importwaves\.io/(case-\d+) (?:created|configured)", r.stdout)
    )
    # kubectl answers the objects in order: one error block per refused object, in order (some
    # do not name their object: a body the server could not decode strictly)
    blocks = re.split(r"\n(?=Error from server|error: )", "\n" + r.stderr.strip())[1:]
    refused = [_name(i) for i in range(len(ALL_CASES)) if _name(i) not in accepted]
    assert len(blocks) == len(refused), (len(blocks), len(refused), r.stderr[-3000:])
    out: dict[str, tuple[bool, str]] = {name: (True, "") for name in accepted}
    for name, block in zip(refused, blocks, strict=True):
        named = re.search(r'"(case-\d+)"', block)
        assert named is None or named.group(1) == name, (name, block[:500])
        out[name] = (False, block)
    got = k8s_cluster.kubectl("-n", NAMESPACE, "get", "importjobs", "-o", "json", check=False)
    assert not json.loads(got.stdout or '{"items": []}')["items"], "a dry run created objects"
    k8s_cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    return out


@pytest.mark.parametrize(("i", "case"), list(enumerate(ALL_CASES)), ids=[c.id for c in ALL_CASES])
def test_api_server_answers_like_the_engine(
    answers: dict[str, tuple[bool, str]], i: int, case: Case
) -> None:
    accepted, message = answers[_name(i)]
    if case.ok_for_api:
        assert accepted, f"the engine accepts it, the API server refused:\n{message[:2000]}"
        return
    assert not accepted, f"the engine refuses it, the API server accepted:\n{message[:500]}"
    # The refusal names the field (the API server writes spec.recordTypes[0].name for the
    # engine's recordTypes.0.name).
    leaf = case.field.split(".")[-1]
    if leaf.isdigit():
        leaf = case.field.split(".")[-2]
    assert leaf in message, f"the refusal does not name {case.field}:\n{message[:2000]}"
