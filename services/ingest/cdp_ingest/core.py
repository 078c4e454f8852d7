"""What makes an incoming event acceptable, whatever door it came through; pure, no I/O.

gRPC requests and Segment-style JSON both become an `Incoming`; `accept` validates it and
returns the `Accepted` event, or raises `InvalidField` naming what is wrong.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from cdp_common import identifiers
from cdp_common.identifiers import valid_custom_type

KINDS = ("track", "identify", "alias", "page", "screen", "group")
BUILT_IN_IDS = identifiers.TYPES
MAX_ID_LENGTH = 256
MAX_NAME_LENGTH = 200
MAX_FIELDS = 500
# Segment refuses events over 32 KB; so do we (measured as the stored envelope).
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_EVENTS = 2500
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_FUTURE = timedelta(hours=24)
MAX_PAST = timedelta(days=365 * 5)
_EVENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# The read models are PostgreSQL, whose text and jsonb cannot hold U+0000: such an event could
# never be applied downstream, so it is refused here rather than dead-lettered there.
NUL_REASON = "contains a NUL character (U+0000)"
# Objects and arrays inside properties, traits or context. The envelope is protobuf, which is
# parsed only to a depth of 100 messages (about 30 levels of JSON): a deeper event would be
# stored and then be undecodable by every consumer. (A gRPC request cannot get that deep.)
MAX_NESTING = 16


class InvalidField(ValueError):
    """A request field is missing or malformed; `field` names it for the caller."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


_EMPTY: Mapping[str, Any] = MappingProxyType({})


# Named tuples, not dataclasses: thousands are made per second on the hot path, and a frozen
# dataclass costs several times more to build.
class Incoming(NamedTuple):
    """One event as a client sent it, before validation."""

    kind: str
    event_id: str = ""
    ids: Mapping[str, str] = _EMPTY
    custom: Mapping[str, str] = _EMPTY
    # The track event name, or the page/screen name.
    name: str = ""
    properties: Mapping[str, Any] = _EMPTY
    traits: Mapping[str, Any] = _EMPTY
    timestamp: datetime | None = None
    sent_at: datetime | None = None
    context: Mapping[str, Any] = _EMPTY
    consent: Mapping[str, bool] = _EMPTY
    previous_id: str = ""
    group_id: str = ""
    category: str = ""
    # The source a client names itself; used only when no write keys are configured.
    source: str = ""


class Accepted(NamedTuple):
    """A valid event, ready for the envelope."""

    kind: str
    event_id: str
    ids: Mapping[str, str]
    custom: Mapping[str, str]
    name: str
    properties: Mapping[str, Any]
    # User traits: only identify sets them (a group's traits are the group's, in properties).
    traits: Mapping[str, Any]
    occurred_at: datetime
    context: Mapping[str, Any]
    consent: Mapping[str, bool]


