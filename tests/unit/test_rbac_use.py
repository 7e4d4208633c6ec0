"""The chart grants on pods and Secrets exactly the verbs the operator's code calls on them.

A rule whose stated reason nothing in the code needs is a defect (issue 12): the verbs granted
for these resources are compared with the Kubernetes client calls in the operator's package.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "importwaves" / "templates" / "_helpers.tpl"
CODE = [ROOT / "operator" / "importwaves" / "k8s", ROOT / "operator" / "importwaves" / "launch"]
#: kubernetes-client method prefix -> RBAC verb
VERB = {"read": "get", "list": "list", "create": "create", "delete": "delete", "patch": "patch"}


def granted(resource: str) -> set[str]:
    text = RULES.read_text()
    found = re.findall(
        r'resources: \["' + re.escape(resource) + r'"\]\n\s*verbs: \[([^\]]*)\]', text
    )
    assert len(found) == 1, f"{resource}: {found}"
    return {v.strip().strip('"') for v in found[0].split(",")}


def called(kind: str) -> set[str]:
    verbs = set()
    for d in CODE:
        for path in d.rglob("*.py"):
            for m in re.finditer(r"\.([a-z]+)_namespaced_" + kind + r"\(", path.read_text()):
                verbs.add(VERB[m.group(1)])
    return verbs


@pytest.mark.parametrize(("resource", "kind"), [("pods", "pod"), ("secrets", "secret")])
def test_rbac_verbs_are_the_calls_the_code_makes(resource: str, kind: str) -> None:
    assert called(kind), f"no call on {resource}: drop its rule"
    assert granted(resource) == called(kind)
