"""cdp_segmentation.core: the segment rule language and who matches it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cdp_segmentation.core import Condition, InvalidSegment, Segment, matches, parse_segment

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def seg(*conditions: tuple[str, str, str]) -> Segment:
    return parse_segment("s", "S", list(conditions))


# --- parse_segment -----------------------------------------------------------------------------


def test_a_valid_definition_parses_its_values_as_json() -> None:
    s = parse_segment("big-spenders", "Big spenders", [
        ("revenue", "gte", "100"),
        ("traits.plan", "eq", '"pro"'),
        ("traits.tags", "contains", '"vip"'),
        ("traits.email", "exists", ""),
    ])
    assert s.segment_id == "big-spenders"
    assert s.name == "Big spenders"
    assert s.conditions == (
        Condition("revenue", "gte", 100),
        Condition("traits.plan", "eq", "pro"),
        Condition("traits.tags", "contains", "vip"),
        Condition("traits.email", "exists", None),
    )


def test_the_name_defaults_to_the_id() -> None:
    assert parse_segment("vips", "", [("order_count", "gt", "0")]).name == "vips"


@pytest.mark.parametrize(
    ("segment_id", "raw", "field"),
    [
        ("", [("order_count", "gt", "1")], "id"),
        ("VIPs", [("order_count", "gt", "1")], "id"),
        ("-vip", [("order_count", "gt", "1")], "id"),
        ("a" * 64, [("order_count", "gt", "1")], "id"),
        ("vip", [], "conditions"),
        ("vip", [("plan", "eq", '"pro"')], "conditions[0].field"),
        ("vip", [("traits.", "eq", '"pro"')], "conditions[0].field"),
        ("vip", [("traits.a b", "eq", '"pro"')], "conditions[0].field"),
        ("vip", [("order_count", "gt", "1"), ("revenue", "between", "1")], "conditions[1].op"),
        ("vip", [("order_count", "gt", "1"), ("revenue", "GT", "1")], "conditions[1].op"),
        ("vip", [("traits.plan", "eq", "pro")], "conditions[0].value"),  # not JSON: unquoted
        ("vip", [("traits.plan", "eq", "")], "conditions[0].value"),
        ("vip", [("order_count", "gt", '"5"')], "conditions[0].value"),
        ("vip", [("order_count", "lte", "true")], "conditions[0].value"),
        ("vip", [("revenue", "lt", "null")], "conditions[0].value"),
        ("vip", [("order_count", "gt", "1"), ("order_count", "lt", "10"), ("revenue", "gte", "[1]")],
         "conditions[2].value"),
    ],
)
def test_errors_name_the_offending_field(segment_id: str, raw: list[tuple[str, str, str]], field: str) -> None:
    with pytest.raises(InvalidSegment) as caught:
        parse_segment(segment_id, "x", raw)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_last_order_at_may_be_compared_with_a_time_string() -> None:
    s = parse_segment("recent", "", [("last_order_at", "gte", '"2024-01-01T00:00:00+00:00"')])
    assert s.conditions[0].value == "2024-01-01T00:00:00+00:00"


def test_exists_needs_no_value() -> None:
    assert parse_segment("x", "", [("traits.email", "exists", "not json")]).conditions[0].value is None


def test_a_segment_id_with_a_trailing_newline_is_rejected() -> None:
    with pytest.raises(InvalidSegment):
        parse_segment("vip\n", "", [("order_count", "gt", "1")])


# --- matches -----------------------------------------------------------------------------------

PROFILE: dict[str, Any] = {
    "traits": {"plan": "pro", "age": 42, "name": "Ada Lovelace", "tags": ["vip", "beta"],
               "address": {"city": "London", "geo": {"country": "GB"}}, "score": 7.5},
    "order_count": 3,
    "revenue": 120.5,
    "event_count": 17,
    "last_order_at": (NOW - timedelta(days=10)).isoformat(),
}


@pytest.mark.parametrize(
    ("field", "op", "value", "expected"),
    [
        ("traits.plan", "eq", '"pro"', True),
        ("traits.plan", "eq", '"free"', False),
        ("traits.plan", "neq", '"free"', True),
        ("traits.plan", "neq", '"pro"', False),
        ("traits.age", "eq", "42", True),
        ("traits.age", "eq", "42.0", True),
        ("traits.age", "eq", '"42"', False),  # a string is not a number
        ("order_count", "gt", "2", True),
        ("order_count", "gt", "3", False),
        ("order_count", "gte", "3", True),
        ("order_count", "gte", "4", False),
        ("order_count", "lt", "4", True),
        ("order_count", "lt", "3", False),
        ("order_count", "lte", "3", True),
        ("order_count", "lte", "2", False),
        ("revenue", "gt", "120.49", True),
        ("revenue", "gte", "120.51", False),
        ("event_count", "eq", "17", True),
        ("traits.score", "lt", "8", True),
        ("traits.email", "exists", "", False),
        ("traits.plan", "exists", "", True),
        ("traits.name", "contains", '"Love"', True),
        ("traits.name", "contains", '"love"', False),  # case-sensitive
        ("traits.tags", "contains", '"vip"', True),
        ("traits.tags", "contains", '"vi"', False),  # list membership, not substring
        ("traits.age", "contains", "4", False),  # numbers contain nothing
        ("traits.address.city", "eq", '"London"', True),
        ("traits.address.geo.country", "eq", '"GB"', True),
        ("traits.address.zip", "exists", "", False),
        ("traits.plan.tier", "exists", "", False),  # through a non-object
        ("traits.address", "eq", '{"city": "London", "geo": {"country": "GB"}}', True),
        ("last_order_at", "gte", f'"{(NOW - timedelta(days=11)).isoformat()}"', True),
        ("last_order_at", "gte", f'"{(NOW - timedelta(days=9)).isoformat()}"', False),
    ],
)
def test_each_operator(field: str, op: str, value: str, expected: bool) -> None:
    assert matches(seg((field, op, value)), PROFILE, NOW) is expected


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [("eq", '"x"', False), ("neq", '"x"', True), ("exists", "", False), ("gt", "0", False),
     ("lte", "0", False), ("contains", '"x"', False)],
)
def test_a_missing_trait(op: str, value: str, expected: bool) -> None:
    assert matches(seg(("traits.nope", op, value)), PROFILE, NOW) is expected
    assert matches(seg(("traits.nope", op, value)), {}, NOW) is expected


@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte"])
def test_comparing_a_text_trait_with_a_number_is_false_not_an_error(op: str) -> None:
    assert matches(seg(("traits.plan", op, "1")), PROFILE, NOW) is False


def test_every_condition_must_hold() -> None:
    both = seg(("order_count", "gte", "3"), ("traits.plan", "eq", '"pro"'))
    one = seg(("order_count", "gte", "3"), ("traits.plan", "eq", '"free"'))
    assert matches(both, PROFILE, NOW)
    assert not matches(one, PROFILE, NOW)


@pytest.mark.parametrize(
    ("op", "days", "expected"),
    [("gt", "7", True), ("gt", "10", False), ("gte", "10", True), ("lt", "7", False),
     ("lt", "10.01", True), ("lte", "30", True)],
)
def test_days_since_last_order(op: str, days: str, expected: bool) -> None:
    assert matches(seg(("days_since_last_order", op, days)), PROFILE, NOW) is expected


def test_days_since_last_order_counts_fractions_of_a_day() -> None:
    profile = {"last_order_at": (NOW - timedelta(hours=36)).isoformat()}
    assert matches(seg(("days_since_last_order", "gt", "1.4")), profile, NOW)
    assert not matches(seg(("days_since_last_order", "gt", "1.6")), profile, NOW)


def test_days_since_last_order_follows_the_clock() -> None:
    s = seg(("days_since_last_order", "gt", "30"))
    assert not matches(s, PROFILE, NOW)
    assert matches(s, PROFILE, NOW + timedelta(days=21))


def test_a_profile_that_never_ordered_has_no_days_since_last_order() -> None:
    never = {"order_count": 0, "last_order_at": None}
    assert not matches(seg(("days_since_last_order", "gt", "0")), never, NOW)
    assert not matches(seg(("days_since_last_order", "lt", "1000")), never, NOW)
    assert not matches(seg(("days_since_last_order", "exists", "")), never, NOW)
    assert matches(seg(("days_since_last_order", "exists", "")), PROFILE, NOW)


@pytest.mark.parametrize("value", ["5", "[1]", "null"])
def test_contains_with_a_non_text_value_on_a_text_trait_is_false(value: str) -> None:
    assert matches(seg(("traits.name", "contains", value)), PROFILE, NOW) is False


def test_rules_use_profile_scores_and_consents() -> None:
    s = parse_segment("win-back", "", [
        ("lifecycle_stage", "eq", '"lapsed"'),
        ("churn_risk", "gte", "0.7"),
        ("consents.email.marketing", "eq", "true"),
        ("last_email_open_at", "lt", '"2024-06-01T00:00:00+00:00"'),
    ])
    lapsed = {"lifecycle_stage": "lapsed", "churn_risk": 0.82, "consents.email.marketing": True,
              "last_email_open_at": "2024-05-01T10:00:00+02:00"}
    assert matches(s, lapsed, NOW)
    assert not matches(s, {**lapsed, "consents.email.marketing": False}, NOW)
    assert not matches(s, {**lapsed, "last_email_open_at": "2024-06-01T01:00:00+00:00"}, NOW)
    assert not matches(s, {**lapsed, "lifecycle_stage": "active"}, NOW)


@pytest.mark.parametrize(("field", "op", "value", "named"), [
    ("lifecycle", "eq", '"lapsed"', "conditions[0].field"),
    ("consents.email", "eq", "true", "conditions[0].field"),
    ("first_order_at", "gt", '"yesterday"', "conditions[0].value"),
    ("first_order_at", "gt", "20240101", "conditions[0].value"),
    ("churn_risk", "gt", '"high"', "conditions[0].value"),
])
def test_bad_conditions_on_new_fields_name_what_is_wrong(field: str, op: str, value: str, named: str) -> None:
    with pytest.raises(InvalidSegment) as caught:
        parse_segment("s", "", [(field, op, value)])
    assert caught.value.field == named
