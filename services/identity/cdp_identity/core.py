"""The identity rules: which profile an event belongs to, and which profiles merge. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cdp_common import identifiers as ids

Key = tuple[str, str]

# Highest first: when linking every identifier of an event would join two different user_ids,
# the lowest-priority identifiers are dropped from the event until it no longer would. Named
# custom ids (loyalty_id, crm_id, ...) take the "custom" rank; other hashes rank as hashed email.
PRIORITY = ("user_id", "email", "phone", "custom", "email_sha256", "device_id", "anonymous_id")


def priority(id_type: str) -> int:
    if id_type in PRIORITY:
        return PRIORITY.index(id_type)
    return PRIORITY.index("email_sha256" if id_type.endswith("_sha256") else "custom")


def event_identifiers(raw: Mapping[str, str], custom: Mapping[str, str]) -> list[Key]:
    """Normalised, de-junked identifiers of an event, highest priority first.

    An email also yields its SHA-256, so conversions matched by hashed email find the profile.
    """
    found: dict[Key, None] = {}
    for id_type, value in [*raw.items(), *custom.items()]:
        if not value:
            continue
        normal = ids.normalise(id_type, value)
        if normal is None:
            continue
        found[(id_type, normal)] = None
        if id_type == "email":
            found[("email_sha256", ids.sha256_hex(normal))] = None
    return sorted(found, key=lambda key: (priority(key[0]), key))


@dataclass(frozen=True)
class ProfileFacts:
    profile_id: str
    created_at: datetime
    user_id: str | None


@dataclass(frozen=True)
class Decision:
    profile_id: str
    created: bool
    merged: tuple[str, ...] = ()
    # Identifiers to attach (or re-attach) to the profile.
    link: tuple[Key, ...] = ()
    # Identifiers of the event that were left out to keep two user_ids apart.
    dropped: tuple[Key, ...] = ()
    reason: str = ""


def _user_ids(keys: Iterable[Key], owners: Mapping[Key, str], facts: Mapping[str, ProfileFacts]) -> set[str]:
    found: set[str] = set()
    for key in keys:
        if key[0] == "user_id":
            found.add(key[1])
        owner = owners.get(key)
        if owner is not None and facts[owner].user_id:
            found.add(facts[owner].user_id or "")
    return found


def decide(
    event_ids: list[Key],
    owners: Mapping[Key, str],
    facts: Mapping[str, ProfileFacts],
    new_profile_id: str,
) -> Decision:
    """No known identifier: a new profile. One profile: attach. Several: merge into the oldest.

    Two different user_ids never end up on one profile.
    """
    if not event_ids:
        raise ValueError("an event needs at least one usable identifier")
    keep = list(event_ids)
    dropped: list[Key] = []
    while len(keep) > 1 and len(_user_ids(keep, owners, facts)) > 1:
        dropped.append(keep.pop())
    candidates = sorted(
        {owners[key] for key in keep if key in owners},
        key=lambda pid: (facts[pid].created_at, pid),
    )
    link = tuple(key for key in keep if owners.get(key) != (candidates[0] if candidates else None))
    if not candidates:
        return Decision(profile_id=new_profile_id, created=True, link=tuple(keep), dropped=tuple(dropped))
    survivor, merged = candidates[0], tuple(candidates[1:])
    reason = ""
    if merged:
        shared = ", ".join(f"{t}={v}" for t, v in keep if owners.get((t, v)) in merged)
        reason = f"event linked {shared} to the profile holding " + ", ".join(
            f"{t}={v}" for t, v in keep if owners.get((t, v)) == survivor
        )
    return Decision(
        profile_id=survivor, created=False, merged=merged, link=link, dropped=tuple(dropped), reason=reason
    )
