"""Segment-spec JSON through `core.from_segment` and `core.accept`: what the HTTP collector stores."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_ingest import core
from cdp_ingest.core import InvalidField

RECEIVED = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
WHEN = "2024-06-01T11:30:00Z"


def accepted(payload: Any, kind: str | None = None, batch_sent_at: datetime | None = None) -> core.Accepted:
    return core.accept(core.from_segment(payload, kind, batch_sent_at), RECEIVED)


def rejected(payload: Any, kind: str | None = None) -> InvalidField:
    """The error for a payload refused by either step; its message starts with the field."""
    with pytest.raises(InvalidField) as caught:
        accepted(payload, kind)
    error = caught.value
    assert str(error).startswith(error.field + ": "), str(error)
    return error


# --- each call type ------------------------------------------------------------------------------


def test_track_keeps_event_name_properties_context_and_message_id() -> None:
    event = accepted({
        "type": "track", "messageId": "m-1", "userId": "u1", "anonymousId": "a1", "event": "Product Viewed",
        "properties": {"product_id": "p1", "price": 9.5}, "context": {"ip": "10.0.0.1"},
        "timestamp": WHEN, "consent": {"analytics": True, "ads": 0},
    })
    assert (event.kind, event.event_id, event.name) == ("track", "m-1", "Product Viewed")
    assert event.ids == {"user_id": "u1", "anonymous_id": "a1"}
    assert event.properties == {"product_id": "p1", "price": 9.5}
    assert event.context == {"ip": "10.0.0.1"}
    assert event.consent == {"analytics": True, "ads": False}
    assert event.traits == {}
    assert event.occurred_at == datetime(2024, 6, 1, 11, 30, tzinfo=UTC)


def test_the_endpoint_decides_the_type_over_the_body() -> None:
    event = accepted({"type": "identify", "userId": "u1", "event": "Signed Up"}, kind="track")
    assert (event.kind, event.name) == ("track", "Signed Up")


def test_identify_keeps_user_traits_and_takes_the_email_trait_as_an_identifier() -> None:
    event = accepted({"type": "identify", "userId": "u1",
                      "traits": {"email": " Ada@Example.com ", "first_name": "Ada", "plan": "pro"}})
    assert event.kind == "identify"
    assert event.traits == {"email": " Ada@Example.com ", "first_name": "Ada", "plan": "pro"}
    assert event.ids == {"user_id": "u1", "email": "Ada@Example.com"}


def test_an_identify_with_a_bad_email_trait_names_traits_email() -> None:
    assert rejected({"type": "identify", "userId": "u1", "traits": {"email": "nope"}}).field == "traits.email"


@pytest.mark.parametrize("kind", ["track", "page", "screen", "group", "alias"])
def test_only_identify_sets_user_traits(kind: str) -> None:
    payload = {"type": kind, "userId": "u1", "event": "Clicked", "groupId": "g1", "previousId": "a1",
               "traits": {"email": "someone@example.com", "plan": "pro"}}
    event = accepted(payload)
    assert event.traits == {}
    assert "email" not in event.ids


def test_alias_links_the_previous_id_to_the_user() -> None:
    event = accepted({"type": "alias", "messageId": "al-1", "previousId": "anon-7", "userId": "u1"})
    assert (event.kind, event.name) == ("alias", "")
    assert event.properties == {"previous_id": "anon-7"}
    # Identity links the previous (anonymous) id to the user through the identifiers.
    assert event.ids == {"user_id": "u1", "anonymous_id": "anon-7"}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"type": "alias", "userId": "u1"}, "previous_id"),
        ({"type": "alias", "previousId": "   ", "userId": "u1"}, "previous_id"),
        ({"type": "alias", "previousId": "anon-7", "anonymousId": "anon-8"}, "identifiers.user_id"),
    ],
)
def test_a_bad_alias_names_the_field(payload: dict[str, Any], field: str) -> None:
    error = rejected(payload)
    assert error.field == field
    assert core.segment_field(error.field) in ("previousId", "userId")


def test_page_keeps_its_name_and_category() -> None:
    event = accepted({"type": "page", "anonymousId": "a1", "name": "Pricing", "category": "Docs",
                      "properties": {"url": "https://example.com/pricing", "title": "Pricing"}})
    assert (event.kind, event.name) == ("page", "Pricing")
    assert event.properties == {"url": "https://example.com/pricing", "title": "Pricing", "category": "Docs"}


def test_a_page_without_a_name_is_fine() -> None:
    event = accepted({"type": "page", "anonymousId": "a1"})
    assert (event.kind, event.name, event.properties) == ("page", "", {})


def test_screen_keeps_its_name_and_properties() -> None:
    event = accepted({"type": "screen", "userId": "u1", "name": "Home", "properties": {"variant": "b"}})
    assert (event.kind, event.name, event.properties) == ("screen", "Home", {"variant": "b"})


def test_group_traits_are_the_groups_not_the_users() -> None:
    event = accepted({"type": "group", "userId": "u1", "groupId": "acme",
                      "traits": {"name": "Acme Inc", "employees": 120}})
    assert event.kind == "group"
    assert event.properties == {"group_id": "acme", "group_traits": {"name": "Acme Inc", "employees": 120}}
    assert event.traits == {}


def test_a_group_without_group_id_names_group_id() -> None:
    error = rejected({"type": "group", "userId": "u1", "traits": {"name": "Acme"}})
    assert error.field == "group_id"
    assert core.segment_field(error.field) == "groupId"


# --- identifiers and ids -------------------------------------------------------------------------


@pytest.mark.parametrize(("user_id", "text"), [(42, "42"), (1234567890123, "1234567890123"), (7.5, "7.5")])
def test_a_numeric_user_id_is_accepted_as_text(user_id: float, text: str) -> None:
    event = accepted({"type": "track", "userId": user_id, "anonymousId": 9, "event": "x"})
    assert event.ids == {"user_id": text, "anonymous_id": "9"}


@pytest.mark.parametrize("bad", [True, ["u1"], {"id": "u1"}])
def test_a_user_id_that_is_not_text_or_number_names_user_id(bad: Any) -> None:
    error = rejected({"type": "track", "userId": bad, "event": "x"})
    assert error.field == "identifiers.user_id"
    assert core.segment_field(error.field) == "userId"


def test_a_message_without_user_or_anonymous_id_says_so_in_segments_words() -> None:
    error = rejected({"type": "track", "event": "x", "userId": "", "anonymousId": None})
    assert error.field == "identifiers"
    assert core.segment_field(error.field) == "userId or anonymousId"


def test_the_message_id_is_kept_so_a_retry_is_deduplicated() -> None:
    assert accepted({"type": "track", "userId": "u1", "event": "x", "messageId": "ajs-next-1717"}).event_id == "ajs-next-1717"
    # Without one, each message gets a fresh id.
    first = accepted({"type": "track", "userId": "u1", "event": "x"}).event_id
    second = accepted({"type": "track", "userId": "u1", "event": "x"}).event_id
    assert first and second and first != second


def test_a_malformed_message_id_names_message_id() -> None:
    error = rejected({"type": "track", "userId": "u1", "event": "x", "messageId": "has a space"})
    assert core.segment_field(error.field) == "messageId"


# --- times ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-06-01T11:30:00Z", datetime(2024, 6, 1, 11, 30, tzinfo=UTC)),
        ("2024-06-01T11:30:00.250Z", datetime(2024, 6, 1, 11, 30, 0, 250000, tzinfo=UTC)),
        ("2024-06-01T13:30:00+02:00", datetime(2024, 6, 1, 11, 30, tzinfo=UTC)),
    ],
)
def test_iso_timestamps_with_a_time_zone_are_the_event_time(text: str, expected: datetime) -> None:
    assert accepted({"type": "track", "userId": "u1", "event": "x", "timestamp": text}).occurred_at == expected


def test_original_timestamp_is_used_when_timestamp_is_missing() -> None:
    event = accepted({"type": "track", "userId": "u1", "event": "x", "originalTimestamp": WHEN})
    assert event.occurred_at == datetime(2024, 6, 1, 11, 30, tzinfo=UTC)


def test_without_a_timestamp_the_event_happened_when_received() -> None:
    assert accepted({"type": "track", "userId": "u1", "event": "x"}).occurred_at == RECEIVED


@pytest.mark.parametrize("field", ["timestamp", "sentAt"])
@pytest.mark.parametrize("bad", ["2024-06-01T11:30:00", "2024-06-01", "yesterday", 1717241400])
def test_a_time_without_a_zone_or_not_iso_is_refused_by_name(field: str, bad: Any) -> None:
    error = rejected({"type": "track", "userId": "u1", "event": "x", field: bad})
    assert core.segment_field(error.field) == field
    if bad == "2024-06-01T11:30:00":
        assert "time zone" in error.reason


def test_clock_skew_is_removed_with_sent_at() -> None:
    # The client's clock is 3 hours fast: it says it sent at 15:00 what happened at 14:55.
    event = accepted({"type": "track", "userId": "u1", "event": "x",
                      "timestamp": "2024-06-01T14:55:00Z", "sentAt": "2024-06-01T15:00:00Z"})
    assert event.occurred_at == RECEIVED - timedelta(minutes=5)


def test_a_skewed_clock_is_not_refused_as_future_when_sent_at_explains_it() -> None:
    payload = {"type": "track", "userId": "u1", "event": "x", "timestamp": "2024-06-03T12:00:00Z"}
    assert rejected(payload).field == "timestamp"
    event = accepted({**payload, "sentAt": "2024-06-03T12:00:01Z"})
    assert event.occurred_at == RECEIVED - timedelta(seconds=1)


def test_the_batch_sent_at_applies_to_messages_without_their_own() -> None:
    batch_sent_at = datetime(2024, 6, 1, 9, 0, tzinfo=UTC)  # the client's clock is 3 hours slow
    own = accepted({"type": "track", "userId": "u1", "event": "x", "timestamp": "2024-06-01T08:50:00Z"},
                   batch_sent_at=batch_sent_at)
    assert own.occurred_at == RECEIVED - timedelta(minutes=10)
    overridden = accepted({"type": "track", "userId": "u1", "event": "x", "timestamp": "2024-06-01T08:50:00Z",
                           "sentAt": "2024-06-01T08:51:00Z"}, batch_sent_at=batch_sent_at)
    assert overridden.occurred_at == RECEIVED - timedelta(minutes=1)


def test_an_implausible_timestamp_is_refused() -> None:
    assert rejected({"type": "track", "userId": "u1", "event": "x", "timestamp": "2015-01-01T00:00:00Z"}).field == "timestamp"
    assert rejected({"type": "track", "userId": "u1", "event": "x", "timestamp": "2024-06-03T12:00:00Z"}).field == "timestamp"


@pytest.mark.parametrize(("timestamp", "sent_at"), [("0001-01-01T00:00:00Z", "9999-12-31T00:00:00Z"),
                                                     ("9999-12-31T00:00:00Z", "0001-01-01T00:00:00Z")])
def test_extreme_clock_skew_is_refused_as_a_bad_timestamp(timestamp: str, sent_at: str) -> None:
    error = rejected({"type": "track", "userId": "u1", "event": "x", "timestamp": timestamp, "sentAt": sent_at})
    assert error.field == "timestamp"


# --- semantic events -----------------------------------------------------------------------------


def test_a_complete_order_is_accepted_with_its_typed_properties() -> None:
    properties = {"order_id": "o-1", "revenue": 25, "currency": "EUR",
                  "products": [{"product_id": "p1", "price": 12.5, "quantity": 2}]}
    event = accepted({"type": "track", "userId": "u1", "event": "Order Completed", "properties": properties})
    assert event.properties == properties


@pytest.mark.parametrize(
    ("event", "properties", "field"),
    [
        ("Order Completed", {"revenue": 10}, "properties.order_id"),
        ("Order Completed", {"order_id": "o-1", "revenue": "10.00"}, "properties.revenue"),
        ("Order Completed", {"order_id": "o-1", "revenue": True}, "properties.revenue"),
        ("Order Completed", {"order_id": 17}, "properties.order_id"),
        ("Order Completed", {"order_id": "o-1", "products": [{"price": 1}, {"price": "9.99"}]},
         "properties.products[1].price"),
        ("Order Completed", {"order_id": "o-1", "products": [{"quantity": 1.5}]}, "properties.products[0].quantity"),
        ("Order Completed", {"order_id": "o-1", "products": ["p1"]}, "properties.products[0]"),
        ("Order Completed", {"order_id": "o-1", "products": {"price": 1}}, "properties.products"),
        ("Loyalty Points Earned", {"points": 10.5}, "properties.points"),
        ("Loyalty Points Earned", {"points": "10"}, "properties.points"),
        ("Loyalty Points Earned", {}, "properties.points"),
        ("Ticket Opened", {"channel": "email"}, "properties.ticket_id"),
    ],
)
def test_a_semantic_event_with_a_wrong_property_names_it(event: str, properties: dict[str, Any], field: str) -> None:
    error = rejected({"type": "track", "userId": "u1", "event": event, "properties": properties})
    assert error.field == field
    assert event in error.reason or field.startswith("properties.products[")
    # The property path reads the same in Segment's words.
    assert core.segment_field(field) == field


def test_whole_number_points_are_an_integer() -> None:
    event = accepted({"type": "track", "userId": "u1", "event": "Loyalty Points Earned",
                      "properties": {"points": 100, "balance": 250.0}})
    assert event.properties == {"points": 100, "balance": 250.0}


def test_unknown_event_names_are_free_form() -> None:
    properties = {"order_id": 5, "revenue": "lots", "points": 1.5, "products": "none"}
    event = accepted({"type": "track", "userId": "u1", "event": "Order Completed Elsewhere",
                      "properties": properties})
    assert (event.name, event.properties) == ("Order Completed Elsewhere", properties)


def test_semantic_rules_apply_to_track_only() -> None:
    event = accepted({"type": "page", "userId": "u1", "name": "Order Completed", "properties": {"revenue": "x"}})
    assert event.properties == {"revenue": "x"}


# --- malformed messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ([1, 2], "event"),
        ("track", "event"),
        ({"userId": "u1", "event": "x"}, "type"),
        ({"type": "purchase", "userId": "u1"}, "type"),
        ({"type": "track", "userId": "u1"}, "event"),
        ({"type": "track", "userId": "u1", "event": "x", "properties": [1]}, "properties"),
        ({"type": "track", "userId": "u1", "event": "x", "context": "web"}, "context"),
        ({"type": "identify", "userId": "u1", "traits": "vip"}, "traits"),
        ({"type": "track", "userId": "u1", "event": "x", "externalIds": {"Bad Name": "1"}},
         "identifiers.custom.Bad Name"),
    ],
)
def test_a_malformed_message_names_the_field(payload: Any, field: str) -> None:
    assert rejected(payload).field == field


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("event_id", "messageId"),
        ("identifiers", "userId or anonymousId"),
        ("identifiers.user_id", "userId"),
        ("identifiers.anonymous_id", "anonymousId"),
        ("previous_id", "previousId"),
        ("group_id", "groupId"),
        ("sent_at", "sentAt"),
        ("timestamp", "timestamp"),
        ("event", "event"),
        ("traits.email", "traits.email"),
        ("properties.products[0].price", "properties.products[0].price"),
    ],
)
def test_segment_field_speaks_segments_names(ours: str, theirs: str) -> None:
    assert core.segment_field(ours) == theirs


@pytest.mark.parametrize(("ours", "not_theirs"), [("identifiers.email", "userId.email"),
                                                  ("identifiers.custom.loyalty_id", "userId.custom.loyalty_id")])
def test_segment_field_does_not_call_other_identifiers_user_id(ours: str, not_theirs: str) -> None:
    assert not core.segment_field(ours).startswith("userId")


# --- any JSON at all -----------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
_KEYS = st.sampled_from([
    "type", "userId", "anonymousId", "messageId", "event", "name", "category", "properties", "traits",
    "context", "timestamp", "originalTimestamp", "sentAt", "previousId", "groupId", "externalIds", "consent",
    "email", "phone", "device_id", "writeKey",
])
_TIMES = st.sampled_from(["2024-06-01T11:30:00Z", "2024-06-01T11:30:00", "2024-06-01T11:30:00+02:00", "soon", ""])
_PLAUSIBLE = st.fixed_dictionaries(
    {"type": st.sampled_from(core.KINDS), "userId": st.text(max_size=5) | st.integers(),
     "event": st.sampled_from(["Clicked", "Order Completed", "Loyalty Points Earned", ""]),
     "previousId": st.text(max_size=5), "groupId": st.text(max_size=5)},
    optional={"anonymousId": st.text(max_size=5), "messageId": st.text(max_size=5),
              "properties": st.dictionaries(st.sampled_from(["order_id", "revenue", "points", "products"]), _JSON),
              "traits": st.dictionaries(st.sampled_from(["email", "name"]), _JSON),
              "timestamp": _TIMES, "sentAt": _TIMES},
)
# A plausible message with some fields replaced by anything, or any JSON object at all.
_MESSAGE = st.builds(lambda base, noise: {**base, **noise}, _PLAUSIBLE,
                     st.dictionaries(_KEYS, _JSON | _TIMES | st.sampled_from(core.KINDS), max_size=3))


@settings(max_examples=300, deadline=None, database=None)
@given(payload=_MESSAGE | st.dictionaries(_KEYS, _JSON) | _JSON, kind=st.none() | st.sampled_from(core.KINDS))
def test_any_json_is_an_event_or_a_named_invalid_field(payload: Any, kind: str | None) -> None:
    """Whatever a client posts, the collector answers 200 or 400 naming a field, never 500."""
    json.dumps(payload)  # only JSON values
    try:
        event = accepted(payload, kind)
    except InvalidField as error:
        assert error.field and str(error).startswith(error.field + ": ")
        assert core.segment_field(error.field)
    else:
        assert event.kind in core.KINDS
        assert event.ids.get("user_id") or event.ids.get("anonymous_id")
        assert all(isinstance(v, str) and v for v in event.ids.values())
