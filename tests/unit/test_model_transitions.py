"""The model (model/protocol.pml) and the guard-rule state machine (tests/property/
test_guard_rules.py) name the same stimuli: the model declares its rules in the mtype after the
`@rules` comment, the state machine has one @rule method per name. No SPIN, no database needed:
both files are parsed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "model" / "protocol.pml"
MACHINE = ROOT / "tests" / "property" / "test_guard_rules.py"
README = ROOT / "model" / "README.md"


def _mtype_after(marker: str, text: str) -> list[str]:
    found = re.search(re.escape(marker) + r".*?\*/\s*mtype\s*=\s*\{(.*?)\}", text, re.S)
    assert found, f"no mtype declaration after {marker!r} in {MODEL}"
    return [n.strip() for n in found.group(1).split(",") if n.strip()]


def model_rules() -> list[str]:
    return _mtype_after("@rules", MODEL.read_text())


def model_steps() -> list[str]:
    return _mtype_after("@steps", MODEL.read_text())


def machine_rules() -> list[str]:
    """Names of the methods of GuardRules decorated with hypothesis' @rule."""
    tree = ast.parse(MACHINE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GuardRules")
    out = []
    for fn in cls.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for dec in fn.decorator_list:
            target = dec.func if isinstance(dec, ast.Call) else dec
            if isinstance(target, ast.Name) and target.id == "rule":
                out.append(fn.name)
    return out


def _uses(name: str, text: str) -> int:
    """Occurrences of `name` in the model outside its mtype declarations and comments."""
    body = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    body = re.sub(r"mtype\s*=\s*\{.*?\}", "", body, flags=re.S)
    return len(re.findall(rf"\b{re.escape(name)}\b", body))


def test_the_machine_rules_are_the_model_rules() -> None:
    model, machine = model_rules(), machine_rules()
    assert len(model) >= 8 and len(machine) >= 8, (model, machine)
    only_model = sorted(set(model) - set(machine))
    only_machine = sorted(set(machine) - set(model))
    assert not only_model and not only_machine, (
        f"the model's transitions and the state machine's rules drifted apart: only in "
        f"model/protocol.pml: {only_model}; only in test_guard_rules.py: {only_machine}"
    )
    assert len(set(model)) == len(model), "a rule declared twice in the model"


def test_every_declared_transition_is_a_transition_of_the_model() -> None:
    text = MODEL.read_text()
    unused = [n for n in model_rules() + model_steps() if _uses(n, text) == 0]
    assert not unused, f"declared in model/protocol.pml but never taken: {unused}"


def test_the_readme_maps_every_transition() -> None:
    readme = README.read_text()
    missing = [n for n in model_rules() + model_steps() if f"`{n}`" not in readme]
    assert not missing, f"model/README.md does not map: {missing}"


def test_the_parsers_see_a_drift() -> None:
    """The check above can fail: a renamed rule on either side is reported."""
    text = MODEL.read_text().replace("worker_runs,", "worker_starts,", 1)
    assert "worker_starts" in _mtype_after("@rules", text)
    assert "worker_starts" not in machine_rules()