def event_id(requested: str, new_id: str | None = None) -> str:
    """The client's id (kept so a retry is deduplicated) or a new one."""
    if not requested:
        return new_id or str(uuid.uuid4())
    if not _EVENT_ID.fullmatch(requested):
        raise InvalidField("event_id", "must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    return requested


def check_identifiers(ids: Mapping[str, str], custom: Mapping[str, str]) -> None:
    """Segment's rule: every event names the user (user_id) or the visitor (anonymous_id)."""
    for name, value in [*ids.items(), *(("custom." + k, v) for k, v in custom.items())]:
        if not isinstance(value, str):
            raise InvalidField(f"identifiers.{name}", "must be a string")
        if len(value) > MAX_ID_LENGTH:
            raise InvalidField(f"identifiers.{name}", f"longer than {MAX_ID_LENGTH} characters")
        if value != value.strip():
            raise InvalidField(f"identifiers.{name}", "has leading or trailing whitespace")
        if "\x00" in value:
            raise InvalidField(f"identifiers.{name}", NUL_REASON)
    for name in custom:
        if not valid_custom_type(name):
            raise InvalidField(
                f"identifiers.custom.{name}", "custom id names are lower-case snake_case, not a built-in type"
            )
    if not ids.get("user_id") and not ids.get("anonymous_id"):
        raise InvalidField("identifiers", "user_id or anonymous_id is required")
    email = ids.get("email", "")
    if email and "@" not in email:
        raise InvalidField("identifiers.email", "is not an email address")


def check_name(name: str, field_name: str = "event", required: bool = True) -> str:
    if required and not name.strip():
        raise InvalidField(field_name, "is required")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidField(field_name, f"longer than {MAX_NAME_LENGTH} characters")
    if "\x00" in name:
        raise InvalidField(field_name, NUL_REASON)
    return name.strip()


def check_fields(field_name: str, values: Mapping[str, Any]) -> None:
    if len(values) > MAX_FIELDS:
        raise InvalidField(field_name, f"more than {MAX_FIELDS} entries")


def occurred_at(client_time: datetime | None, received_at: datetime, sent_at: datetime | None = None) -> datetime:
    """When it happened, in server time.

    With sent_at, the client's clock skew is removed the way Segment does it:
    received_at - (sent_at - timestamp). Without a timestamp, the receive time.
    """
    if client_time is None:
        return received_at
    if sent_at is not None:
        try:
            client_time = received_at - (sent_at - client_time)
        except OverflowError:
            raise InvalidField("timestamp", "is out of range once corrected by sent_at") from None
    if client_time - received_at > MAX_FUTURE:
        raise InvalidField("timestamp", "is more than 24 hours in the future")
    if received_at - client_time > MAX_PAST:
        raise InvalidField("timestamp", "is more than 5 years in the past")
    return client_time


def email_from_traits(ids: Mapping[str, str], traits: Mapping[str, Any]) -> str:
    """Segment sends the email as a trait; it is also an identifier."""
    email = ids.get("email") or traits.get("email") or ""
    return email.strip() if isinstance(email, str) else ""


# --- semantic events: the sources the product promises, with typed properties -------------------

TEXT, NUMBER, INTEGER, LIST = "text", "number", "integer", "list"
_PRODUCT = {"product_id": TEXT, "sku": TEXT, "name": TEXT, "category": TEXT, "price": NUMBER, "quantity": INTEGER}

# name -> {property: (type, required)}; documented in docs/events.md.
SEMANTIC_EVENTS: dict[str, dict[str, tuple[str, bool]]] = {
    # orders
    "Order Completed": {"order_id": (TEXT, True), "revenue": (NUMBER, False), "total": (NUMBER, False),
                        "currency": (TEXT, False), "products": (LIST, False), "coupon": (TEXT, False)},
    "Order Refunded": {"order_id": (TEXT, True), "total": (NUMBER, False), "currency": (TEXT, False),
                       "products": (LIST, False)},
    # web and app behaviour
    "Product Viewed": {"product_id": (TEXT, False), "sku": (TEXT, False), "price": (NUMBER, False),
                       "category": (TEXT, False)},
    "Cart Updated": {"cart_id": (TEXT, False), "products": (LIST, False), "value": (NUMBER, False)},
    "Checkout Started": {"order_id": (TEXT, False), "value": (NUMBER, False), "products": (LIST, False)},
    # email engagement
    "Email Delivered": {"campaign_id": (TEXT, False), "email_id": (TEXT, False)},
    "Email Opened": {"campaign_id": (TEXT, False), "email_id": (TEXT, False)},
    "Email Link Clicked": {"campaign_id": (TEXT, False), "email_id": (TEXT, False), "link_url": (TEXT, False)},
    "Email Bounced": {"campaign_id": (TEXT, False), "email_id": (TEXT, False), "reason": (TEXT, False)},
    "Unsubscribed": {"campaign_id": (TEXT, False), "list_id": (TEXT, False)},
    # CRM
    "CRM Record Updated": {"record_id": (TEXT, True), "record_type": (TEXT, False)},
    # loyalty
    "Loyalty Points Earned": {"points": (INTEGER, True), "balance": (INTEGER, False), "reason": (TEXT, False)},
    "Loyalty Tier Changed": {"tier": (TEXT, True), "previous_tier": (TEXT, False)},
    # customer service
    "Ticket Opened": {"ticket_id": (TEXT, True), "channel": (TEXT, False), "subject": (TEXT, False)},
    "Ticket Resolved": {"ticket_id": (TEXT, True)},
    "Satisfaction Rated": {"ticket_id": (TEXT, False), "score": (NUMBER, True)},
}


_REQUIRED = {name: [k for k, (_, required) in spec.items() if required] for name, spec in SEMANTIC_EVENTS.items()}


def _is(kind: str, value: Any) -> bool:
    # type() for scalars: bool is an int, and this runs for every typed property. Lists and
    # objects may be read-only views over a request's protobuf Struct, hence the ABCs.
    t = type(value)
    if kind is TEXT:
        return t is str
    if kind is LIST:
        return t is list or (isinstance(value, Sequence) and t is not str)
    if t is int:
        return True
    return t is float and math.isfinite(value) and (kind is NUMBER or value.is_integer())


def check_semantic(name: str, properties: Mapping[str, Any]) -> None:
    spec = SEMANTIC_EVENTS.get(name)
    if spec is None:
        return
    for key in _REQUIRED[name]:
        if properties.get(key) is None:
            raise InvalidField(f"properties.{key}", f"is required for {name!r}")
    for key in spec.keys() & properties.keys():
        value = properties[key]
        if value is None:
            continue
        kind = spec[key][0]
        if not _is(kind, value):
            raise InvalidField(f"properties.{key}", f"must be {'an' if kind == INTEGER else 'a'} {kind} for {name!r}")
        if key == "products":
            for i, product in enumerate(value):
                if not isinstance(product, Mapping):
                    raise InvalidField(f"properties.products[{i}]", "must be an object")
                for pkey in _PRODUCT.keys() & product.keys():
                    if product[pkey] is not None and not _is(_PRODUCT[pkey], product[pkey]):
                        raise InvalidField(f"properties.products[{i}].{pkey}", f"must be a {_PRODUCT[pkey]}")


def accept(item: Incoming, received_at: datetime, new_id: str | None = None) -> Accepted:
    """The valid event, or InvalidField naming the first thing wrong with it."""
    if item.kind not in KINDS:
        raise InvalidField("type", f"must be one of {', '.join(KINDS)}")
    identifier = event_id(item.event_id, new_id)
    if "\x00" in item.source:
        raise InvalidField("source", NUL_REASON)
    for channel in item.consent:
        if "\x00" in channel:
            raise InvalidField("consent", NUL_REASON)
    ids = {k: v for k, v in item.ids.items() if v}
    custom = {k: v for k, v in item.custom.items() if v}
    # Copied only when something is added, so a gRPC Struct travels to the envelope untouched.
    properties: Mapping[str, Any] = item.properties
    traits: Mapping[str, Any] = {}
    name = ""
    if item.kind == "alias":
        previous = check_name(item.previous_id, "previous_id")
        if not ids.get("user_id"):
            raise InvalidField("identifiers.user_id", "is required for alias")
        if len(previous) > MAX_ID_LENGTH:
            raise InvalidField("previous_id", f"longer than {MAX_ID_LENGTH} characters")
        properties = {**properties, "previous_id": previous}
        # The previous id is usually the anonymous id: identity links it to the user.
        ids.setdefault("anonymous_id", previous)
    check_identifiers(ids, custom)
    check_fields("properties", item.properties)
    check_fields("context", item.context)
    if item.kind == "track":
        name = check_name(item.name)
        check_semantic(name, properties)
    elif item.kind in ("page", "screen"):
        name = check_name(item.name, "name", required=False)
        if item.category:
            properties = {**properties, "category": check_name(item.category, "category")}
    elif item.kind == "identify":
        check_fields("traits", item.traits)
        traits = item.traits
        email = email_from_traits(ids, traits)
        if email and "@" not in email:
            raise InvalidField("traits.email", "is not an email address")
        if email:
            ids["email"] = email
    elif item.kind == "group":
        check_fields("traits", item.traits)
        group_traits = dict(item.traits)
        # They go one level down, into properties: from gRPC they may reach protobuf's depth limit.
        if _deeper_than(group_traits, MAX_NESTING):
            raise InvalidField("traits", f"nested deeper than {MAX_NESTING} levels")
        properties = {**properties, "group_id": check_name(item.group_id, "group_id"),
                      "group_traits": group_traits}
    return Accepted(
        kind=item.kind,
        event_id=identifier,
        ids=ids,
        custom=custom,
        name=name,
        properties=properties,
        traits=traits,
        occurred_at=occurred_at(item.timestamp, received_at, item.sent_at),
        context=item.context,
        consent=item.consent,
    )


# --- the Segment / RudderStack tracking API's JSON ------------------------------------------------

# Our field names (used in errors) as the Segment spec spells them; the first prefix that
# matches wins, and other identifiers.<name> are the top-level <name> of the JSON.
SEGMENT_FIELD_NAMES = (
    ("identifiers.user_id", "userId"),
    ("identifiers.anonymous_id", "anonymousId"),
    ("identifiers.custom", "externalIds"),
    ("identifiers.", ""),
    ("event_id", "messageId"),
    ("previous_id", "previousId"),
    ("group_id", "groupId"),
    ("sent_at", "sentAt"),
)


def segment_field(name: str) -> str:
    if name == "identifiers":
        return "userId or anonymousId"
    for ours, theirs in SEGMENT_FIELD_NAMES:
        if ours.endswith("."):
            if name.startswith(ours):
                return theirs + name[len(ours):]
        elif name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    return name


def _time(value: Any, name: str) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise InvalidField(name, "must be an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidField(name, f"not an ISO 8601 time: {value!r}") from None
    if moment.tzinfo is None:
        raise InvalidField(name, "needs a time zone (e.g. 'Z')")
    return moment


def _text(payload: Mapping[str, Any], key: str, ours: str) -> str:
    value = payload.get(key)
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Segment's libraries send numeric user ids as numbers.
        return str(value)
    if not isinstance(value, str):
        raise InvalidField(ours, "must be a string")
    return value


def _object(payload: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidField(key, "must be a JSON object")
    return value


def _deeper_than(value: Any, levels: int) -> bool:
    """Whether parsed JSON nests objects and arrays more than `levels` deep below `value`."""
    stack = [(value, levels)]
    while stack:
        container, left = stack.pop()
        for item in container.values() if type(container) is dict else container:
            if type(item) is dict or type(item) is list:
                if left == 0:
                    return True
                stack.append((item, left - 1))
    return False


def from_segment(payload: Any, kind: str | None = None, batch_sent_at: datetime | None = None) -> Incoming:
    """One Segment-spec message (https://segment.com/docs/connections/spec/) as an Incoming."""
    if not isinstance(payload, Mapping):
        raise InvalidField("event", "must be a JSON object")
    kind = kind or _text(payload, "type", "type")
    if kind not in KINDS:
        raise InvalidField("type", f"must be one of {', '.join(KINDS)}")
    context = _object(payload, "context")
    traits = _object(payload, "traits")
    if kind == "identify" and not traits and isinstance(context.get("traits"), Mapping):
        # RudderStack's SDKs send identify traits in context.traits.
        traits = context["traits"]
    ids = {
        "user_id": _text(payload, "userId", "identifiers.user_id"),
        "anonymous_id": _text(payload, "anonymousId", "identifiers.anonymous_id"),
    }
    for key in ("email", "phone", "device_id"):
        value = payload.get(key)
        if isinstance(value, str):
            ids[key] = value
    custom = _object(payload, "externalIds")
    consent = {k: bool(v) for k, v in _object(payload, "consent").items()}
    properties = _object(payload, "properties")
    for name, value in (("properties", properties), ("traits", traits), ("context", context)):
        if _deeper_than(value, MAX_NESTING):
            raise InvalidField(name, f"nested deeper than {MAX_NESTING} levels")
    sent_at = _time(payload.get("sentAt"), "sent_at") or batch_sent_at
    return Incoming(
        kind=kind,
        event_id=_text(payload, "messageId", "event_id"),
        ids=ids,
        custom={str(k): v for k, v in custom.items()},
        name=_text(payload, "event" if kind == "track" else "name", "event" if kind == "track" else "name"),
        properties=properties,
        traits=traits,
        timestamp=_time(payload.get("timestamp") or payload.get("originalTimestamp"), "timestamp"),
        sent_at=sent_at,
        context=context,
        consent=consent,
        previous_id=_text(payload, "previousId", "previous_id"),
        group_id=_text(payload, "groupId", "group_id"),
        category=_text(payload, "category", "category"),
    )
