"""cdp_ingest.core, and gRPC requests through to the envelope: what makes an event acceptable."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cdp.ingest.v1 import ingest_pb2
from cdp.v1 import event_pb2
from cdp_common import convert
from cdp_ingest import core
from cdp_ingest.api import to_incoming
from cdp_ingest.ingestor import build_event
from cdp_ingest.core import InvalidField

RECEIVED = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def field_of(call: Any, *args: Any) -> str:
    with pytest.raises(InvalidField) as caught:
        call(*args)
    assert str(caught.value).startswith(caught.value.field + ": ")
    return caught.value.field


# --- event_id ----------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["evt-1", "a", "A.b_c:d-e", "x" * 128, str(uuid.uuid4())])
def test_a_client_event_id_is_kept_for_deduplication(requested: str) -> None:
    assert core.event_id(requested, "generated") == requested


def test_without_a_client_id_a_new_one_is_used() -> None:
    assert core.event_id("", "generated") == "generated"
    first, second = core.event_id(""), core.event_id("")
    assert first != second
    assert str(uuid.UUID(first)) == first


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "slash/id", "star*", "é", "a\tb"])
def test_a_malformed_event_id_is_refused(bad: str) -> None:
    assert field_of(core.event_id, bad) == "event_id"


def test_an_event_id_with_a_trailing_newline_is_refused() -> None:
    assert field_of(core.event_id, "evt-1\n") == "event_id"


# --- check_identifiers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "custom"),
    [
        ({"user_id": "u1"}, {}),
        ({"anonymous_id": "a1"}, {}),
        ({"user_id": "u1", "email": "ada@example.com", "phone": "+1555"}, {"loyalty_id": "L1"}),
        ({"anonymous_id": "a1"}, {"email_sha256": "ab" * 32}),
    ],
)
def test_acceptable_identifiers(ids: dict[str, str], custom: dict[str, str]) -> None:
    core.check_identifiers(ids, custom)


@pytest.mark.parametrize(
    ("ids", "custom", "field"),
    [
        ({}, {}, "identifiers"),
        ({"email": "ada@example.com"}, {}, "identifiers"),
        ({"device_id": "d1"}, {"loyalty_id": "L1"}, "identifiers"),
        ({"user_id": "", "anonymous_id": ""}, {}, "identifiers"),
        ({"user_id": "u1", "email": "ada.example.com"}, {}, "identifiers.email"),
        ({"user_id": " u1"}, {}, "identifiers.user_id"),
        ({"user_id": "u1", "anonymous_id": "a1\n"}, {}, "identifiers.anonymous_id"),
        ({"user_id": "u" * 257}, {}, "identifiers.user_id"),
        ({"user_id": "u1"}, {"loyalty_id": "L" * 257}, "identifiers.custom.loyalty_id"),
        ({"user_id": "u1"}, {"loyalty_id": " L1"}, "identifiers.custom.loyalty_id"),
        ({"user_id": "u1"}, {"Loyalty": "L1"}, "identifiers.custom.Loyalty"),
        ({"user_id": "u1"}, {"crm-id": "c"}, "identifiers.custom.crm-id"),
        ({"user_id": "u1"}, {"email": "ada@example.com"}, "identifiers.custom.email"),
    ],
)
def test_unacceptable_identifiers_name_the_field(ids: dict[str, str], custom: dict[str, str], field: str) -> None:
    assert field_of(core.check_identifiers, ids, custom) == field


def test_an_identifier_of_exactly_the_limit_is_accepted() -> None:
    core.check_identifiers({"user_id": "u" * core.MAX_ID_LENGTH}, {})


# --- name, fields, time, email -----------------------------------------------------------------


def test_the_event_name_is_trimmed() -> None:
    assert core.check_name("  Order Completed ") == "Order Completed"


@pytest.mark.parametrize("bad", ["", "   ", "x" * 201])
def test_a_missing_or_overlong_event_name_names_event(bad: str) -> None:
    assert field_of(core.check_name, bad) == "event"


def test_too_many_properties_are_refused() -> None:
    core.check_fields("properties", {str(i): i for i in range(core.MAX_FIELDS)})
    assert field_of(core.check_fields, "properties", {str(i): i for i in range(core.MAX_FIELDS + 1)}) == "properties"


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (None, RECEIVED),
        (RECEIVED - timedelta(days=3), RECEIVED - timedelta(days=3)),
        (RECEIVED + timedelta(hours=23), RECEIVED + timedelta(hours=23)),
        (RECEIVED - timedelta(days=365 * 4), RECEIVED - timedelta(days=365 * 4)),
    ],
)
def test_a_plausible_client_time_is_the_event_time(client: datetime | None, expected: datetime) -> None:
    assert core.occurred_at(client, RECEIVED) == expected


@pytest.mark.parametrize("client", [RECEIVED + timedelta(hours=25), RECEIVED - timedelta(days=365 * 5 + 1)])
def test_an_implausible_client_time_names_timestamp(client: datetime) -> None:
    assert field_of(core.occurred_at, client, RECEIVED) == "timestamp"


@pytest.mark.parametrize(
    ("ids", "traits", "email"),
    [
        ({}, {"email": " ada@example.com "}, "ada@example.com"),
        ({"email": "bob@example.com"}, {"email": "ada@example.com"}, "bob@example.com"),
        ({}, {"email": 42}, ""),
        ({}, {}, ""),
    ],
)
def test_email_from_traits(ids: dict[str, str], traits: dict[str, Any], email: str) -> None:
    assert core.email_from_traits(ids, traits) == email


# --- requests to envelopes ----------------------------------------------------------------------


def to_event(kind: str, request: Any) -> event_pb2.Event:
    """What the gRPC servicer does with a request, without the log."""
    return build_event(to_incoming(kind, request), received_at=datetime.now(UTC),
                       source=getattr(request, "source", "") or "grpc")


def _ts(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


def track(**kw: Any) -> ingest_pb2.TrackRequest:
    kw.setdefault("identifiers", event_pb2.Identifiers(user_id="u1"))
    kw.setdefault("event", "Product Viewed")
    return ingest_pb2.TrackRequest(**kw)


def identify(**kw: Any) -> ingest_pb2.IdentifyRequest:
    kw.setdefault("identifiers", event_pb2.Identifiers(user_id="u1"))
    return ingest_pb2.IdentifyRequest(**kw)


def test_a_track_request_becomes_a_track_event() -> None:
    request = track(event_id="evt-1", event=" Order Completed ", source="web",
                    identifiers=event_pb2.Identifiers(anonymous_id="a1", custom={"loyalty_id": "L1"}),
                    properties=convert.dict_to_struct({"order_id": "o1", "revenue": 19.99, "sku": "X"}),
                    consent={"email": True})
    when = datetime.now(UTC) - timedelta(hours=2)
    request.timestamp.CopyFrom(_ts(when))
    event = to_event("track", request)
    assert event.id == "evt-1"
    assert event.type == "track"
    assert event.name == "Order Completed"
    assert event.source == "web"
    assert event.identifiers.anonymous_id == "a1"
    assert dict(event.identifiers.custom) == {"loyalty_id": "L1"}
    assert convert.struct_to_dict(event.properties) == {"order_id": "o1", "revenue": 19.99, "sku": "X"}
    assert dict(event.consent) == {"email": True}
    assert convert.to_datetime(event.occurred_at) == when
    assert convert.to_datetime(event.received_at) is not None


def test_without_a_client_time_the_event_happened_when_received() -> None:
    event = to_event("track", track())
    assert event.occurred_at == event.received_at
    assert event.source == "grpc"
    assert str(uuid.UUID(event.id)) == event.id


def test_identify_copies_the_email_trait_into_the_identifiers() -> None:
    request = identify(traits=convert.dict_to_struct({"email": "  Ada@Example.com ", "name": "Ada"}))
    event = to_event("identify", request)
    assert event.type == "identify"
    assert event.identifiers.email == "Ada@Example.com"
    assert event.identifiers.user_id == "u1"
    assert convert.struct_to_dict(event.traits)["name"] == "Ada"


def test_identify_keeps_an_explicit_email_identifier() -> None:
    request = identify(identifiers=event_pb2.Identifiers(user_id="u1", email="bob@example.com"),
                       traits=convert.dict_to_struct({"email": "ada@example.com"}))
    assert to_event("identify", request).identifiers.email == "bob@example.com"


def test_track_does_not_take_an_email_from_properties() -> None:
    request = track(properties=convert.dict_to_struct({"email": "ada@example.com"}))
    assert to_event("track", request).identifiers.email == ""


def test_event_ids_are_fresh_per_request() -> None:
    assert to_event("track", track()).id != to_event("track", track()).id


@pytest.mark.parametrize(
    ("kind", "request_", "field"),
    [
        ("track", track(identifiers=event_pb2.Identifiers()), "identifiers"),
        ("track", track(identifiers=event_pb2.Identifiers(email="ada@example.com")), "identifiers"),
        ("track", track(event="  "), "event"),
        ("track", track(event_id="bad id"), "event_id"),
        ("track", track(identifiers=event_pb2.Identifiers(user_id="u1", email="nope")), "identifiers.email"),
        ("track", track(identifiers=event_pb2.Identifiers(user_id="u1", custom={"Bad": "x"})),
         "identifiers.custom.Bad"),
        ("track", track(identifiers=event_pb2.Identifiers(user_id="u1", custom={"phone": "x"})),
         "identifiers.custom.phone"),
        ("track", track(identifiers=event_pb2.Identifiers(user_id="u1 ")), "identifiers.user_id"),
        ("identify", identify(identifiers=event_pb2.Identifiers()), "identifiers"),
        ("identify", identify(traits=convert.dict_to_struct({"email": "not-an-email"})), "traits.email"),
        ("identify", identify(event_id="x" * 129), "event_id"),
    ],
)
def test_invalid_requests_name_the_field(kind: str, request_: Any, field: str) -> None:
    assert field_of(to_event, kind, request_) == field


@pytest.mark.parametrize(("offset", "ok"), [(timedelta(days=2), False), (-timedelta(days=365 * 6), False),
                                            (timedelta(hours=1), True), (-timedelta(days=30), True)])
def test_the_client_timestamp_is_checked(offset: timedelta, ok: bool) -> None:
    request = track()
    request.timestamp.CopyFrom(_ts(datetime.now(UTC) + offset))
    if ok:
        to_event("track", request)
    else:
        assert field_of(to_event, "track", request) == "timestamp"


def test_too_many_traits_are_refused() -> None:
    request = identify(traits=convert.dict_to_struct({f"t{i}": i for i in range(core.MAX_FIELDS + 1)}))
    assert field_of(to_event, "identify", request) == "traits"
