"""The operator-wide budget's fair share (engine/budget.py): examples and properties."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from importwaves.engine.budget import Budget, Demand, Grant, share, waiting_message


def grants(budget: Budget, *demands: Demand) -> dict[str, tuple[int, int]]:
    return {j: (g.granted, g.held) for j, g in share(budget, demands).items()}


def test_unlimited_budget_grants_everything_wanted() -> None:
    out = grants(Budget(), Demand("a", "a1", 3, 5), Demand("b", "b1", 0, 2))
    assert out == {"a1": (5, 0), "b1": (2, 0)}


def test_free_slots_go_to_the_tenant_holding_fewest() -> None:
    # budget 8: big holds 6, small holds 0 and both want more -> the 2 free slots go to small
    out = grants(Budget(total=8), Demand("big", "big1", 6, 100), Demand("small", "s1", 0, 4))
    assert out == {"big1": (0, 100), "s1": (2, 2)}


def test_a_big_backlog_cannot_starve_a_small_tenant_as_slots_free() -> None:
    """Simulate the fairness benchmark's shape: big starts first with the whole budget; each
    round one of big's batches ends; the small tenant reaches its fair half, and big never
    takes a slot while small holds fewer."""
    budget = Budget(total=8)
    big_active, small_active = 8, 0
    small_wanted = 20
    history = []
    for _ in range(12):
        big_active -= 1  # one of big's batches finished
        out = share(
            budget,
            [
                Demand("big", "big1", big_active, 1000),
                Demand("small", "small1", small_active, min(small_wanted, 8 - small_active)),
            ],
        )
        big_active += out["big1"].granted
        small_active += out["small1"].granted
        small_wanted -= out["small1"].granted
        history.append((big_active, small_active))
        assert big_active + small_active <= 8
    assert history[0] == (7, 1)
    assert history[3] == (4, 4)  # fair share reached after four freed slots
    assert all(s >= 4 for _, s in history[3:])


def test_per_tenant_cap_bounds_one_tenant_even_with_free_budget() -> None:
    out = grants(
        Budget(total=100, per_tenant=3),
        Demand("a", "a1", 1, 10),
        Demand("a", "a2", 0, 10),
        Demand("b", "b1", 0, 1),
    )
    assert out["a1"][0] + out["a2"][0] == 2  # a holds 1, cap 3
    assert out["b1"] == (1, 0)


def test_a_tenant_over_a_lowered_cap_gets_nothing_new() -> None:
    out = grants(Budget(total=10, per_tenant=2), Demand("a", "a1", 5, 3))
    assert out == {"a1": (0, 3)}


def test_over_a_lowered_total_nobody_gets_anything_new() -> None:
    out = grants(Budget(total=4), Demand("a", "a1", 3, 1), Demand("b", "b1", 3, 1))
    assert out == {"a1": (0, 1), "b1": (0, 1)}


def test_priority_weights_tenants() -> None:
    # 9 free slots: tenant a (weight 2) ends with twice b's (weight 1)
    out = grants(Budget(total=9), Demand("a", "a1", 0, 20, priority=2), Demand("b", "b1", 0, 20))
    assert out["a1"][0] == 6 and out["b1"][0] == 3


def test_within_a_tenant_imports_share_by_priority() -> None:
    out = grants(
        Budget(total=6),
        Demand("a", "a1", 0, 20, priority=1),
        Demand("a", "a2", 0, 20, priority=2),
    )
    assert out["a1"][0] == 2 and out["a2"][0] == 4


def test_among_equals_the_tenant_whose_turn_came_longest_ago_goes_first() -> None:
    a1, z1 = Demand("a", "a1", 0, 1), Demand("z", "z1", 0, 1)
    assert share(Budget(total=1), [a1, z1], {"a": 7, "z": 3})["z1"].granted == 1
    assert share(Budget(total=1), [a1, z1], {"a": 3, "z": 7})["a1"].granted == 1
    # holding less for its weight still comes first, whatever the turns
    out = share(Budget(total=2), [a1, Demand("z", "z1", 1, 1)], {"a": 9, "z": 1})
    assert (out["a1"].granted, out["z1"].granted) == (1, 0)


def test_within_a_tenant_the_import_that_came_first_goes_first() -> None:
    out = grants(
        Budget(total=1), Demand("a", "a1", 0, 1, arrival=9), Demand("a", "a2", 0, 1, arrival=2)
    )
    assert out == {"a1": (0, 1), "a2": (1, 0)}
    with pytest.raises(ValueError):
        Demand("a", "j", 0, 0, arrival=-1)


def test_ties_go_by_tenant_name_then_job_id() -> None:
    out = grants(Budget(total=1), Demand("b", "b1", 0, 1), Demand("a", "a1", 0, 1))
    assert out == {"b1": (0, 1), "a1": (1, 0)}
    out = grants(Budget(total=1), Demand("a", "a2", 0, 1), Demand("a", "a1", 0, 1))
    assert out == {"a2": (0, 1), "a1": (1, 0)}


def test_duplicate_job_ids_and_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="one demand per job id"):
        share(Budget(total=2), [Demand("a", "j", 0, 1), Demand("b", "j", 0, 1)])
    with pytest.raises(ValueError):
        Budget(total=-1)
    with pytest.raises(ValueError):
        Demand("a", "j", -1, 0)
    with pytest.raises(ValueError):
        Demand("a", "j", 0, 0, priority=0)


def test_waiting_message_names_the_limits() -> None:
    g = Grant("a", "a1", 0, 4)
    assert g.waiting
    text = waiting_message(g, Budget(total=8, per_tenant=2))
    assert "4 batch(es)" in text and "budget of 8" in text and "per-tenant cap of 2" in text
    assert not Grant("a", "a1", 3, 0).waiting


demand_lists = st.lists(
    st.builds(
        Demand,
        tenant=st.sampled_from(["t1", "t2", "t3", "t4"]),
        job_id=st.text("abcdef", min_size=1, max_size=3),
        active=st.integers(0, 12),
        wanted=st.integers(0, 12),
        priority=st.integers(1, 3),
        arrival=st.integers(0, 5),
    ),
    max_size=10,
    unique_by=lambda d: d.job_id,
)


def _holding(ds: list[Demand], out: dict[str, Grant], tenant: str) -> int:
    return sum(d.active + out[d.job_id].granted for d in ds if d.tenant == tenant)


def _weight(ds: list[Demand], tenant: str) -> int:
    return max(d.priority for d in ds if d.tenant == tenant)


@settings(max_examples=400, deadline=None)
@given(
    demand_lists,
    st.integers(0, 40),
    st.integers(0, 15),
    st.dictionaries(st.sampled_from(["t1", "t2", "t3", "t4"]), st.integers(0, 5)),
)
def test_properties(ds: list[Demand], total: int, cap: int, turns: dict[str, int]) -> None:
    budget = Budget(total=total, per_tenant=cap)
    out = share(budget, ds, turns)
    assert set(out) == {d.job_id for d in ds}
    active = sum(d.active for d in ds)
    granted = sum(g.granted for g in out.values())
    for d in ds:
        g = out[d.job_id]
        assert 0 <= g.granted <= d.wanted and g.granted + g.held == d.wanted
    # never over the budget (nothing new when already over it)
    if total:
        assert granted <= max(0, total - active)
    tenants = {d.tenant for d in ds}
    for t in tenants:
        t_active = sum(d.active for d in ds if d.tenant == t)
        t_granted = sum(out[d.job_id].granted for d in ds if d.tenant == t)
        if cap:
            assert t_granted <= max(0, cap - t_active)
    # work conserving: an import is held back only when the budget or its tenant's cap is full
    for d in ds:
        if out[d.job_id].held:
            full_total = bool(total) and active + granted >= total
            full_tenant = bool(cap) and _holding(ds, out, d.tenant) >= cap
            assert full_total or full_tenant
    # weighted max-min fairness: a tenant that got a slot held, before its last one, no more
    # (per weight) than any tenant still waiting and not capped ends with
    for a in tenants:
        waiting = any(out[d.job_id].held for d in ds if d.tenant == a)
        if not waiting or (cap and _holding(ds, out, a) >= cap):
            continue
        for b in tenants - {a}:
            if sum(out[d.job_id].granted for d in ds if d.tenant == b) == 0:
                continue
            before_last = Fraction(_holding(ds, out, b) - 1, _weight(ds, b))
            assert before_last <= Fraction(_holding(ds, out, a), _weight(ds, a))
    # deterministic whatever the input order
    shuffled = list(ds)
    random.Random(len(ds)).shuffle(shuffled)
    assert share(budget, shuffled, turns) == out
