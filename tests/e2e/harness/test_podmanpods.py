"""The container mode's translation of a pod into podman flags (podmanpods.py here), and
its refusals, without a cluster: what the kubelet would refuse is refused with its message, and
what cannot be honoured here is refused rather than ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .podmanpods import PodConfigError, PodmanRuntime, security_args


def _pod(psc: dict[str, Any] | None = None, csc: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {
            "securityContext": psc or {},
            "containers": [{"name": "c", "securityContext": csc or {}}],
        },
    }


def _args(pod: dict[str, Any], image_user: str = "10001:10001") -> list[str]:
    return security_args(pod, pod["spec"]["containers"][0], image_user, Path("/nonexistent"))


def test_the_charts_security_context_becomes_podman_flags() -> None:
    pod = _pod(
        {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    )
    args = _args(pod)
    assert args == [
        "--user",
        "10001:10001",
        "--group-add",
        "10001",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]  # RuntimeDefault: podman's default seccomp profile, no flag


def test_container_settings_override_the_pods() -> None:
    pod = _pod(
        {"runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        {"runAsUser": 2000, "seccompProfile": {"type": "Unconfined"}},
    )
    args = _args(pod)
    assert args[:2] == ["--user", "2000"]  # the group from the image's passwd, as containerd
    assert args[-2:] == ["--security-opt", "seccomp=unconfined"]
    # No seccompProfile at all: unconfined, the kubelet's default.
    assert _args(_pod())[-2:] == ["--security-opt", "seccomp=unconfined"]


@pytest.mark.parametrize(
    ("psc", "image_user", "message"),
    [
        ({"runAsNonRoot": True}, "0:0", "container has runAsNonRoot and image will run as root"),
        ({"runAsNonRoot": True}, "", "container has runAsNonRoot and image will run as root"),
        (
            {"runAsNonRoot": True},
            "importwaves",
            "container has runAsNonRoot and image has non-numeric user (importwaves), cannot "
            "verify user is non-root",
        ),
        ({"runAsNonRoot": True, "runAsUser": 0}, "10001", "container's runAsUser breaks non-root"),
    ],
)
def test_run_as_non_root_is_checked_like_the_kubelet(
    psc: dict[str, Any], image_user: str, message: str
) -> None:
    with pytest.raises(PodConfigError) as err:
        _args(_pod(psc), image_user)
    assert err.value.reason == "CreateContainerConfigError"
    assert err.value.message.startswith(message), err.value.message
    assert err.value.message.endswith('(pod: "p_ns(u-1)", container: c)')
    # A numeric non-root image user, or runAsUser, passes.
    assert _args(_pod({"runAsNonRoot": True}), "10001:10001") is not None


@pytest.mark.parametrize(
    ("psc", "csc", "field"),
    [
        ({"seLinuxOptions": {"level": "s0"}}, {}, "seLinuxOptions"),
        ({"sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"}]}, {}, "sysctls"),
        ({}, {"procMount": "Unmasked"}, "procMount"),
        ({}, {"appArmorProfile": {"type": "RuntimeDefault"}}, "appArmorProfile"),
    ],
)
def test_what_cannot_be_honoured_is_refused(
    psc: dict[str, Any], csc: dict[str, Any], field: str
) -> None:
    with pytest.raises(PodConfigError, match=f"cannot honour securityContext {field}"):
        _args(_pod(psc, csc))


def test_a_missing_image_is_reported_by_pull_policy(tmp_path: Path) -> None:
    rt = PodmanRuntime(core=None, api_server="https://127.0.0.1:6443", root_dir=tmp_path)
    with pytest.raises(PodConfigError) as err:
        rt.image("localhost/importwaves-no-such-image:0", "Never")
    assert err.value.reason == "ErrImageNeverPull"
    assert "is not present with pull policy of Never" in err.value.message
    with pytest.raises(PodConfigError) as err:
        rt.image("localhost/importwaves-no-such-image:0", "IfNotPresent")
    assert err.value.reason == "ErrImagePull"
