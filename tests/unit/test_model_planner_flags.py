"""Small pure pieces: wave state, wave plan, flag keys without Redis, worker settings."""

from __future__ import annotations

import pytest

from importwaves import flags as flagmod
from importwaves.datagen import reference_spec
from importwaves.engine.model import DERIVED, MAIN, Snapshot, WaveState
from importwaves.engine.planner import derived_wave_number, wave_plan
from importwaves.engine.snapshot import gates
from importwaves.flags import Flags
from importwaves.worker import ENV, EXIT_USAGE, WorkItem, item_from_env, main


def test_wave_state_properties() -> None:
    w = WaveState(
        wave_number=1,
        record_type_id=-2,
        name="C",
        level=MAIN,
        total=10,
        pending=2,
        dispatched=1,
        processing=3,
        completed=4,
    )
    assert (w.active, w.unfinished, w.all_completed, w.is_derived) == (4, 6, False, False)
    assert WaveState(wave_number=2, record_type_id=-13, name="L", level=DERIVED).all_completed
    assert WaveState(wave_number=2, record_type_id=-13, name="L", level=DERIVED).is_derived


def test_snapshot_lookup() -> None:
    a = WaveState(wave_number=1, record_type_id=-2, name="C", level=MAIN, total=1, processing=1)
    b = WaveState(wave_number=2, record_type_id=-13, name="L", level=DERIVED, total=2, dispatched=2)
    s = Snapshot("j", "running", False, 4, (a, b))  # type: ignore[arg-type]
    assert s.wave(2) is b
    assert s.main_waves == [a] and s.derived_waves == [b]
    assert s.active == 3
    with pytest.raises(KeyError):
        s.wave(9)


def test_wave_plan_numbers_main_types_in_order_then_derived() -> None:
    spec = reference_spec("acme")
    plan = wave_plan(spec)
    assert [(w.wave_number, w.record_type_id, w.level, w.batch_size) for w in plan] == [
        (1, -2, MAIN, 500),
        (2, -30, MAIN, 500),
        (3, -13, DERIVED, 2500),
    ]
    assert derived_wave_number(spec, -13) == 3
    with pytest.raises(KeyError):
        derived_wave_number(spec, -30)  # a main type is not derived


def test_gates_sum_every_parent_wave() -> None:
    spec = reference_spec(
        "acme",
        derivedTypes=[{"name": "TransactionLine", "parentTypes": ["Customer", "SalesOrder"]}],
        completionThreshold=60,
    )
    waves = (
        WaveState(wave_number=1, record_type_id=-2, name="C", level=MAIN, total=4, completed=4),
        WaveState(wave_number=2, record_type_id=-30, name="S", level=MAIN, total=6, completed=2),
        WaveState(wave_number=3, record_type_id=-13, name="L", level=DERIVED),
    )
    (g,) = gates(spec, waves)
    assert (g.wave_number, g.parent_total, g.parent_completed, g.threshold) == (3, 10, 6, 60)
    assert g.open and not g.parents_done


def test_flag_keys_are_namespaced_by_tenant_and_job() -> None:
    assert flagmod.key("t1", "job", flagmod.MONITORING) == (
        "importwaves:t1:job:wave_monitoring_active"
    )
    assert flagmod.key("t2", "job", flagmod.DERIVED_READY) == (
        "importwaves:t2:job:derived_lines_ready"
    )
    assert flagmod.key("t1", "job", "x") != flagmod.key("t2", "job", "x")


def test_flags_without_redis_answer_unknown_and_never_raise() -> None:
    f = Flags(None, "t1")
    assert not f.enabled
    f.set_monitoring("j")
    f.set_derived_ready("j")
    f.clear_monitoring("j")
    f.forget_job("j")
    assert f.monitoring("j") is None
    assert f.derived_ready("j") is None
    assert f.ttl_of("j", flagmod.MONITORING) is None


@pytest.mark.parametrize("ttl", [0, -1])
def test_flag_ttl_must_be_positive(ttl: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        Flags(None, "t1", ttl=ttl)


def test_worker_settings_from_env() -> None:
    env = {
        ENV["dsn"]: "postgresql://x",
        ENV["tenant"]: "t1",
        ENV["job_id"]: "j",
        ENV["batch_id"]: "B-1",
        ENV["dispatch_seq"]: "3",
    }
    assert item_from_env(env) == WorkItem("postgresql://x", "t1", "j", "B-1", 3)
    del env[ENV["batch_id"]]
    env[ENV["tenant"]] = ""
    with pytest.raises(ValueError, match="IMPORTWAVES_TENANT, IMPORTWAVES_BATCH_ID"):
        item_from_env(env)


def test_worker_without_settings_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert main() == EXIT_USAGE
    assert "missing worker settings" in capsys.readouterr().err
