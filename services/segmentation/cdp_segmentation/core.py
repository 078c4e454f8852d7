"""The segment rule language: conditions over traits and aggregates, all of which must hold. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# The profile facts a rule can use (profile's SearchProfiles names, docs/profile.md), besides
# traits.<name> and consents.<channel>.<purpose>.
TIMES = ("last_order_at", "first_order_at", "last_email_open_at", "last_email_click_at", "first_seen_at",
         "last_seen_at")
AGGREGATES = (
    "order_count", "revenue", "event_count", "days_since_last_order", "average_order_value", "aov",
    "average_order_interval_days", "purchase_frequency_falling", "refund_count", "refunded_amount",
    "email_open_rate", "email_click_rate", "loyalty_tier", "loyalty_points", "open_tickets", "lifecycle_stage",
    "rfm_recency", "rfm_frequency", "rfm_monetary", "rfm_cell", "churn_risk", "churn_label", "next_best_offer",
    *TIMES,
)
OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "exists", "contains")
# A literal is compared with a profile's value; the JSON writer (orjson) stops at 255 levels.
MAX_VALUE_NESTING = 32
_SEGMENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_TRAIT = re.compile(r"^traits\.[A-Za-z0-9_.-]{1,100}$")
_CONSENT = re.compile(r"^consents\.[a-z_]{1,40}\.[a-z_]{1,40}$")


class InvalidSegment(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any = None


@dataclass(frozen=True)
class Segment:
    segment_id: str
    name: str
    conditions: tuple[Condition, ...]


def parse_segment(segment_id: str, name: str, raw: Sequence[tuple[str, str, str]]) -> Segment:
    """Validates a definition; the error names the offending field (conditions[i].op, ...)."""
    if not _SEGMENT_ID.fullmatch(segment_id):
        raise InvalidSegment("id", "must be 1-63 lower-case letters, digits, '-' or '_'")
    if not raw:
        raise InvalidSegment("conditions", "at least one condition is required")
    if "\x00" in name:  # PostgreSQL text cannot hold it
        raise InvalidSegment("name", "contains a NUL character")
    conditions = []
    for i, (field, op, value) in enumerate(raw):
        where = f"conditions[{i}]"
        if field not in AGGREGATES and not _TRAIT.fullmatch(field) and not _CONSENT.fullmatch(field):
            raise InvalidSegment(
                f"{where}.field",
                f"unknown field {field!r}; use traits.<name>, consents.<channel>.<purpose> or one of {AGGREGATES}",
            )
        if op not in OPS:
            raise InvalidSegment(f"{where}.op", f"unknown operator {op!r}; use one of {OPS}")
        parsed: Any = None
        if op != "exists":
            try:
                parsed = json.loads(value, parse_constant=_no_constant, parse_float=_finite)
            except ValueError:
                raise InvalidSegment(f"{where}.value", f"not a JSON literal: {value[:100]!r}") from None
            except RecursionError:
                raise InvalidSegment(f"{where}.value", "nested too deeply") from None
            if "\\u0000" in value:  # PostgreSQL jsonb cannot hold U+0000
                raise InvalidSegment(f"{where}.value", "contains a NUL character")
            if _deeper_than(parsed, MAX_VALUE_NESTING):
                raise InvalidSegment(f"{where}.value", f"nested deeper than {MAX_VALUE_NESTING} levels")
            if field in TIMES and op != "contains" and parsed is not None:
                if not isinstance(parsed, str) or _iso_time(parsed) is None:
                    raise InvalidSegment(f"{where}.value", f"{op} on {field} needs an ISO 8601 date or time")
            elif op in ("gt", "gte", "lt", "lte") and (not isinstance(parsed, int | float) or isinstance(parsed, bool)):
                raise InvalidSegment(f"{where}.value", f"{op} needs a number")
        conditions.append(Condition(field, op, parsed))
    return Segment(segment_id, name or segment_id, tuple(conditions))


def _deeper_than(value: Any, levels: int) -> bool:
    if not isinstance(value, list | dict):
        return False
    if levels == 0:
        return True
    return any(_deeper_than(v, levels - 1) for v in (value.values() if isinstance(value, dict) else value))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    # 1e400 would be infinity, which a JSON column (and JSON itself) cannot hold.
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return number


def _iso_time(value: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    # A date or a time without a zone is UTC, as in profile's SearchProfiles.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def value_of(profile: Mapping[str, Any], field: str, now: datetime) -> Any:
    if field.startswith("traits."):
        value: Any = profile.get("traits", {})
        for part in field[len("traits."):].split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return value
    if field == "days_since_last_order":
        last = profile.get("last_order_at")
        return None if last is None else (now - datetime.fromisoformat(last)).total_seconds() / 86400
    if field in TIMES:
        # Times compare as instants, not as text.
        return _iso_time(profile[field]) if isinstance(profile.get(field), str) else None
    return profile.get(field)


def _equal(actual: Any, expected: Any) -> bool:
    # JSON true is not the number 1, although Python says so.
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    return bool(actual == expected)


def _holds(condition: Condition, actual: Any) -> bool:
    op, expected = condition.op, condition.value
    if condition.field in TIMES and isinstance(expected, str):
        expected = _iso_time(expected)
    if op == "exists":
        return actual is not None
    if actual is None:
        return op == "neq"
    if op == "eq":
        return _equal(actual, expected)
    if op == "neq":
        return not _equal(actual, expected)
    if op == "contains":
        if isinstance(actual, str):
            return isinstance(expected, str) and expected in actual
        return isinstance(actual, list) and expected in actual
    try:
        if op == "gt":
            return bool(actual > expected)
        if op == "gte":
            return bool(actual >= expected)
        if op == "lt":
            return bool(actual < expected)
        return bool(actual <= expected)
    except TypeError:
        return False


def matches(segment: Segment, profile: Mapping[str, Any], now: datetime) -> bool:
    return all(_holds(c, value_of(profile, c.field, now)) for c in segment.conditions)
