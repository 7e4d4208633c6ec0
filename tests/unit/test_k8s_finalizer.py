"""The operator's finalizer: named under importwaves.io/, and the one of earlier operator
versions (kopf's default) removed by a guarded JSON patch. (End to end: tests/e2e/
test_operator_lifecycle.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from importwaves.k8s.handlers import FINALIZER, LEGACY_FINALIZER, legacy_finalizer_patch


def apply_patch(finalizers: list[str], ops: list[dict[str, Any]]) -> list[str]:
    """RFC 6902 `test` and `remove` on /metadata/finalizers/<i>, as the API server does them."""
    out = list(finalizers)
    for op in ops:
        prefix, _, index = op["path"].rpartition("/")
        assert prefix == "/metadata/finalizers"
        i = int(index)
        if op["op"] == "test":
            if i >= len(out) or out[i] != op["value"]:
                raise ValueError(f"test failed: {op}")
        elif op["op"] == "remove":
            del out[i]
        else:
            raise AssertionError(op)
    return out


def test_finalizer_is_named_under_the_group() -> None:
    assert FINALIZER == "importwaves.io/finalizer"
    assert LEGACY_FINALIZER == "kopf.zalando.org/KopfFinalizerMarker"


@pytest.mark.parametrize(
    "finalizers",
    [
        [LEGACY_FINALIZER],
        [FINALIZER, LEGACY_FINALIZER],
        ["example.com/other", LEGACY_FINALIZER, FINALIZER],
    ],
)
def test_patch_removes_only_the_legacy_finalizer(finalizers: list[str]) -> None:
    patched = apply_patch(finalizers, legacy_finalizer_patch(finalizers))
    assert patched == [f for f in finalizers if f != LEGACY_FINALIZER]


def test_no_patch_without_the_legacy_finalizer() -> None:
    assert legacy_finalizer_patch([]) == []
    assert legacy_finalizer_patch([FINALIZER]) == []


def test_patch_fails_when_the_list_changed_meanwhile() -> None:
    ops = legacy_finalizer_patch([FINALIZER, LEGACY_FINALIZER])
    with pytest.raises(ValueError, match="test failed"):
        apply_patch([LEGACY_FINALIZER], ops)  # the list changed: index 1 is gone
