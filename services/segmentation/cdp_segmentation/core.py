"""The segment rule language: conditions over traits and aggregates, all of which must hold. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

AGGREGATES = ("order_count", "revenue", "event_count", "last_order_at", "days_since_last_order")
OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "exists", "contains")
_SEGMENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_TRAIT = re.compile(r"^traits\.[A-Za-z0-9_.-]{1,100}$")


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
    conditions = []
    for i, (field, op, value) in enumerate(raw):
        where = f"conditions[{i}]"
        if field not in AGGREGATES and not _TRAIT.fullmatch(field):
            raise InvalidSegment(f"{where}.field", f"unknown field {field!r}; use traits.<name> or one of {AGGREGATES}")
        if op not in OPS:
            raise InvalidSegment(f"{where}.op", f"unknown operator {op!r}; use one of {OPS}")
        parsed: Any = None
        if op != "exists":
            try:
                parsed = json.loads(value)
            except ValueError:
                raise InvalidSegment(f"{where}.value", f"not a JSON literal: {value!r}") from None
            if op in ("gt", "gte", "lt", "lte") and (not isinstance(parsed, int | float) or isinstance(parsed, bool)):
                if not (field == "last_order_at" and isinstance(parsed, str)):
                    raise InvalidSegment(f"{where}.value", f"{op} needs a number")
        conditions.append(Condition(field, op, parsed))
    return Segment(segment_id, name or segment_id, tuple(conditions))


def value_of(profile: Mapping[str, Any], field: str, now: datetime) -> Any:
    if field.startswith("traits."):
        value: Any = profile.get("traits", {})
        for part in field[len("traits."):].split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return value
    if field == "days_since_last_order":
        last = profile.get("last_order_at")
        return None if last is None else (now - datetime.fromisoformat(last)).total_seconds() / 86400
    return profile.get(field)


def _equal(actual: Any, expected: Any) -> bool:
    # JSON true is not the number 1, although Python says so.
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    return bool(actual == expected)


def _holds(condition: Condition, actual: Any) -> bool:
    op, expected = condition.op, condition.value
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
