"""The Kubernetes launcher when the API server cannot be reached (a real client, a closed port):
observe says its view is incomplete (the engine then declares no worker gone), ensure and
discard log and leave everything for the next sync; nothing raises."""

from __future__ import annotations

import socket

from kubernetes import client

from importwaves.launch.kubernetes import KubernetesLauncher
from importwaves.launch.port import LaunchTarget, WorkerGroup

TARGET = LaunchTarget("kubernetes", namespace="ns", owner_name="ij", owner_uid="u1")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns


def _unreachable() -> KubernetesLauncher:
    conf = client.Configuration(host=f"http://127.0.0.1:{_closed_port()}")
    conf.retries = 0
    return KubernetesLauncher(client.ApiClient(conf))


def test_observe_is_incomplete_when_the_api_server_is_unreachable() -> None:
    seen = _unreachable().observe(TARGET, "t", "j")
    assert (seen.workers, seen.complete) == ((), False)


def test_ensure_and_discard_wait_for_the_next_sync() -> None:
    launcher = _unreachable()
    assert launcher.ensure(TARGET, "t", [WorkerGroup("j", 1, "Customer", 2)]) == []
    launcher.discard(TARGET, "t", "j", ["pod-a"], keep=["pod-a"])


def test_another_kind_of_target_is_none_of_its_business() -> None:
    launcher = _unreachable()
    local = LaunchTarget("local")
    assert launcher.observe(local, "t", "j").complete is False
    assert launcher.ensure(local, "t", [WorkerGroup("j", 1, "Customer", 2)]) == []
