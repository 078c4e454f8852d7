"""SearchProfiles filters: which fields exist, which operators and values they take. Pure.

A filter is (field, op, value) with value a JSON literal, as in segment rules; all filters must
hold. Fields are `traits.<name>` (dotted for nested), `consents.<channel>.<purpose>`, and the
named aggregates and scores below.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

NUMBER, TEXT, BOOL, TIME, JSON = "number", "text", "bool", "time", "json"

# Named aggregates and scores, by kind. `aov` is short for average_order_value.
FIELDS: dict[str, str] = {
    "order_count": NUMBER, "revenue": NUMBER, "average_order_value": NUMBER, "aov": NUMBER,
    "first_order_at": TIME, "last_order_at": TIME, "days_since_last_order": NUMBER,
    "average_order_interval_days": NUMBER, "purchase_frequency_falling": BOOL,
    "refund_count": NUMBER, "refunded_amount": NUMBER,
    "email_open_rate": NUMBER, "email_click_rate": NUMBER, "last_email_open_at": TIME, "last_email_click_at": TIME,
    "loyalty_tier": TEXT, "loyalty_points": NUMBER, "open_tickets": NUMBER,
    "lifecycle_stage": TEXT, "rfm_recency": NUMBER, "rfm_frequency": NUMBER, "rfm_monetary": NUMBER,
    "rfm_cell": TEXT, "churn_risk": NUMBER, "churn_label": TEXT, "next_best_offer": TEXT,
    "event_count": NUMBER, "first_seen_at": TIME, "last_seen_at": TIME,
}
OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "exists", "contains")
_ORDERED = ("gt", "gte", "lt", "lte")
_TRAIT = re.compile(r"^traits\.[A-Za-z0-9_-]{1,100}(\.[A-Za-z0-9_-]{1,100}){0,9}$")
_CONSENT = re.compile(r"^consents\.([a-z0-9_-]{1,64})\.([a-z0-9_-]{1,64})$")
MAX_FILTERS = 20


class InvalidFilter(ValueError):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Filter:
    field: str
    op: str
    # The parsed JSON literal (a datetime for a time field); None for exists.
    value: Any
    kind: str

    @property
    def path(self) -> list[str]:
        """The key path inside traits, or [channel.purpose] for a consent."""
        if self.field.startswith("traits."):
            return self.field[len("traits."):].split(".")
        _, channel, purpose = self.field.split(".")
        return [f"{channel}.{purpose}"]


def _kind(field: str) -> str | None:
    if field in FIELDS:
        return FIELDS[field]
    if _TRAIT.fullmatch(field):
        return JSON
    if _CONSENT.fullmatch(field):
        return BOOL
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse(raw: Sequence[tuple[str, str, str]]) -> list[Filter]:
    """Validates filters; the error names the offending one (filters[i].field, .op, .value)."""
    if len(raw) > MAX_FILTERS:
        raise InvalidFilter("filters", f"at most {MAX_FILTERS} filters, got {len(raw)}")
    parsed = []
    for i, (field, op, text) in enumerate(raw):
        where = f"filters[{i}]"
        kind = _kind(field)
        if kind is None:
            raise InvalidFilter(
                f"{where}.field",
                f"unknown field {field!r}; use traits.<name>, consents.<channel>.<purpose> or one of "
                + ", ".join(FIELDS),
            )
        if op not in OPS:
            raise InvalidFilter(f"{where}.op", f"unknown operator {op!r}; use one of {', '.join(OPS)}")
        if op == "exists":
            parsed.append(Filter(field, op, None, kind))
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            raise InvalidFilter(f"{where}.value", "nested too deeply") from None
        except ValueError:
            raise InvalidFilter(f"{where}.value", f"not a JSON literal: {text!r} (quote text: \"gold\")") from None
        parsed.append(Filter(field, op, _checked(where, field, kind, op, value), kind))
    return parsed


def _checked(where: str, field: str, kind: str, op: str, value: Any) -> Any:
    if kind == JSON:
        if op in _ORDERED and not (_number(value) or isinstance(value, str)):
            raise InvalidFilter(f"{where}.value", f"{op} needs a number or text")
        if op == "contains" and (isinstance(value, dict | list) or value is None):
            raise InvalidFilter(f"{where}.value", "contains needs a number, text or boolean")
        return value
    if op == "contains" and kind != TEXT:
        raise InvalidFilter(f"{where}.op", f"contains works on text; {field} is a {kind}")
    if kind == NUMBER and not _number(value):
        raise InvalidFilter(f"{where}.value", f"{field} is a number, got {json.dumps(value)}")
    if kind == TEXT and not isinstance(value, str):
        raise InvalidFilter(f"{where}.value", f"{field} is text, got {json.dumps(value)} (quote it: \"...\")")
    if kind == TEXT and op in _ORDERED:
        raise InvalidFilter(f"{where}.op", f"{op} needs a number or a time; {field} is text")
    if kind == BOOL:
        if not isinstance(value, bool):
            raise InvalidFilter(f"{where}.value", f"{field} is true or false, got {json.dumps(value)}")
        if op not in ("eq", "neq"):
            raise InvalidFilter(f"{where}.op", f"{field} is true or false: use eq or neq")
    if kind == TIME:
        try:
            moment = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            moment = None
        if moment is None:
            raise InvalidFilter(f"{where}.value", f"{field} is a time: give an ISO 8601 text, e.g. \"2026-01-31\"")
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return value
