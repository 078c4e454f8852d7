"""cdp_identity.core: which identifiers an event carries, the rules, and which profile it belongs to."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cdp_identity.core import (
    DEFAULT_RULES,
    Decision,
    InvalidRules,
    Key,
    Known,
    Rules,
    TypeRule,
    decide,
    event_identifiers,
    merge_refusal,
    split_refusal,
)

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


ADA_SHA = sha("ada@example.com")


def profile(pid: str, age_days: float, *keys: Key, merge_count: int = 0,
            seen: dict[Key, float] | None = None) -> Known:
    """A known profile created `age_days` before T0, holding `keys` (last seen at T0, or
    `seen[key]` days before T0)."""
    seen = seen or {}
    return Known(pid, T0 - timedelta(days=age_days), merge_count,
                 {k: T0 - timedelta(days=seen.get(k, 0)) for k in keys})


def graph(*profiles: Known) -> tuple[dict[Key, str], dict[str, Known]]:
    """owners and known, as the store hands them to decide (every identifier of the profiles)."""
    return {k: p.profile_id for p in profiles for k in p.identifiers}, {p.profile_id: p for p in profiles}


def run(event_ids: list[Key], *profiles: Known, rules: Rules = DEFAULT_RULES, at: datetime = T0) -> Decision:
    owners, known = graph(*profiles)
    # Like the store: only the event's identifiers are looked up.
    owners = {k: p for k, p in owners.items() if k in event_ids}
    known = {p: known[p] for p in set(owners.values())}
    return decide(event_ids, owners, known, "p-new", at, rules)


def rules_with(**types: dict[str, Any]) -> Rules:
    return Rules.from_json({"types": types})


# --- event_identifiers -------------------------------------------------------------------------


def test_email_is_trimmed_lower_cased_and_also_hashed() -> None:
    found = event_identifiers({"email": "  Ada@Example.COM "}, {})
    assert found == [("email", "ada@example.com"), ("email_sha256", ADA_SHA)]


def test_identifiers_come_strongest_first() -> None:
    found = event_identifiers(
        {"anonymous_id": "anon-1", "device_id": "dev-1", "email": "ada@example.com",
         "phone": "(415) 555-2671", "user_id": "u-1"},
        {"loyalty_id": "L-1", "crm_id": "c-1"},
    )
    assert [t for t, _ in found] == [
        "user_id", "email", "phone", "crm_id", "loyalty_id", "email_sha256", "device_id", "anonymous_id",
    ]


def test_custom_identifiers_rank_between_phone_and_the_hashed_email() -> None:
    found = event_identifiers({"email": "ada@example.com", "phone": "+1 415 555 2671"}, {"loyalty_id": "L-1"})
    assert [t for t, _ in found] == ["email", "phone", "loyalty_id", "email_sha256"]


def test_configured_priorities_change_the_order() -> None:
    rules = rules_with(device_id={"priority": 0, "limit": 20})
    found = event_identifiers({"user_id": "u-1", "device_id": "d-1"}, {}, rules)
    assert found == [("device_id", "d-1"), ("user_id", "u-1")]


JUNK = ["null", "NULL", " Null ", "-1", "0", "0000", "---", "anonymous", "ANONYMOUS", "", "  ", "undefined",
        "Undefined", "none", "nil", "unknown", "n/a", "N/A", "nan", "NaN"]


@pytest.mark.parametrize("junk", JUNK)
def test_blocked_junk_values_never_appear(junk: str) -> None:
    found = event_identifiers(
        {"user_id": junk, "anonymous_id": junk, "device_id": junk, "email": junk, "phone": junk},
        {"loyalty_id": junk, "email_sha256": junk},
    )
    assert found == []


def test_junk_is_dropped_but_good_identifiers_stay() -> None:
    found = event_identifiers({"user_id": "null", "anonymous_id": "anon-7", "email": "anonymous"}, {})
    assert found == [("anonymous_id", "anon-7")]


def test_values_that_only_contain_junk_words_are_not_junk() -> None:
    found = event_identifiers({"user_id": "null-user", "email": "null@example.com"}, {})
    assert found == [("user_id", "null-user"), ("email", "null@example.com"), ("email_sha256", sha("null@example.com"))]


def test_a_configured_block_list_applies_case_insensitively_and_replaces_the_defaults() -> None:
    rules = Rules.from_json({"blocked": ["test-.*"]})
    assert event_identifiers({"user_id": "TEST-42", "anonymous_id": "a-1"}, {}, rules) == [("anonymous_id", "a-1")]
    assert event_identifiers({"user_id": "null"}, {}, rules) == [("user_id", "null")]
    assert event_identifiers({"user_id": ""}, {}, rules) == []  # an empty value never links


def test_an_email_without_an_at_sign_is_dropped_with_its_hash() -> None:
    assert event_identifiers({"email": "ada.example.com", "anonymous_id": "a"}, {}) == [("anonymous_id", "a")]


def test_a_hashed_email_sent_by_an_ad_platform_equals_the_one_derived_from_the_email() -> None:
    found = event_identifiers({"email": "ADA@example.com"}, {"email_sha256": ADA_SHA.upper()})
    assert found == [("email", "ada@example.com"), ("email_sha256", ADA_SHA)]


@pytest.mark.parametrize("bad", ["abc", ADA_SHA[:-1], ADA_SHA + "0", "g" * 64])
def test_a_hashed_email_that_is_not_64_hex_digits_is_dropped(bad: str) -> None:
    assert event_identifiers({}, {"email_sha256": bad}) == []


@pytest.mark.parametrize(
    "raw",
    ["(415) 555-2671", "415-555-2671", "415.555.2671", "+1 415 555 2671", "+14155552671", " 1 (415) 555-2671 "],
)
def test_phones_are_normalised_to_e164(raw: str) -> None:
    assert event_identifiers({"phone": raw}, {}) == [("phone", "+14155552671")]


def test_a_phone_without_country_code_is_read_in_the_configured_region() -> None:
    assert event_identifiers({"phone": "+44 20 7946 0958"}, {}) == [("phone", "+442079460958")]
    assert event_identifiers({"phone": "020 7946 0958"}, {}, Rules.from_json({"phone_region": "GB"})) == [
        ("phone", "+442079460958")
    ]


@pytest.mark.parametrize("raw", ["555", "12", "(000) 000-0000", "+1 000 000 0000", "call me", "phone"])
def test_impossible_phones_are_dropped(raw: str) -> None:
    assert event_identifiers({"phone": raw}, {}) == []


def test_user_ids_and_custom_ids_are_trimmed_but_keep_their_case() -> None:
    found = event_identifiers({"user_id": "  User-42 "}, {"loyalty_id": "  L-77 "})
    assert found == [("user_id", "User-42"), ("loyalty_id", "L-77")]


def test_custom_types_of_one_priority_are_ordered_by_name_then_value() -> None:
    found = event_identifiers({}, {"zeta_id": "1", "alpha_id": "9", "beta_id": "5"})
    assert [t for t, _ in found] == ["alpha_id", "beta_id", "zeta_id"]


# --- Rules.from_json ---------------------------------------------------------------------------


def test_an_empty_object_gives_the_defaults() -> None:
    rules = Rules.from_json({})
    assert rules.types == DEFAULT_RULES.types
    assert (rules.custom, rules.max_identifiers, rules.max_merges, rules.phone_region) == (
        TypeRule(4, 5), 1000, 100, "US")


def test_the_defaults_are_the_documented_ones() -> None:
    expected = {"user_id": (1, 1), "email": (2, 5), "phone": (3, 5), "loyalty_id": (4, 5), "crm_id": (4, 5),
                "email_sha256": (5, 5), "device_id": (6, 20), "anonymous_id": (7, 100)}
    assert {t: (DEFAULT_RULES.rule(t).priority, DEFAULT_RULES.rule(t).limit) for t in expected} == expected
    assert all(DEFAULT_RULES.rule(t).window_days is None for t in expected)


def test_configured_priorities_limits_and_windows_replace_only_their_type() -> None:
    rules = Rules.from_json({
        "types": {"email": {"priority": 9, "limit": 2, "window_days": 30},
                  "loyalty_id": {"priority": 3, "limit": 1, "window_days": 0.5}},
        "custom": {"priority": 8, "limit": 3},
        "max_identifiers": 50, "max_merges": 4, "phone_region": "DE",
    })
    assert rules.rule("email") == TypeRule(9, 2, 30.0)
    assert rules.rule("loyalty_id") == TypeRule(3, 1, 0.5)
    assert rules.rule("crm_id") == TypeRule(8, 3)  # no rule of its own: the custom one
    assert rules.rule("user_id") == DEFAULT_RULES.rule("user_id")
    assert (rules.max_identifiers, rules.max_merges, rules.phone_region) == (50, 4, "DE")


def test_other_hashed_types_follow_the_hashed_email_rule() -> None:
    rules = rules_with(email_sha256={"priority": 6, "limit": 2})
    assert rules.rule("phone_sha256") == TypeRule(6, 2)


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ([], "JSON object"),
        ("types", "JSON object"),
        ({"bogus": 1}, "bogus"),
        ({"types": {"email": {"priority": 2, "limit": 0}}}, "types.email.limit"),
        ({"types": {"email": {"priority": 2, "limit": -3}}}, "types.email.limit"),
        ({"types": {"email": {"priority": 2, "limit": "5"}}}, "types.email.limit"),
        ({"types": {"email": {"priority": 2, "limit": True}}}, "types.email.limit"),
        ({"types": {"email": {"priority": 2, "limit": 2.5}}}, "types.email.limit"),
        ({"types": {"email": {"priority": 2}}}, "types.email.limit"),
        ({"types": {"email": {"limit": 5}}}, "types.email.priority"),
        ({"types": {"email": {"priority": 1.5, "limit": 5}}}, "types.email.priority"),
        ({"types": {"email": {"priority": False, "limit": 5}}}, "types.email.priority"),
        ({"types": {"email": {"priority": 2, "limit": 5, "window_days": 0}}}, "types.email.window_days"),
        ({"types": {"email": {"priority": 2, "limit": 5, "window_days": -1}}}, "types.email.window_days"),
        ({"types": {"email": {"priority": 2, "limit": 5, "window_days": "30"}}}, "types.email.window_days"),
        ({"types": {"email": {"priority": 2, "limit": 5, "window_days": True}}}, "types.email.window_days"),
        ({"types": {"email": {"priority": 2, "lmit": 5}}}, "types.email: unknown key(s) lmit"),
        ({"types": {"email": 5}}, "types.email"),
        ({"types": {"Email": {"priority": 2, "limit": 5}}}, "types.Email"),
        ({"types": {"crm id": {"priority": 2, "limit": 5}}}, "types.crm id"),
        ({"custom": {"priority": 4, "limit": 0}}, "custom.limit"),
        ({"custom": []}, "custom"),
        ({"blocked": "null"}, "blocked"),
        ({"blocked": ["("]}, "blocked"),
        ({"max_merges": 0}, "max_merges"),
        ({"max_merges": "3"}, "max_merges"),
        ({"max_merges": True}, "max_merges"),
        ({"max_identifiers": -1}, "max_identifiers"),
        ({"max_identifiers": 2.0}, "max_identifiers"),
        ({"phone_region": "us"}, "phone_region"),
        ({"phone_region": "USA"}, "phone_region"),
        ({"phone_region": 1}, "phone_region"),
    ],
)
def test_malformed_rules_are_refused_naming_the_key(data: Any, names: str) -> None:
    with pytest.raises(InvalidRules, match=names.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        Rules.from_json(data)


@pytest.mark.parametrize("types", [["email"], "email", 5])
def test_types_that_is_not_an_object_is_refused_naming_the_key(types: Any) -> None:
    # (Raised AttributeError before the fix that came in while these tests were written.)
    with pytest.raises(InvalidRules, match="^types"):
        Rules.from_json({"types": types})


@pytest.mark.parametrize("window", [36_501, 1e6, 1e12, float("inf"), float("nan")])
def test_a_window_too_long_for_dates_is_refused(window: float) -> None:
    # (Was accepted, then made decide raise OverflowError/ValueError for every event touching a
    # known profile, before the fix that came in while these tests were written.)
    with pytest.raises(InvalidRules, match=r"types\.email\.window_days"):
        rules_with(email={"priority": 2, "limit": 5, "window_days": window})


def test_the_longest_window_is_usable() -> None:
    rules = rules_with(email={"priority": 2, "limit": 1, "window_days": 36_500})
    ada = profile("p-ada", 10, ("email", "ada@example.com"), seen={("email", "ada@example.com"): 36_000})
    decision = run([("email", "bob@example.com"), ("anonymous_id", "a"), ("email", "ada@example.com")], ada,
                   rules=rules)
    # ada@ (seen 36,000 days ago) still counts: bob@ would be a second email.
    assert (decision.profile_id, [k for k, _ in decision.dropped]) == (
        "p-ada", [("anonymous_id", "a"), ("email", "bob@example.com")])


# --- decide: new, attach, merge ----------------------------------------------------------------


def test_an_event_without_identifiers_is_refused() -> None:
    with pytest.raises(ValueError):
        decide([], {}, {}, "p-new", T0)


def test_no_known_identifier_creates_a_new_profile_with_every_identifier() -> None:
    event_ids = event_identifiers({"user_id": "u-1", "email": "ada@example.com"}, {})
    d = decide(event_ids, {}, {}, "p-new", T0)
    assert d == Decision(profile_id="p-new", created=True, link=tuple(event_ids))


def test_an_identifier_given_twice_is_linked_once() -> None:
    d = decide([("anonymous_id", "a"), ("user_id", "u"), ("anonymous_id", "a")], {}, {}, "p-new", T0)
    assert d.link == (("user_id", "u"), ("anonymous_id", "a"))


def test_one_owner_attaches_and_links_only_the_new_identifiers() -> None:
    event_ids = event_identifiers({"anonymous_id": "anon-1", "email": "ada@example.com"}, {})
    d = run(event_ids, profile("p1", 3, ("anonymous_id", "anon-1")))
    assert (d.profile_id, d.created, d.merged, d.dropped) == ("p1", False, (), ())
    assert d.link == (("email", "ada@example.com"), ("email_sha256", ADA_SHA))


def test_an_event_of_known_identifiers_links_nothing() -> None:
    d = run([("user_id", "u"), ("anonymous_id", "a")], profile("p1", 3, ("user_id", "u"), ("anonymous_id", "a")))
    assert d == Decision("p1", False)


def test_several_owners_merge_into_the_oldest_profile() -> None:
    event_ids = event_identifiers({"anonymous_id": "anon-1", "email": "ada@example.com", "device_id": "d-1"}, {})
    d = run(
        event_ids,
        profile("p-young", 1, ("anonymous_id", "anon-1")),
        profile("p-old", 30, ("email", "ada@example.com"), ("user_id", "u-1")),
        profile("p-middle", 10, ("device_id", "d-1")),
    )
    assert (d.profile_id, d.created) == ("p-old", False)
    assert d.merged == ("p-middle", "p-young")  # oldest first
    # Identifiers owned by the merged-away profiles move over; the survivor's stay put.
    assert set(d.link) == {("anonymous_id", "anon-1"), ("device_id", "d-1"), ("email_sha256", ADA_SHA)}
    assert "anonymous_id=anon-1" in d.reason and "email=ada@example.com" in d.reason
    assert d.dropped == ()


def test_the_survivor_is_the_oldest_whatever_the_profile_ids_sort_as() -> None:
    d = run([("email", "a@b.c"), ("anonymous_id", "x")],
            profile("aaa", 1, ("email", "a@b.c")), profile("zzz", 2, ("anonymous_id", "x")))
    assert (d.profile_id, d.merged, d.link) == ("zzz", ("aaa",), (("email", "a@b.c"),))


def test_profiles_created_at_the_same_moment_merge_into_the_smaller_profile_id() -> None:
    a, b = profile("p-a", 5, ("anonymous_id", "x")), profile("p-b", 5, ("email", "a@b.c"))
    for event_ids in ([("email", "a@b.c"), ("anonymous_id", "x")], [("anonymous_id", "x"), ("email", "a@b.c")]):
        d = run(event_ids, b, a)
        assert (d.profile_id, d.merged) == ("p-a", ("p-b",))


def test_a_user_id_and_an_anonymous_id_of_two_profiles_merge_them() -> None:
    d = run([("user_id", "ada"), ("anonymous_id", "anon-1")],
            profile("p1", 5, ("user_id", "ada")), profile("p2", 1, ("anonymous_id", "anon-1")))
    assert (d.profile_id, d.merged, d.link, d.dropped) == ("p1", ("p2",), (("anonymous_id", "anon-1"),), ())


# --- decide: limits, the drop-and-retry --------------------------------------------------------


def test_a_user_id_owned_elsewhere_is_not_joined_through_a_shared_email() -> None:
    # Bob logs in on a device whose email field still says Ada's address: Bob must not become Ada.
    event_ids = event_identifiers({"user_id": "bob", "email": "ada@example.com"}, {})
    ada = profile("p-ada", 10, ("user_id", "ada"), ("email", "ada@example.com"), ("email_sha256", ADA_SHA))
    d = run(event_ids, ada)
    assert (d.profile_id, d.created, d.merged) == ("p-new", True, ())
    assert d.link == (("user_id", "bob"),)
    # Weakest first: the hash, then the email.
    assert [k for k, _ in d.dropped] == [("email_sha256", ADA_SHA), ("email", "ada@example.com")]
    assert all("more than 1 user_id" in why for _, why in d.dropped)


def test_two_profiles_with_different_user_ids_are_never_merged() -> None:
    d = run(event_identifiers({"email": "ada@example.com", "anonymous_id": "anon-1"}, {}),
            profile("p-ada", 1, ("user_id", "ada"), ("email", "ada@example.com")),
            profile("p-bob", 50, ("user_id", "bob"), ("anonymous_id", "anon-1")))
    assert d.merged == ()
    assert d.profile_id == "p-ada"  # the stronger identifier wins, not the older profile
    assert [k for k, _ in d.dropped] == [("anonymous_id", "anon-1")]
    assert d.link == (("email_sha256", ADA_SHA),)


def test_an_event_with_two_user_ids_keeps_only_one() -> None:
    d = run([("user_id", "u-2"), ("user_id", "u-1"), ("anonymous_id", "a")])
    # Identifiers of one type rank by value; the drop-and-retry drops the weakest first, so the
    # anonymous id goes before the second user_id is found to be the problem.
    assert d.created and d.link == (("user_id", "u-1"),)
    assert [k for k, _ in d.dropped] == [("anonymous_id", "a"), ("user_id", "u-2")]


def test_the_weakest_identifiers_are_dropped_first() -> None:
    event_ids = event_identifiers({"user_id": "bob", "phone": "(415) 555-2671", "device_id": "d-ada"}, {})
    d = run(event_ids, profile("p-ada", 1, ("user_id", "ada"), ("device_id", "d-ada")))
    assert [k for k, _ in d.dropped] == [("device_id", "d-ada")]
    assert d.link == (("user_id", "bob"), ("phone", "+14155552671"))
    assert d.created


def test_dropping_goes_on_until_the_rest_fits() -> None:
    # Three profiles, three user_ids: the anonymous and device ids must both go.
    d = run([("user_id", "u1"), ("email", "e@x"), ("device_id", "d2"), ("anonymous_id", "a3")],
            profile("p1", 9, ("user_id", "u1")),
            profile("p2", 8, ("user_id", "u2"), ("device_id", "d2")),
            profile("p3", 7, ("user_id", "u3"), ("anonymous_id", "a3")))
    assert [k for k, _ in d.dropped] == [("anonymous_id", "a3"), ("device_id", "d2")]
    assert (d.profile_id, d.merged, d.link) == ("p1", (), (("email", "e@x"),))


TWO_EMAILS = rules_with(email={"priority": 2, "limit": 2})


def test_a_limit_of_two_emails_is_reached_but_not_passed() -> None:
    p = profile("p1", 9, ("email", "e1@x"), ("anonymous_id", "a"))
    d = run([("email", "e2@x"), ("anonymous_id", "a")], p, rules=TWO_EMAILS)
    assert (d.profile_id, d.link, d.dropped) == ("p1", (("email", "e2@x"),), ())

    p = profile("p1", 9, ("email", "e1@x"), ("email", "e2@x"), ("anonymous_id", "a"))
    d = run([("email", "e3@x"), ("anonymous_id", "a")], p, rules=TWO_EMAILS)
    # The anonymous id would bring a third email to p1: it is dropped, and e3 starts a profile.
    assert (d.profile_id, d.created, d.link) == ("p-new", True, (("email", "e3@x"),))
    assert d.dropped == ((("anonymous_id", "a"), "linking it would give a profile more than 2 email"),)


def test_the_limit_counts_the_values_of_every_candidate_together() -> None:
    d = run([("device_id", "d1"), ("anonymous_id", "a2")],
            profile("p1", 9, ("email", "e1@x"), ("device_id", "d1")),
            profile("p2", 8, ("email", "e2@x"), ("email", "e3@x"), ("anonymous_id", "a2")), rules=TWO_EMAILS)
    assert (d.profile_id, d.merged) == ("p1", ())
    assert [k for k, _ in d.dropped] == [("anonymous_id", "a2")]


WINDOWED = rules_with(email={"priority": 2, "limit": 2, "window_days": 30})


def test_values_last_seen_before_the_window_do_not_count() -> None:
    emails = [("email", "old@x"), ("email", "recent@x")]
    p = profile("p1", 99, *emails, ("anonymous_id", "a"), seen={("email", "old@x"): 31, ("email", "recent@x"): 1})
    d = run([("email", "new@x"), ("anonymous_id", "a")], p, rules=WINDOWED)
    assert (d.profile_id, d.link, d.dropped) == ("p1", (("email", "new@x"),), ())
    # Without the window the old email counts, and the anonymous id is dropped.
    d = run([("email", "new@x"), ("anonymous_id", "a")], p, rules=TWO_EMAILS)
    assert (d.profile_id, [k for k, _ in d.dropped]) == ("p-new", [("anonymous_id", "a")])


def test_a_value_seen_exactly_window_days_ago_still_counts() -> None:
    p = profile("p1", 99, ("email", "old@x"), ("email", "recent@x"), ("anonymous_id", "a"),
                seen={("email", "old@x"): 30, ("email", "recent@x"): 1})
    d = run([("email", "new@x"), ("anonymous_id", "a")], p, rules=WINDOWED)
    assert [k for k, _ in d.dropped] == [("anonymous_id", "a")]


def test_the_window_is_measured_from_the_event_time() -> None:
    p = profile("p1", 99, ("email", "old@x"), ("email", "recent@x"), ("anonymous_id", "a"),
                seen={("email", "old@x"): 25, ("email", "recent@x"): 1})
    assert run([("email", "new@x"), ("anonymous_id", "a")], p, rules=WINDOWED).dropped != ()
    later = run([("email", "new@x"), ("anonymous_id", "a")], p, rules=WINDOWED, at=T0 + timedelta(days=6))
    assert (later.profile_id, later.dropped) == ("p1", ())


def test_an_events_own_old_values_count_and_one_identifier_always_resolves() -> None:
    # old@x is out of the window, but this event brings it back: with it p1 would count three
    # emails, so the anonymous id is dropped -- and the last identifier resolves to its profile.
    p = profile("p1", 99, ("email", "old@x"), ("email", "e2@x"), ("email", "e3@x"), ("anonymous_id", "a"),
                seen={("email", "old@x"): 40})
    d = run([("email", "old@x"), ("anonymous_id", "a")], p, rules=WINDOWED)
    assert (d.profile_id, d.created, d.link) == ("p1", False, ())
    assert [k for k, _ in d.dropped] == [("anonymous_id", "a")]


# --- decide: caps ------------------------------------------------------------------------------


def test_a_survivor_at_max_merges_merges_no_more() -> None:
    rules = Rules.from_json({"max_merges": 2})
    old = profile("p-old", 9, ("email", "e@x"), merge_count=2)
    young = profile("p-young", 1, ("anonymous_id", "a"))
    d = run([("email", "e@x"), ("device_id", "d-new"), ("anonymous_id", "a")], old, young, rules=rules)
    assert (d.profile_id, d.merged) == ("p-old", ())
    assert d.link == (("device_id", "d-new"),)  # the event still resolves and links what is new
    assert d.dropped == ((("anonymous_id", "a"), "profile p-old reached max_merges (2)"),)


def test_max_merges_counts_the_profiles_of_this_merge() -> None:
    rules = Rules.from_json({"max_merges": 2})
    ps = [profile("p0", 9, ("email", "e@x"), merge_count=1),
          profile("p1", 5, ("device_id", "d")), profile("p2", 4, ("anonymous_id", "a"))]
    d = run([("email", "e@x"), ("device_id", "d")], *ps, rules=rules)
    assert d.merged == ("p1",)  # 1 + 1 <= 2
    d = run([("email", "e@x"), ("device_id", "d"), ("anonymous_id", "a")], *ps, rules=rules)
    assert d.merged == ()  # 1 + 2 > 2: neither is merged
    assert [k for k, _ in d.dropped] == [("device_id", "d"), ("anonymous_id", "a")]


def test_max_merges_counts_the_merges_the_merged_profiles_carry() -> None:
    # As merge_refusal and the store count them: otherwise chained merges pass the cap. (decide
    # counted only len(merged) before the fix that came in while these tests were written.)
    rules = Rules.from_json({"max_merges": 1})
    survivor = profile("p-old", 9, ("email", "e@x"))
    other = profile("p-young", 1, ("anonymous_id", "a"), merge_count=1)  # already absorbed one
    assert merge_refusal(survivor, [other], T0, rules) is not None  # 0 + (1 + 1) > 1
    d = run([("email", "e@x"), ("anonymous_id", "a")], survivor, other, rules=rules)
    assert (d.profile_id, d.merged) == ("p-old", ())
    assert d.dropped == ((("anonymous_id", "a"), "profile p-old reached max_merges (1)"),)
    fresh = profile("p-young", 1, ("anonymous_id", "a"))
    assert run([("email", "e@x"), ("anonymous_id", "a")], survivor, fresh, rules=rules).merged == ("p-young",)


def test_a_new_profile_keeps_its_strongest_identifiers_up_to_max_identifiers() -> None:
    rules = Rules.from_json({"max_identifiers": 2})
    d = run([("anonymous_id", "a"), ("user_id", "u"), ("device_id", "d"), ("email", "e@x")], rules=rules)
    assert (d.profile_id, d.created) == ("p-new", True)
    assert d.link == (("user_id", "u"), ("email", "e@x"))
    assert d.dropped == tuple((k, "the profile reached max_identifiers (2)")
                              for k in [("device_id", "d"), ("anonymous_id", "a")])


def test_a_profile_at_max_identifiers_links_nothing_new_but_the_event_resolves() -> None:
    rules = Rules.from_json({"max_identifiers": 3})
    p = profile("p1", 9, ("user_id", "u"), ("anonymous_id", "a1"))
    d = run([("user_id", "u"), ("email", "e@x"), ("device_id", "d"), ("anonymous_id", "a2")], p, rules=rules)
    assert (d.profile_id, d.link) == ("p1", (("email", "e@x"),))
    assert [k for k, _ in d.dropped] == [("device_id", "d"), ("anonymous_id", "a2")]
    full = profile("p1", 9, ("user_id", "u"), ("anonymous_id", "a1"), ("device_id", "d0"))
    d = run([("user_id", "u"), ("email", "e@x")], full, rules=rules)
    assert (d.profile_id, d.link, [k for k, _ in d.dropped]) == ("p1", (), [("email", "e@x")])


def test_max_identifiers_does_not_stop_a_merge_but_counts_what_it_brings() -> None:
    rules = Rules.from_json({"max_identifiers": 3})
    p1 = profile("p1", 9, ("email", "e@x"), ("device_id", "d1"))
    p2 = profile("p2", 5, ("anonymous_id", "a"), ("device_id", "d2"))
    d = run([("email", "e@x"), ("phone", "+14155552671"), ("anonymous_id", "a")], p1, p2, rules=rules)
    assert (d.profile_id, d.merged, d.link) == ("p1", ("p2",), (("anonymous_id", "a"),))
    assert d.dropped == ((("phone", "+14155552671"), "the profile reached max_identifiers (3)"),)


def test_every_dropped_identifier_says_why() -> None:
    rules = Rules.from_json({"max_identifiers": 2, "max_merges": 1})
    d = run([("user_id", "u2"), ("email", "e@x"), ("phone", "+14155552671"), ("device_id", "d"),
             ("anonymous_id", "a")],
            profile("p1", 9, ("user_id", "u1"), ("anonymous_id", "a")),
            profile("p2", 5, ("email", "e@x"), merge_count=1),
            profile("p3", 4, ("device_id", "d")), rules=rules)
    assert d.profile_id == "p2" and d.merged == ()
    reasons = dict(d.dropped)
    assert reasons == {
        ("anonymous_id", "a"): "linking it would give a profile more than 1 user_id",
        ("device_id", "d"): "profile p2 reached max_merges (1)",
        ("phone", "+14155552671"): "the profile reached max_identifiers (2)",
    }


# --- merge_refusal and split_refusal -----------------------------------------------------------


def test_an_operator_merge_within_the_rules_is_allowed() -> None:
    a = profile("a", 9, ("user_id", "u"), ("email", "e1@x"))
    b = profile("b", 5, ("email", "e2@x"), ("anonymous_id", "x"))
    assert merge_refusal(a, [b], T0) is None


def test_an_operator_merge_of_two_user_ids_is_refused() -> None:
    a, b = profile("a", 9, ("user_id", "u1")), profile("b", 5, ("user_id", "u2"))
    assert merge_refusal(a, [b], T0) == "the merged profile would hold more than 1 user_id"


def test_an_operator_merge_counts_only_values_within_the_window() -> None:
    a = profile("a", 9, ("email", "e1@x"), ("email", "e2@x"), seen={("email", "e1@x"): 31})
    b = profile("b", 5, ("email", "e3@x"))
    assert merge_refusal(a, [b], T0, WINDOWED) is None
    assert merge_refusal(a, [b], T0, TWO_EMAILS) == "the merged profile would hold more than 2 email"


def test_an_operator_merge_respects_the_caps() -> None:
    rules = Rules.from_json({"max_merges": 2, "max_identifiers": 3})
    a = profile("a", 9, ("email", "e1@x"), merge_count=1)
    b = profile("b", 5, ("email", "e2@x"))
    assert merge_refusal(a, [b], T0, rules) is None
    assert "max_merges (2)" in (merge_refusal(a, [b, profile("c", 4)], T0, rules) or "")
    assert "max_merges (2)" in (merge_refusal(a, [profile("c", 4, merge_count=1)], T0, rules) or "")
    big = profile("b", 5, ("email", "e2@x"), ("device_id", "d"), ("anonymous_id", "x"))
    assert "max_identifiers (3)" in (merge_refusal(a, [big], T0, rules) or "")


def test_split_refusals() -> None:
    p = profile("p1", 9, ("user_id", "u"), ("email", "e@x"), ("anonymous_id", "a"))
    assert split_refusal(p, [("email", "e@x"), ("anonymous_id", "a")]) is None
    assert split_refusal(p, []) == "name at least one identifier to split off"
    assert split_refusal(p, [("email", "e@x"), ("device_id", "d")]) == "profile p1 does not hold device_id=d"
    assert split_refusal(p, list(p.identifiers)) == "splitting off every identifier would leave an empty profile"
