"""cdp_profile.core: every aggregate, consent, ticket and loyalty register, whatever the order of
events, and merging parts of a history (hypothesis)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_profile.core import (
    Observed, ProfileState, Score, Scores, changed_fields, combine, fold, from_fields, merge, with_scores,
)

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def at(days: float) -> datetime:
    return T0 + timedelta(days=days)


def track(name: str, days: float, **properties: Any) -> Observed:
    return Observed(at=at(days), name=name, properties=properties)


def folded(*events: Observed) -> ProfileState:
    return fold(ProfileState("p"), events)


def test_orders_give_count_revenue_aov_first_last_and_interval() -> None:
    state = folded(
        track("Order Completed", 10, order_id="o2", revenue=30.0),
        track("Order Completed", 0, order_id="o1", revenue=10.0),
        track("Order Completed", 30, order_id="o3", total=20.0),
    )
    assert (state.order_count, state.revenue, state.average_order_value) == (3, 60.0, 20.0)
    assert (state.first_order_at, state.last_order_at) == (at(0), at(30))
    assert state.average_interval_days == 15.0


def test_one_order_has_no_interval_and_no_order_has_no_aov() -> None:
    assert folded(track("Order Completed", 0, order_id="o1")).average_interval_days is None
    assert folded(track("Page Viewed", 0)).average_order_value is None


def test_order_categories_count_items_by_quantity() -> None:
    state = folded(
        track("Order Completed", 0, order_id="o1", products=[
            {"category": "shoes", "quantity": 2}, {"category": "socks"}, {"name": "no category"},
            {"category": "shoes", "quantity": 0}, "not an object",
        ]),
        track("Order Completed", 1, order_id="o2", products=[{"category": "socks", "quantity": 3}]),
    )
    assert state.categories == {"shoes": 3, "socks": 4}


def test_refunds_count_and_sum_apart_from_revenue() -> None:
    state = folded(
        track("Order Completed", 0, order_id="o1", revenue=50.0),
        track("Order Refunded", 2, order_id="o1", total=20.0),
    )
    assert (state.order_count, state.revenue, state.refund_count, state.refunded) == (1, 50.0, 1, 20.0)


def test_email_engagement_counts_rates_and_last_times() -> None:
    state = folded(
        *(track("Email Delivered", d, email_id=f"e{d}") for d in range(4)),
        track("Email Opened", 1, email_id="e1"), track("Email Opened", 3, email_id="e3"),
        track("Email Link Clicked", 2, email_id="e1"), track("Email Bounced", 5),
    )
    assert (state.email_deliveries, state.email_opens, state.email_clicks, state.email_bounces) == (4, 2, 1, 1)
    assert (state.email_open_rate, state.email_click_rate) == (0.5, 0.25)
    assert (state.last_open_at, state.last_click_at) == (at(3), at(2))


def test_email_rates_fall_back_to_sends_are_capped_and_unset_when_nothing_reached() -> None:
    assert folded(track("Email Opened", 0)).email_open_rate is None
    state = folded(track("Email Sent", 0), track("Email Opened", 1), track("Email Opened", 2))
    assert state.email_open_rate == 1.0


def test_a_ticket_closed_before_its_opening_arrives_stays_resolved() -> None:
    state = folded(
        track("Ticket Resolved", 2, ticket_id="t1"),
        track("Ticket Opened", 1, ticket_id="t1"),
        track("Ticket Opened", 3, ticket_id="t2"),
    )
    assert state.tickets["t1"][1] == "resolved"
    assert state.open_tickets == ("t2",)


def test_a_ticket_resolved_and_opened_at_the_same_moment_is_resolved() -> None:
    for events in ([track("Ticket Opened", 1, ticket_id="t"), track("Ticket Resolved", 1, ticket_id="t")],
                   [track("Ticket Resolved", 1, ticket_id="t"), track("Ticket Opened", 1, ticket_id="t")]):
        assert folded(*events).open_tickets == ()


def test_loyalty_tier_and_balance_are_the_latest_by_event_time() -> None:
    state = folded(
        track("Loyalty Tier Changed", 5, tier="gold"),
        track("Loyalty Tier Changed", 2, tier="silver"),
        track("Loyalty Points Earned", 4, points=50, balance=250),
        track("Loyalty Points Earned", 1, points=100, balance=100),
    )
    assert state.loyalty_tier is not None and state.loyalty_tier[1] == "gold"
    assert state.loyalty_points == 250


def test_loyalty_points_without_a_balance_are_summed() -> None:
    state = folded(track("Loyalty Points Earned", 0, points=10), track("Loyalty Points Earned", 1, points=15))
    assert state.loyalty_points == 25


def test_consents_per_channel_and_purpose_latest_by_event_time() -> None:
    state = folded(
        Observed(at=at(1), type="identify", consent={"email.marketing": True, "sms": True}),
        track("Consent Updated", 3, channel="email", purpose="marketing", granted=False),
        track("Consent Updated", 2, channel="email", purpose="marketing", granted=True),
        track("Consent Updated", 2, channel="WhatsApp", purpose="transactional", granted=True),
        track("Consent Updated", 4, channel="push", granted="yes"),  # not a boolean: ignored
    )
    assert {k: v[1] for k, v in state.consents.items()} == {
        "email.marketing": False, "sms.all": True, "whatsapp.transactional": True,
    }


def test_unsubscribing_withdraws_email_marketing_consent() -> None:
    state = folded(Observed(at=at(0), consent={"email:marketing": True}), track("Unsubscribed", 1, list_id="news"))
    assert state.consents["email.marketing"][1] is False


def test_a_page_named_like_an_order_is_not_an_order() -> None:
    state = fold(ProfileState("p"), [Observed(at=at(0), type="page", name="Order Completed",
                                              properties={"revenue": 10})])
    assert state.order_count == 0


def test_changed_fields_name_what_changed() -> None:
    before = folded(track("Order Completed", 0, order_id="o1", revenue=5))
    after = fold(before, [track("Loyalty Tier Changed", 1, tier="gold"), track("Email Opened", 1)])
    assert changed_fields(before, after) == ["email", "event_count", "last_seen_at", "loyalty"]


# --- order independence ------------------------------------------------------------------------

_names = st.sampled_from([
    "Order Completed", "Order Refunded", "Email Sent", "Email Delivered", "Email Opened", "Email Link Clicked",
    "Email Bounced", "Ticket Opened", "Ticket Resolved", "Ticket Closed", "Loyalty Points Earned",
    "Loyalty Tier Changed", "Consent Updated", "Unsubscribed", "Page Viewed",
])
_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["a", "b", "gold", ""]),
                   st.floats(0, 100, allow_nan=False).map(lambda f: round(f, 3)))
_properties = st.fixed_dictionaries({}, optional={
    "revenue": st.floats(0, 500, allow_nan=False), "total": st.floats(0, 50, allow_nan=False),
    "ticket_id": st.sampled_from(["t1", "t2"]), "tier": st.sampled_from(["silver", "gold", "bronze"]),
    "points": st.integers(-50, 200), "balance": st.integers(0, 500), "channel": st.sampled_from(["email", "sms"]),
    "purpose": st.sampled_from(["marketing", "transactional"]), "granted": st.booleans(),
    "products": st.lists(st.fixed_dictionaries({"category": st.sampled_from(["shoes", "hats"]),
                                                "quantity": st.integers(1, 3)}), max_size=2),
})
# Few distinct times, so equal event times (the hard case for last-writer-wins) are common.
_events = st.lists(
    st.builds(
        Observed,
        at=st.integers(0, 2).map(at),
        name=_names,
        type=st.sampled_from(["track", "track", "identify"]),
        properties=_properties,
        traits=st.dictionaries(st.sampled_from(["plan", "city", "vip"]), _value, max_size=2),
        consent=st.dictionaries(st.sampled_from(["email", "sms.marketing", "push"]), st.booleans(), max_size=2),
        identifiers=st.lists(st.tuples(st.sampled_from(["email", "user_id"]), st.sampled_from(["x", "y"])),
                             max_size=2).map(tuple),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(events=_events, data=st.data())
def test_any_arrival_order_gives_the_same_profile(events: list[Observed], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(events))
    assert folded(*shuffled) == folded(*events)


@settings(max_examples=300, deadline=None)
@given(events=_events, data=st.data())
def test_folding_two_parts_and_merging_equals_folding_all(events: list[Observed], data: st.DataObject) -> None:
    split = data.draw(st.integers(0, len(events)))
    first, second = folded(*events[:split]), folded(*events[split:])
    assert combine(first, second) == folded(*events)
    assert combine(second, first) == folded(*events)


@settings(max_examples=100, deadline=None)
@given(events=_events, data=st.data())
def test_merging_profiles_then_adding_events_is_order_free(events: list[Observed], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(events)))
    survivor = fold(ProfileState("p"), events[:cut])
    other = fold(ProfileState("q"), events[cut:])
    merged = merge(survivor, [other])
    assert merged.merged_ids == ("q",)
    assert replace(merged, merged_ids=()) == folded(*events)


# Only last-writer-wins events at two moments: ties on every register, every time.
_ties = st.lists(
    st.builds(
        Observed,
        at=st.integers(0, 1).map(at),
        name=st.sampled_from(["Ticket Opened", "Ticket Resolved", "Ticket Closed", "Loyalty Tier Changed",
                              "Loyalty Points Earned", "Consent Updated", "Unsubscribed"]),
        properties=st.fixed_dictionaries({
            "ticket_id": st.just("t1"), "tier": st.sampled_from(["silver", "gold"]),
            "points": st.integers(0, 9), "balance": st.integers(0, 9), "channel": st.just("email"),
            "purpose": st.just("marketing"), "granted": st.booleans(),
        }),
        traits=st.dictionaries(st.just("plan"), _value, max_size=1),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(events=_ties, data=st.data())
def test_equal_event_times_resolve_the_same_in_any_order(events: list[Observed], data: st.DataObject) -> None:
    assert folded(*data.draw(st.permutations(events))) == folded(*events)


@settings(max_examples=100, deadline=None)
@given(events=_events)
def test_states_built_without_init_equal_the_dataclass_built_ones(events: list[Observed]) -> None:
    state = folded(*events)
    assert state == ProfileState(**vars(state))
    scores = Scores(Score("active", 1.0, ("two orders",)))
    assert with_scores(state, scores) == replace(state, scores=scores)


def test_a_state_from_fields_refuses_missing_or_unknown_fields() -> None:
    fields = vars(ProfileState("p"))
    with pytest.raises(TypeError, match=r"missing \['scores'\]"):
        from_fields({k: v for k, v in fields.items() if k != "scores"})
    with pytest.raises(TypeError, match=r"unknown \['revenue'\]"):
        from_fields({**fields, "revenue": 1.0})
