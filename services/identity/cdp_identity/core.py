"""The identity rules: which profile an event belongs to, which profiles merge, what is left out.

Pure: no I/O. The rules are configurable (`Rules.from_json`): per identifier type a priority and a
limit of values per profile (optionally counting only values seen within a time window), blocked
junk values, and caps per profile.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cdp_common import identifiers as ids

Key = tuple[str, str]


class InvalidRules(ValueError):
    """The identity rules are malformed; the message names the offending key."""


@dataclass(frozen=True)
class TypeRule:
    # Lower is stronger: when an event would break a limit, its weakest identifiers are dropped.
    priority: int
    # Distinct values of this type one profile may hold.
    limit: int
    # Count only values seen within this many days of the event (None: all of them).
    window_days: float | None = None


DEFAULT_BLOCKED = (
    r"[0-]*", r"-1", r"null", r"none", r"nil", r"undefined", r"anonymous", r"unknown", r"n/a", r"nan",
)


@dataclass(frozen=True)
class Rules:
    types: Mapping[str, TypeRule]
    # For named custom ids (loyalty_id, crm_id, ...) without a rule of their own.
    custom: TypeRule = TypeRule(priority=4, limit=5)
    blocked: tuple[re.Pattern[str], ...] = tuple(re.compile(p, re.I) for p in DEFAULT_BLOCKED)
    # Caps per profile. At max_identifiers, new identifiers are not linked (the event still
    # resolves); at max_merges, a profile merges no more (the event's identifiers held by other
    # profiles are left out of it instead).
    max_identifiers: int = 1000
    max_merges: int = 100
    phone_region: str = "US"
    # Each type's rule once looked up (a dozen look-ups per event).
    _rules: dict[str, TypeRule] = field(default_factory=dict, init=False, repr=False, compare=False)

    def rule(self, id_type: str) -> TypeRule:
        found = self._rules.get(id_type)
        if found is None:
            if id_type in self.types:
                found = self.types[id_type]
            elif id_type.endswith("_sha256"):
                found = self.types.get("email_sha256", self.custom)
            else:
                found = self.custom
            self._rules[id_type] = found
        return found

    def order(self, key: Key) -> tuple[int, str, str]:
        return (self.rule(key[0]).priority, key[0], key[1])

    @classmethod
    def from_json(cls, data: Any) -> Rules:
        """Rules from a JSON object (see docs/identity.md); missing keys keep the defaults."""
        if not isinstance(data, Mapping):
            raise InvalidRules("identity rules must be a JSON object")
        unknown = set(data) - {"types", "custom", "blocked", "max_identifiers", "max_merges", "phone_region"}
        if unknown:
            raise InvalidRules(f"unknown key(s): {', '.join(sorted(unknown))}")
        types = dict(DEFAULT_RULES.types)
        if not isinstance(data.get("types", {}), Mapping):
            raise InvalidRules("types: must be an object of type name -> rule")
        for name, raw in (data.get("types") or {}).items():
            if name not in ids.TYPES and not ids.valid_custom_type(name) and not name.endswith("_sha256"):
                raise InvalidRules(f"types.{name}: not an identifier type name")
            types[name] = _type_rule(f"types.{name}", raw)
        custom = _type_rule("custom", data["custom"]) if "custom" in data else DEFAULT_RULES.custom
        blocked = DEFAULT_RULES.blocked
        if "blocked" in data:
            if not isinstance(data["blocked"], list):
                raise InvalidRules("blocked: must be a list of regular expressions")
            try:
                blocked = tuple(re.compile(str(p), re.I) for p in data["blocked"])
            except re.error as error:
                raise InvalidRules(f"blocked: {error}") from None
        caps = {}
        for name in ("max_identifiers", "max_merges"):
            value = data.get(name, getattr(DEFAULT_RULES, name))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRules(f"{name}: must be a positive integer")
            caps[name] = value
        region = data.get("phone_region", DEFAULT_RULES.phone_region)
        if not isinstance(region, str) or not re.fullmatch(r"[A-Z]{2}", region):
            raise InvalidRules("phone_region: must be an ISO 3166 country code such as US or DE")
        return cls(types=types, custom=custom, blocked=blocked, phone_region=region, **caps)


def _type_rule(where: str, raw: Any) -> TypeRule:
    if not isinstance(raw, Mapping):
        raise InvalidRules(f"{where}: must be an object with priority and limit")
    unknown = set(raw) - {"priority", "limit", "window_days"}
    if unknown:
        raise InvalidRules(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    priority, limit, window = raw.get("priority"), raw.get("limit"), raw.get("window_days")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise InvalidRules(f"{where}.priority: must be an integer")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidRules(f"{where}.limit: must be a positive integer")
    if window is not None and (
        not isinstance(window, int | float) or isinstance(window, bool) or not 0 < window <= 36_500
    ):
        raise InvalidRules(f"{where}.window_days: must be a number of days from 0 to 36500")
    return TypeRule(priority, limit, None if window is None else float(window))


DEFAULT_RULES = Rules(
    types={
        "user_id": TypeRule(priority=1, limit=1),
        "email": TypeRule(priority=2, limit=5),
        "phone": TypeRule(priority=3, limit=5),
        "email_sha256": TypeRule(priority=5, limit=5),
        "device_id": TypeRule(priority=6, limit=20),
        "anonymous_id": TypeRule(priority=7, limit=100),
    }
)


def event_identifiers(raw: Mapping[str, str], custom: Mapping[str, str], rules: Rules = DEFAULT_RULES) -> list[Key]:
    """Normalised, de-junked identifiers of an event, strongest first.

    An email also yields its SHA-256, so conversions matched by hashed email find the profile.
    """
    found: dict[Key, None] = {}
    for id_type, value in [*raw.items(), *custom.items()]:
        if not value:
            continue
        normal = ids.normalise(id_type, value, rules.blocked, rules.phone_region)
        if normal is None:
            continue
        found[(id_type, normal)] = None
        if id_type == "email":
            found[("email_sha256", ids.sha256_hex(normal))] = None
    return sorted(found, key=rules.order)


@dataclass(frozen=True)
class Known:
    """What the graph holds about one profile the event touches."""

    profile_id: str
    created_at: datetime
    merge_count: int = 0
    # Each identifier with when it was last seen.
    identifiers: Mapping[Key, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    profile_id: str
    created: bool
    merged: tuple[str, ...] = ()
    # Identifiers to attach (or re-attach) to the profile.
    link: tuple[Key, ...] = ()
    # Identifiers of the event that were left out, each with why.
    dropped: tuple[tuple[Key, str], ...] = ()
    reason: str = ""


def _over_limit(
    keep: Sequence[Key], profiles: Sequence[Known], at: datetime, rules: Rules
) -> str | None:
    """The type whose limit the union of `profiles` and `keep` would break, if any."""
    values: dict[str, set[str]] = {}
    # Per type, the oldest last-seen that still counts (None: every value counts).
    since: dict[str, datetime | None] = {}
    for known in profiles:
        for (id_type, value), seen in known.identifiers.items():
            if id_type not in since:
                window = rules.rule(id_type).window_days
                since[id_type] = None if window is None else at - timedelta(days=window)
            cutoff = since[id_type]
            if cutoff is None or seen >= cutoff:
                values.setdefault(id_type, set()).add(value)
    for id_type, value in keep:
        values.setdefault(id_type, set()).add(value)
    for id_type, found in values.items():
        if len(found) > rules.rule(id_type).limit:
            return id_type
    return None


def decide(
    event_ids: Sequence[Key],
    owners: Mapping[Key, str],
    known: Mapping[str, Known],
    new_profile_id: str,
    at: datetime,
    rules: Rules = DEFAULT_RULES,
) -> Decision:
    """No known identifier: a new profile. One profile: attach. Several: merge into the oldest,
    unless that would break a limit: then the event's weakest identifiers are dropped and the
    matching is tried again. With the default rules two user_ids never end up on one profile.
    """
    if not event_ids:
        raise ValueError("an event needs at least one usable identifier")
    keep = sorted(dict.fromkeys(event_ids), key=rules.order)
    dropped: list[tuple[Key, str]] = []
    while True:
        candidates = sorted({owners[k] for k in keep if k in owners}, key=lambda p: (known[p].created_at, p))
        broken = _over_limit(keep, [known[p] for p in candidates], at, rules)
        if broken is None or len(keep) == 1:
            break
        key = keep.pop()
        dropped.append((key, f"linking it would give a profile more than {rules.rule(broken).limit} {broken}"))
    if not candidates:
        link, dropped_cap = _cap_identifiers(keep, 0, rules)
        return Decision(new_profile_id, True, link=tuple(link), dropped=tuple(dropped + dropped_cap))
    survivor, merged = candidates[0], candidates[1:]
    if merged and known[survivor].merge_count + sum(1 + known[m].merge_count for m in merged) > rules.max_merges:
        left_out = [k for k in keep if owners.get(k) in merged]
        dropped += [(k, f"profile {survivor} reached max_merges ({rules.max_merges})") for k in left_out]
        keep = [k for k in keep if k not in left_out]
        merged = []
    held = len({key for p in [survivor, *merged] for key in known[p].identifiers})
    new = [k for k in keep if k not in owners]
    linkable, dropped_cap = _cap_identifiers(new, held, rules)
    link = [k for k in keep if (k in owners and owners[k] != survivor) or k in linkable]
    reason = ""
    if merged:
        shared = ", ".join(f"{t}={v}" for t, v in keep if owners.get((t, v)) in merged)
        held_by = ", ".join(f"{t}={v}" for t, v in keep if owners.get((t, v)) == survivor)
        reason = f"one event carried {shared} (held by the merged profile) and {held_by} (held by the survivor)"
    return Decision(survivor, False, tuple(merged), tuple(link), tuple(dropped + dropped_cap), reason)


def _cap_identifiers(new: Sequence[Key], held: int, rules: Rules) -> tuple[list[Key], list[tuple[Key, str]]]:
    room = max(0, rules.max_identifiers - held)
    why = f"the profile reached max_identifiers ({rules.max_identifiers})"
    return list(new[:room]), [(k, why) for k in new[room:]]


def merge_refusal(survivor: Known, others: Sequence[Known], at: datetime, rules: Rules = DEFAULT_RULES) -> str | None:
    """Why an operator's merge must not happen (the same limits and caps as automatic merges)."""
    broken = _over_limit([], [survivor, *others], at, rules)
    if broken is not None:
        return f"the merged profile would hold more than {rules.rule(broken).limit} {broken}"
    if survivor.merge_count + sum(1 + o.merge_count for o in others) > rules.max_merges:
        return f"the survivor would exceed max_merges ({rules.max_merges})"
    if len({k for p in [survivor, *others] for k in p.identifiers}) > rules.max_identifiers:
        return f"the merged profile would exceed max_identifiers ({rules.max_identifiers})"
    return None


def split_refusal(profile: Known, keys: Sequence[Key]) -> str | None:
    """Why identifiers cannot be split off a profile."""
    if not keys:
        return "name at least one identifier to split off"
    missing = [f"{t}={v}" for t, v in keys if (t, v) not in profile.identifiers]
    if missing:
        return f"profile {profile.profile_id} does not hold {', '.join(missing)}"
    if set(keys) >= set(profile.identifiers):
        return "splitting off every identifier would leave an empty profile"
    return None
