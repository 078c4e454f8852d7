"""cdp_activation.core: campaign validation, rendering and who a message goes to."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from cdp_activation.core import Campaign, InvalidCampaign, RenderFailed, check_campaign, recipient, render

GOOD = Campaign(
    campaign_id="spring-sale",
    segment_id="vips",
    channel="email",
    from_address="news@shop.example",
    subject_template="Hi {{ traits.first_name }}, {{ profile.order_count }} orders!",
    body_template="Dear {{ traits.first_name }},\nthanks for {{ profile.revenue }}.\n",
)
PROFILE: dict[str, Any] = {"profile_id": "p1", "order_count": 3, "revenue": 42.5,
                           "traits": {"first_name": "Ada", "email": "ada@example.com"}}


# --- check_campaign ----------------------------------------------------------------------------


def test_a_valid_campaign_is_accepted_unchanged() -> None:
    assert check_campaign(GOOD) == GOOD


def test_the_channel_defaults_to_email() -> None:
    assert check_campaign(replace(GOOD, channel="")).channel == "email"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"campaign_id": ""}, "id"),
        ({"campaign_id": "Spring"}, "id"),
        ({"campaign_id": "spring sale"}, "id"),
        ({"campaign_id": "x" * 64}, "id"),
        ({"segment_id": ""}, "segment_id"),
        ({"channel": "sms"}, "channel"),
        ({"from_address": ""}, "from_address"),
        ({"from_address": "news"}, "from_address"),
        ({"from_address": "news @shop.example"}, "from_address"),
        ({"from_address": "a@b@c"}, "from_address"),
        ({"subject_template": ""}, "subject_template"),
        ({"subject_template": "   \n"}, "subject_template"),
        ({"subject_template": "Hi {{ traits.first_name "}, "subject_template"),
        ({"body_template": ""}, "body_template"),
        ({"body_template": "{% if traits.vip %}VIP"}, "body_template"),
        ({"body_template": "{{ }}"}, "body_template"),
    ],
)
def test_errors_name_the_field(changes: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidCampaign) as caught:
        check_campaign(replace(GOOD, **changes))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_a_template_syntax_error_reports_its_line() -> None:
    with pytest.raises(InvalidCampaign, match="line 3"):
        check_campaign(replace(GOOD, body_template="Hello\n\n{{ traits.name }\nBye"))


def test_a_from_address_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidCampaign):
        check_campaign(replace(GOOD, from_address="news@shop.example\n"))


# --- render ------------------------------------------------------------------------------------


def test_render_uses_traits_and_profile() -> None:
    subject, body = render(GOOD, PROFILE)
    assert subject == "Hi Ada, 3 orders!"
    assert body == "Dear Ada,\nthanks for 42.5."


def test_a_missing_trait_renders_empty() -> None:
    subject, body = render(GOOD, {"profile_id": "p1", "traits": {}})
    assert subject == "Hi , orders!"
    assert body == "Dear ,\nthanks for ."


def test_a_profile_without_traits_still_renders() -> None:
    subject, _ = render(GOOD, {"order_count": 1})
    assert subject == "Hi , 1 orders!"


@pytest.mark.parametrize("name", ["Ada\r\nBcc: everyone@example.com", "Ada\nLovelace", "Ada\u2028X", "Ada\t\tL"])
def test_the_subject_stays_on_one_line_whatever_the_traits_contain(name: str) -> None:
    subject, _ = render(GOOD, {**PROFILE, "traits": {"first_name": name}})
    assert "\n" not in subject and "\r" not in subject and "\u2028" not in subject
    assert subject.startswith("Hi Ada")


def test_the_subject_template_itself_is_flattened() -> None:
    campaign = replace(GOOD, subject_template="  Hello\n   {{ traits.first_name }}  ")
    assert render(campaign, PROFILE)[0] == "Hello Ada"


def test_traits_are_not_html_escaped() -> None:
    campaign = replace(GOOD, body_template="{{ traits.first_name }}")
    assert render(campaign, {"traits": {"first_name": "Tom & <Jerry>"}})[1] == "Tom & <Jerry>"


def test_templates_cannot_reach_python_internals() -> None:
    reaching = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    # Refused when the campaign is put, as it would fail every send...
    with pytest.raises(InvalidCampaign) as refused:
        check_campaign(replace(GOOD, body_template=reaching))
    assert refused.value.field == "body_template" and "fails for every profile" in str(refused.value)
    # ...and the sandbox stops it at send time anyway.
    with pytest.raises(RenderFailed, match="SecurityError"):
        render(replace(GOOD, body_template=reaching), PROFILE)


def test_a_missing_nested_trait_renders_empty() -> None:
    campaign = replace(GOOD, subject_template="City: {{ traits.address.city }}")
    assert render(campaign, PROFILE)[0] == "City:"


# --- recipient ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("traits", "identifiers", "expected"),
    [
        ({}, {"email": "ada@example.com"}, "ada@example.com"),
        ({"email": "trait@example.com"}, {"email": "id@example.com"}, "id@example.com"),
        ({"email": "trait@example.com"}, {}, "trait@example.com"),
        ({"email": " trait@example.com "}, {}, "trait@example.com"),
        ({"email": "trait@example.com"}, {"email": "not-an-address"}, "trait@example.com"),
        ({"email": "nope"}, {}, None),
        ({"email": 42}, {}, None),
        ({"email": None}, {"phone": "+1555"}, None),
        ({}, {}, None),
        ({"email": "two words@example.com"}, {}, None),
    ],
)
def test_recipient(traits: dict[str, Any], identifiers: dict[str, str], expected: str | None) -> None:
    assert recipient(traits, identifiers) == expected


@pytest.mark.parametrize("body", ['{{ "x" * 10**8 }}', "{{ [1] * 10**8 }}", "{{ 10 ** 100000000 }}"])
def test_a_template_too_large_for_every_profile_is_refused(body: str) -> None:
    with pytest.raises(InvalidCampaign) as caught:
        check_campaign(replace(GOOD, body_template=body))
    assert caught.value.field == "body_template"


def test_small_repetitions_and_powers_still_render() -> None:
    campaign = replace(GOOD, subject_template="{{ '*' * 3 }}", body_template="{{ 2 ** 10 }} {{ 'ab' * 2 }}")
    assert render(check_campaign(campaign), {}) == ("***", "1024 abab")


def test_a_template_that_fails_for_one_profile_names_the_field() -> None:
    campaign = check_campaign(replace(GOOD, body_template="{{ 'x' * (traits.times | int) }}"))
    assert render(campaign, {"traits": {"times": 2}})[1] == "xx"
    with pytest.raises(RenderFailed, match="body_template: SecurityError"):
        render(campaign, {"traits": {"times": 10**9}})


def test_a_subject_longer_than_a_header_line_fails_the_send() -> None:
    campaign = check_campaign(replace(GOOD, subject_template="{{ traits.name }}"))
    with pytest.raises(RenderFailed, match="subject_template: renders 2,000 characters"):
        render(campaign, {"traits": {"name": "n" * 2000}})
