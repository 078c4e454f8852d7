"""cdp_profile.core: traits last-writer-wins by event time, order aggregates, merging (see also
test_profile_state.py for the other aggregates and the order-independence properties)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cdp_profile.core import ProfileState, apply_event, merge, order_value, set_traits

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(hours=1)
T2 = T0 + timedelta(hours=2)


def apply(state: ProfileState, at: datetime, *, name: str = "identify", properties: dict[str, Any] | None = None,
          traits: dict[str, Any] | None = None, identifiers: list[tuple[str, str]] | None = None
          ) -> tuple[ProfileState, list[str]]:
    return apply_event(state, name=name, properties=properties or {}, traits=traits or {},
                       identifiers=identifiers or [], at=at)


# --- set_traits --------------------------------------------------------------------------------


def test_a_newer_event_overwrites_a_trait() -> None:
    traits, times, changed = set_traits({"plan": "free"}, {"plan": T0.isoformat()}, {"plan": "pro"}, T1)
    assert traits == {"plan": "pro"}
    assert times == {"plan": T1.isoformat()}
    assert changed == ["traits.plan"]


def test_an_older_event_arriving_late_never_overwrites_a_newer_value() -> None:
    traits, times, changed = set_traits({"plan": "pro"}, {"plan": T2.isoformat()}, {"plan": "free"}, T1)
    assert traits == {"plan": "pro"}
    assert times == {"plan": T2.isoformat()}
    assert changed == []


def test_a_late_event_still_sets_the_traits_it_is_first_to_know() -> None:
    traits, _, changed = set_traits(
        {"plan": "pro"}, {"plan": T2.isoformat()}, {"plan": "free", "city": "Paris"}, T1
    )
    assert traits == {"plan": "pro", "city": "Paris"}
    assert changed == ["traits.city"]


def test_rewriting_the_same_value_is_not_a_change_but_refreshes_its_time() -> None:
    traits, times, changed = set_traits({"plan": "pro"}, {"plan": T0.isoformat()}, {"plan": "pro"}, T1)
    assert traits == {"plan": "pro"}
    assert changed == []
    assert times["plan"] == T1.isoformat()


def test_a_trait_set_to_none_is_a_change() -> None:
    traits, _, changed = set_traits({}, {}, {"nickname": None}, T0)
    assert traits == {"nickname": None}
    assert changed == ["traits.nickname"]


def test_set_traits_does_not_mutate_its_inputs() -> None:
    traits, times = {"plan": "free"}, {"plan": T0.isoformat()}
    set_traits(traits, times, {"plan": "pro"}, T1)
    assert traits == {"plan": "free"} and times == {"plan": T0.isoformat()}


# --- apply_event -------------------------------------------------------------------------------


def test_events_applied_out_of_order_end_with_the_newest_values() -> None:
    state = ProfileState("p1")
    state, _ = apply(state, T2, traits={"plan": "pro"})
    state, changed = apply(state, T0, traits={"plan": "free"})
    assert state.traits["plan"] == "pro"
    assert "traits.plan" not in changed
    assert state.first_seen_at == T0
    assert state.event_count == 2


def test_identifiers_accumulate_and_are_reported_only_when_new() -> None:
    state, changed = apply(ProfileState("p1"), T0, identifiers=[("email", "a@b.c")])
    assert state.identifiers == {("email", "a@b.c")}
    assert "identifiers" in changed
    state, changed = apply(state, T1, identifiers=[("email", "a@b.c"), ("user_id", "u1")])
    assert state.identifiers == {("email", "a@b.c"), ("user_id", "u1")}
    assert "identifiers" in changed
    state, changed = apply(state, T2, identifiers=[("user_id", "u1")])
    assert "identifiers" not in changed


def test_a_plain_event_changes_no_order_aggregate() -> None:
    state, changed = apply(ProfileState("p1"), T0, name="Page Viewed", properties={"revenue": 10})
    assert (state.order_count, state.revenue, state.last_order_at) == (0, 0.0, None)
    assert changed == ["event_count", "first_seen_at", "last_seen_at"]
    assert state.event_count == 1


@pytest.mark.parametrize(
    ("properties", "value"),
    [
        ({"revenue": 19.99}, 19.99),
        ({"revenue": 20}, 20.0),
        ({"total": 35.5}, 35.5),
        ({"value": 7}, 7.0),
        ({"revenue": "12.50"}, 12.5),
        ({"revenue": 10, "total": 99, "value": 1}, 10.0),  # revenue first
        ({"total": 99, "value": 1}, 99.0),  # then total
        ({"revenue": "n/a", "total": 5}, 5.0),  # an unreadable revenue falls through
        ({"revenue": True, "total": 3}, 3.0),  # a boolean is not an amount
        ({"revenue": None, "value": 4}, 4.0),
        ({}, 0.0),  # an order without a value still counts as an order
    ],
)
def test_order_value_keys(properties: dict[str, Any], value: float) -> None:
    assert order_value("Order Completed", properties) == value


@pytest.mark.parametrize("name", ["Order Updated", "order completed", "Checkout Started", ""])
def test_only_order_completed_is_an_order(name: str) -> None:
    assert order_value(name, {"revenue": 10}) is None


def test_orders_aggregate_count_revenue_and_last_order() -> None:
    state = ProfileState("p1")
    state, changed = apply(state, T1, name="Order Completed", properties={"revenue": 19.99})
    assert set(changed) >= {"order_count", "revenue", "last_order_at"}
    state, _ = apply(state, T2, name="Order Completed", properties={"total": "5.01"})
    assert state.order_count == 2
    assert state.revenue == 25.0
    assert state.last_order_at == T2


def test_a_late_order_counts_but_does_not_move_last_order_back() -> None:
    state, _ = apply(ProfileState("p1"), T2, name="Order Completed", properties={"revenue": 10})
    state, _ = apply(state, T0, name="Order Completed", properties={"revenue": 5})
    assert state.order_count == 2
    assert state.revenue == 15.0
    assert state.last_order_at == T2
    assert state.first_seen_at == T0


def test_revenue_is_rounded_to_cents() -> None:
    state = ProfileState("p1")
    for at in (T0, T1, T2):
        state, _ = apply(state, at, name="Order Completed", properties={"revenue": 0.1})
    assert state.revenue == 0.3


def test_apply_event_leaves_the_previous_state_untouched() -> None:
    before = ProfileState("p1")
    apply(before, T0, name="Order Completed", properties={"revenue": 3}, traits={"a": 1},
          identifiers=[("email", "a@b.c")])
    assert before == ProfileState("p1")


@pytest.mark.parametrize("amount", ["NaN", "inf"])
def test_a_non_finite_amount_does_not_poison_revenue(amount: str) -> None:
    state, _ = apply(ProfileState("p1"), T0, name="Order Completed", properties={"revenue": 10})
    state, _ = apply(state, T1, name="Order Completed", properties={"revenue": amount})
    assert math.isfinite(state.revenue)


# --- merge -------------------------------------------------------------------------------------


def _profile(pid: str, **kw: Any) -> ProfileState:
    return ProfileState(pid, **kw)


def test_merge_sums_counts_and_keeps_the_extremes() -> None:
    survivor = _profile("p1", order_count=2, revenue_cents=3010, event_count=5, last_order_at=T0, first_seen_at=T0,
                        identifiers=frozenset({("email", "a@b.c")}))
    other = _profile("p2", order_count=1, revenue_cents=995, event_count=3, last_order_at=T2,
                     first_seen_at=T0 - timedelta(days=3), identifiers=frozenset({("anonymous_id", "x")}))
    merged = merge(survivor, [other])
    assert merged.profile_id == "p1"
    assert merged.order_count == 3
    assert merged.revenue == 40.05
    assert merged.event_count == 8
    assert merged.last_order_at == T2
    assert merged.first_seen_at == T0 - timedelta(days=3)
    assert merged.identifiers == {("email", "a@b.c"), ("anonymous_id", "x")}
    assert merged.merged_ids == ("p2",)


def test_merge_keeps_a_last_order_when_the_other_profile_never_ordered() -> None:
    merged = merge(_profile("p1", last_order_at=T1), [_profile("p2")])
    assert merged.last_order_at == T1
    merged = merge(_profile("p1"), [_profile("p2", last_order_at=T1)])
    assert merged.last_order_at == T1


def test_merge_resolves_traits_by_event_time() -> None:
    survivor = _profile("p1", traits={"plan": "free", "city": "Oslo"},
                        trait_times={"plan": T0.isoformat(), "city": T2.isoformat()})
    other = _profile("p2", traits={"plan": "pro", "city": "Rome", "vip": True},
                     trait_times={"plan": T1.isoformat(), "city": T1.isoformat(), "vip": T0.isoformat()})
    merged = merge(survivor, [other])
    assert merged.traits == {"plan": "pro", "city": "Oslo", "vip": True}
    assert merged.trait_times == {"plan": T1.isoformat(), "city": T2.isoformat(), "vip": T0.isoformat()}


def test_after_a_merge_a_late_event_still_cannot_overwrite_a_newer_trait() -> None:
    survivor = _profile("p1")
    other = _profile("p2", traits={"plan": "pro"}, trait_times={"plan": T2.isoformat()})
    merged = merge(survivor, [other])
    after, _ = apply(merged, T1, traits={"plan": "free"})
    assert after.traits["plan"] == "pro"


def test_merge_folds_several_profiles_and_their_own_merges() -> None:
    a = _profile("p1", order_count=1, merged_ids=("p0",))
    b = _profile("p2", order_count=2, merged_ids=("p5", "p6"))
    c = _profile("p3", order_count=4)
    merged = merge(a, [b, c])
    assert merged.order_count == 7
    assert merged.merged_ids == ("p0", "p2", "p5", "p6", "p3")


def test_merging_the_same_profile_twice_records_it_once() -> None:
    merged = merge(_profile("p1"), [_profile("p2")])
    merged = merge(merged, [_profile("p2")])
    assert merged.merged_ids == ("p2",)


def test_merge_with_nothing_is_the_survivor() -> None:
    survivor = _profile("p1", traits={"a": 1}, order_count=3)
    assert merge(survivor, []) == survivor
