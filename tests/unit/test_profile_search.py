"""cdp_profile.search: which SearchProfiles filters are accepted, and the error naming a bad one."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cdp_profile.search import InvalidFilter, parse


def test_aggregates_scores_traits_and_consents_are_fields() -> None:
    filters = parse([
        ("order_count", "gte", "2"), ("rfm_cell", "eq", '"champions"'), ("traits.address.city", "eq", '"Oslo"'),
        ("consents.email.marketing", "eq", "true"), ("purchase_frequency_falling", "neq", "false"),
        ("last_order_at", "gt", '"2026-01-31"'), ("loyalty_tier", "exists", ""), ("aov", "lt", "20.5"),
    ])
    assert [f.kind for f in filters] == ["number", "text", "json", "bool", "bool", "time", "text", "number"]
    assert filters[2].path == ["address", "city"]
    assert filters[3].path == ["email.marketing"]
    assert filters[5].value == datetime(2026, 1, 31, tzinfo=UTC)
    assert filters[6].value is None


@pytest.mark.parametrize(
    ("raw", "where", "says"),
    [
        (("rfm_score", "eq", "1"), "filters[0].field", "unknown field 'rfm_score'"),
        (("traits.", "eq", "1"), "filters[0].field", "unknown field"),
        (("consents.email", "eq", "true"), "filters[0].field", "unknown field"),
        (("order_count", "between", "1"), "filters[0].op", "unknown operator 'between'"),
        (("order_count", "gt", "two"), "filters[0].value", "not a JSON literal"),
        (("order_count", "gt", '"2"'), "filters[0].value", "is a number"),
        (("rfm_cell", "eq", "champions"), "filters[0].value", "not a JSON literal"),
        (("rfm_cell", "gt", '"a"'), "filters[0].op", "gt needs a number or a time"),
        (("purchase_frequency_falling", "eq", "1"), "filters[0].value", "true or false"),
        (("last_order_at", "gt", '"yesterday"'), "filters[0].value", "ISO 8601"),
        (("order_count", "contains", "1"), "filters[0].op", "contains works on text"),
        (("traits.tags", "gt", "[1]"), "filters[0].value", "gt needs a number or text"),
    ],
)
def test_a_bad_filter_is_named_with_what_is_wrong(raw: tuple[str, str, str], where: str, says: str) -> None:
    with pytest.raises(InvalidFilter) as caught:
        parse([("event_count", "gte", "0"), raw][1:])
    assert str(caught.value).startswith(f"{where}: ")
    assert says in str(caught.value)


def test_the_index_names_the_filter_in_the_list() -> None:
    with pytest.raises(InvalidFilter, match=r"^filters\[1\]\.field"):
        parse([("order_count", "gte", "1"), ("nope", "eq", "1")])


def test_too_many_filters_are_refused() -> None:
    with pytest.raises(InvalidFilter, match="^filters: at most 20"):
        parse([("order_count", "gte", "1")] * 21)
