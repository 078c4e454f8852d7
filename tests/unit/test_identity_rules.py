"""cdp_identity.core: which identifiers an event carries, and which profile it belongs to."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta

import pytest

from cdp_identity.core import Decision, Key, ProfileFacts, decide, event_identifiers

T0 = datetime(2024, 1, 1, tzinfo=UTC)
ADA_SHA = hashlib.sha256(b"ada@example.com").hexdigest()


def facts(*profiles: tuple[str, int, str | None]) -> dict[str, ProfileFacts]:
    """(profile_id, age in days before now-ish, user_id)."""
    return {pid: ProfileFacts(pid, T0 - timedelta(days=age), uid) for pid, age, uid in profiles}


# --- event_identifiers -------------------------------------------------------------------------


def test_email_is_trimmed_lower_cased_and_also_hashed() -> None:
    found = event_identifiers({"email": "  Ada@Example.COM "}, {})
    assert ("email", "ada@example.com") in found
    assert ("email_sha256", ADA_SHA) in found
    assert len(found) == 2


def test_identifiers_come_highest_priority_first() -> None:
    found = event_identifiers(
        {"anonymous_id": "anon-1", "device_id": "dev-1", "email": "ada@example.com",
         "phone": "+15550100", "user_id": "u-1"},
        {},
    )
    assert [t for t, _ in found] == ["user_id", "email", "phone", "email_sha256", "device_id", "anonymous_id"]


def test_custom_identifiers_rank_above_device_and_anonymous_ids() -> None:
    found = event_identifiers({"anonymous_id": "anon-1", "device_id": "d-1"}, {"crm_id": "c-9"})
    assert [t for t, _ in found] == ["crm_id", "device_id", "anonymous_id"]


JUNK = ["null", "-1", "0000", "anonymous", "", "  ", "undefined", "NULL", "0"]


@pytest.mark.parametrize("junk", JUNK)
def test_blocked_junk_values_never_appear(junk: str) -> None:
    found = event_identifiers(
        {"user_id": junk, "anonymous_id": junk, "device_id": junk, "email": junk},
        {"loyalty_id": junk, "email_sha256": junk},
    )
    assert found == []


@pytest.mark.parametrize("junk", [j for j in JUNK if j != "-1"])
def test_blocked_junk_phone_values_never_appear(junk: str) -> None:
    assert event_identifiers({"phone": junk}, {}) == []


def test_blocked_phone_minus_one_never_appears() -> None:
    assert event_identifiers({"phone": "-1"}, {}) == []


def test_junk_is_dropped_but_good_identifiers_stay() -> None:
    found = event_identifiers({"user_id": "null", "anonymous_id": "anon-7", "email": "anonymous"}, {})
    assert found == [("anonymous_id", "anon-7")]


def test_a_hashed_email_sent_by_an_ad_platform_equals_the_one_derived_from_the_email() -> None:
    found = event_identifiers({"email": "ADA@example.com"}, {"email_sha256": ADA_SHA.upper()})
    assert found.count(("email_sha256", ADA_SHA)) == 1
    assert len(found) == 2


def test_custom_identifiers_are_normalised_and_kept() -> None:
    found = event_identifiers({"user_id": "u-1"}, {"loyalty_id": "  L-77 "})
    assert found == [("user_id", "u-1"), ("loyalty_id", "L-77")]


def test_every_custom_identifier_ranks_above_the_hashed_email() -> None:
    found = event_identifiers({"email": "ada@example.com"}, {"crm_id": "c-1", "loyalty_id": "L-1"})
    types = [t for t, _ in found]
    assert types.index("loyalty_id") < types.index("email_sha256")
    assert types.index("crm_id") < types.index("email_sha256")


# --- decide ------------------------------------------------------------------------------------


def test_an_event_without_identifiers_is_refused() -> None:
    with pytest.raises(ValueError):
        decide([], {}, {}, "p-new")


def test_no_known_identifier_creates_a_new_profile_with_every_identifier() -> None:
    event_ids = event_identifiers({"user_id": "u-1", "email": "ada@example.com"}, {})
    d = decide(event_ids, {}, {}, "p-new")
    assert d == Decision(profile_id="p-new", created=True, link=tuple(event_ids))


def test_one_owner_attaches_and_links_only_the_new_identifiers() -> None:
    event_ids = event_identifiers({"anonymous_id": "anon-1", "email": "ada@example.com"}, {})
    owners = {("anonymous_id", "anon-1"): "p1"}
    d = decide(event_ids, owners, facts(("p1", 3, None)), "p-new")
    assert d.profile_id == "p1"
    assert not d.created
    assert d.merged == ()
    assert set(d.link) == {("email", "ada@example.com"), ("email_sha256", ADA_SHA)}
    assert d.dropped == ()


def test_several_owners_merge_into_the_oldest_profile() -> None:
    event_ids = event_identifiers({"anonymous_id": "anon-1", "email": "ada@example.com", "device_id": "d-1"}, {})
    owners = {
        ("anonymous_id", "anon-1"): "p-young",
        ("email", "ada@example.com"): "p-old",
        ("device_id", "d-1"): "p-middle",
    }
    f = facts(("p-young", 1, None), ("p-old", 30, "u-1"), ("p-middle", 10, None))
    d = decide(event_ids, owners, f, "p-new")
    assert d.profile_id == "p-old"
    assert not d.created
    assert d.merged == ("p-middle", "p-young")  # oldest first
    # Identifiers owned by the merged-away profiles move over; the survivor's stay put.
    assert set(d.link) == {("anonymous_id", "anon-1"), ("device_id", "d-1"), ("email_sha256", ADA_SHA)}
    assert "anonymous_id=anon-1" in d.reason and "email=ada@example.com" in d.reason


def test_the_survivor_is_the_oldest_whatever_the_profile_ids_sort_as() -> None:
    event_ids = [("email", "a@b.c"), ("anonymous_id", "x")]
    owners = {("email", "a@b.c"): "aaa", ("anonymous_id", "x"): "zzz"}
    d = decide(event_ids, owners, facts(("aaa", 1, None), ("zzz", 2, None)), "p-new")
    assert (d.profile_id, d.merged) == ("zzz", ("aaa",))


def test_profiles_created_at_the_same_moment_merge_deterministically() -> None:
    event_ids = [("email", "a@b.c"), ("anonymous_id", "x")]
    owners = {("email", "a@b.c"): "p-b", ("anonymous_id", "x"): "p-a"}
    f = facts(("p-a", 5, None), ("p-b", 5, None))
    assert decide(event_ids, owners, f, "n").profile_id == decide(list(reversed(event_ids)), owners, f, "n").profile_id


def test_a_user_id_owned_elsewhere_is_not_joined_through_a_shared_email() -> None:
    # Bob logs in on a device whose email field still says Ada's address: Bob must not become Ada.
    event_ids = event_identifiers({"user_id": "bob", "email": "ada@example.com"}, {})
    owners = {("email", "ada@example.com"): "p-ada", ("email_sha256", ADA_SHA): "p-ada",
              ("user_id", "ada"): "p-ada"}
    d = decide(event_ids, owners, facts(("p-ada", 10, "ada")), "p-new")
    assert d.profile_id == "p-new"
    assert d.created
    assert d.merged == ()
    assert d.link == (("user_id", "bob"),)
    assert set(d.dropped) == {("email", "ada@example.com"), ("email_sha256", ADA_SHA)}


def test_two_profiles_with_different_user_ids_are_never_merged() -> None:
    event_ids = event_identifiers({"email": "ada@example.com", "anonymous_id": "anon-1"}, {})
    owners = {("email", "ada@example.com"): "p-ada", ("anonymous_id", "anon-1"): "p-bob"}
    f = facts(("p-ada", 1, "ada"), ("p-bob", 50, "bob"))
    d = decide(event_ids, owners, f, "p-new")
    assert d.merged == ()
    assert d.profile_id == "p-ada"  # the higher-priority identifier wins, not the older profile
    assert d.dropped == (("anonymous_id", "anon-1"),)
    assert ("anonymous_id", "anon-1") not in d.link


def test_the_lowest_priority_identifiers_are_dropped_first() -> None:
    event_ids = event_identifiers({"user_id": "bob", "phone": "+15550100", "device_id": "d-ada"}, {})
    owners = {("device_id", "d-ada"): "p-ada"}
    d = decide(event_ids, owners, facts(("p-ada", 1, "ada")), "p-new")
    assert d.dropped == (("device_id", "d-ada"),)
    assert d.link == (("user_id", "bob"), ("phone", "+15550100"))
    assert d.created


def test_the_same_user_id_on_two_profiles_does_merge() -> None:
    event_ids = [("user_id", "ada"), ("anonymous_id", "anon-1")]
    owners = {("user_id", "ada"): "p1", ("anonymous_id", "anon-1"): "p2"}
    d = decide(event_ids, owners, facts(("p1", 5, "ada"), ("p2", 1, "ada")), "p-new")
    assert (d.profile_id, d.merged, d.dropped) == ("p1", ("p2",), ())


# --- properties over random identity graphs (seeded, so every run checks the same cases) -------

TYPES = ("user_id", "email", "phone", "email_sha256", "device_id", "anonymous_id")


def _random_case(rng: random.Random) -> tuple[list[Key], dict[Key, str], dict[str, ProfileFacts]]:
    profiles: dict[str, ProfileFacts] = {}
    owners: dict[Key, str] = {}
    for n in range(rng.randint(0, 5)):
        pid = f"p{n}"
        uid = rng.choice([None, None, "u0", "u1", "u2", "u3"])
        if uid is not None and any(f.user_id == uid for f in profiles.values()):
            uid = None  # identity keeps one profile per user_id
        profiles[pid] = ProfileFacts(pid, T0 + timedelta(hours=rng.randint(0, 3)), uid)
        if uid is not None:
            owners[("user_id", uid)] = pid
    pool = [(t, f"{t[:2]}{i}") for t in TYPES[1:] for i in range(3)]
    for key in pool:
        if profiles and rng.random() < 0.5:
            owners[key] = rng.choice(sorted(profiles))
    raw: dict[str, str] = {}
    for t in TYPES:
        if rng.random() < 0.5:
            raw[t] = rng.choice(["u0", "u1", "u2", "u9"]) if t == "user_id" else f"{t[:2]}{rng.randint(0, 2)}"
    if not raw:
        raw["anonymous_id"] = "an0"
    event_ids = sorted(raw.items(), key=lambda kv: TYPES.index(kv[0]))
    return event_ids, owners, profiles


@pytest.mark.parametrize("seed", range(20))
def test_decide_properties_on_random_graphs(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        event_ids, owners, f = _random_case(rng)
        d = decide(event_ids, owners, f, "p-new")

        # Dropped identifiers are the lowest-priority tail of the event, lowest first.
        kept = event_ids[: len(event_ids) - len(d.dropped)]
        assert list(d.dropped) == list(reversed(event_ids[len(kept):]))
        assert kept, "at least one identifier is always kept"

        # Never two user_ids on one profile: the survivor, everything merged into it and every
        # identifier linked to it name at most one user_id.
        on_profile = {f[p].user_id for p in (d.profile_id, *d.merged) if p in f and f[p].user_id}
        on_profile |= {v for t, v in d.link if t == "user_id"}
        assert len(on_profile) <= 1, (event_ids, owners, d)

        owning = {owners[k] for k in kept if k in owners}
        if not owning:
            assert d.created and d.profile_id == "p-new" and d.link == tuple(kept)
        else:
            assert not d.created
            oldest = min(owning, key=lambda p: (f[p].created_at, p))
            assert d.profile_id == oldest
            assert set(d.merged) == owning - {oldest}
            assert d.profile_id not in d.merged
            # Every kept identifier ends up on the survivor.
            assert {k for k in kept if owners.get(k) != oldest} == set(d.link)

        # Nothing is dropped when keeping everything would not join two user_ids.
        all_uids = {v for t, v in event_ids if t == "user_id"} | {
            f[owners[k]].user_id for k in event_ids if k in owners and f[owners[k]].user_id
        }
        if len(all_uids) <= 1:
            assert d.dropped == ()
