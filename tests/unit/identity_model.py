"""A plain reference model of identity resolution, written from the rules, not from the code.

It must not call (or copy) `cdp_identity.core.decide`; the property tests compare the two. It
keeps the whole identity graph in dictionaries and applies one event at a time:

- Identifier types have a priority (lower = stronger) and a limit of distinct values per
  profile, optionally counting only values last seen within `window_days` of the event.
- An event's identifiers, strongest first. Candidates = the profiles owning any of them. While
  the union of the candidates' (windowed) values and the event's identifiers breaks a limit and
  more than one identifier is left, the weakest identifier is dropped and matching starts again.
- No candidate: a new profile with every kept identifier. One: attach to it. Several: merge them
  all into the oldest (created_at, then profile id), which takes every identifier they hold.
- max_merges: a merge adds to the survivor's merge_count each merged profile plus the merges it
  carried. A survivor whose merge_count would so exceed the cap merges nothing; the event's
  identifiers owned by the other profiles are dropped instead.
- max_identifiers: new identifiers beyond it are dropped; the event still resolves.
- Every identifier the event keeps is last seen at max(last seen, event time).

It also normalises raw identifiers its own simple way (enough for the values the tests use),
so the tests can check `event_identifiers` against it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

Key = tuple[str, str]

JUNK = {"-1", "null", "none", "nil", "undefined", "anonymous", "unknown", "n/a", "nan"}


@dataclass(frozen=True)
class Rule:
    priority: int
    limit: int
    window_days: float | None = None


DEFAULT_TYPES: dict[str, Rule] = {
    "user_id": Rule(1, 1),
    "email": Rule(2, 5),
    "phone": Rule(3, 5),
    "email_sha256": Rule(5, 5),
    "device_id": Rule(6, 20),
    "anonymous_id": Rule(7, 100),
}
DEFAULT_CUSTOM = Rule(4, 5)


@dataclass
class Spec:
    types: dict[str, Rule] = field(default_factory=lambda: dict(DEFAULT_TYPES))
    custom: Rule = DEFAULT_CUSTOM
    max_identifiers: int = 1000
    max_merges: int = 100

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Spec:
        """The rules file's format (no validation: the tests only pass valid files)."""
        types = dict(DEFAULT_TYPES)
        for name, raw in (data.get("types") or {}).items():
            types[name] = Rule(raw["priority"], raw["limit"], raw.get("window_days"))
        custom = data.get("custom")
        return cls(
            types=types,
            custom=DEFAULT_CUSTOM if custom is None else Rule(custom["priority"], custom["limit"],
                                                              custom.get("window_days")),
            max_identifiers=data.get("max_identifiers", 1000),
            max_merges=data.get("max_merges", 100),
        )

    def rule(self, id_type: str) -> Rule:
        if id_type in self.types:
            return self.types[id_type]
        if id_type.endswith("_sha256") and "email_sha256" in self.types:
            return self.types["email_sha256"]
        return self.custom

    def strength(self, key: Key) -> tuple[int, str, str]:
        # Lower sorts first = stronger; ties between types of one priority go by name, then value.
        return (self.rule(key[0]).priority, key[0], key[1])


# --- normalisation (only as much as the tests' alphabet needs) ---------------------------------


def _junk(value: str) -> bool:
    return value.lower() in JUNK or all(c in "0-" for c in value)


def normalise(id_type: str, value: str) -> str | None:
    value = value.strip()
    if _junk(value):
        return None
    if id_type == "email":
        value = value.lower()
        if "@" not in value:
            return None
    elif id_type == "phone":
        digits = "".join(c for c in value if c.isdigit())
        if value.startswith("+"):
            value = "+" + digits
        elif len(digits) == 10:  # a US number without its country code
            value = "+1" + digits
        else:
            return None
        if not 8 <= len(value) <= 16 or not digits.strip("0"):
            return None
    elif id_type.endswith("_sha256"):
        value = value.lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            return None
    return None if _junk(value) else value


def keys_of(raw: Mapping[str, str], custom: Mapping[str, str], spec: Spec) -> list[Key]:
    found: set[Key] = set()
    for id_type, value in [*raw.items(), *custom.items()]:
        normal = normalise(id_type, value)
        if normal is None:
            continue
        found.add((id_type, normal))
        if id_type == "email":
            found.add(("email_sha256", hashlib.sha256(normal.encode()).hexdigest()))
    return sorted(found, key=spec.strength)


# --- the graph ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    profile_id: str
    created: bool
    merged: frozenset[str]
    kept: frozenset[Key]
    dropped: frozenset[Key]


class Model:
    def __init__(self, spec: Spec | None = None) -> None:
        self.spec = spec or Spec()
        self.owner: dict[Key, str] = {}
        self.last_seen: dict[Key, datetime] = {}
        self.created_at: dict[str, datetime] = {}  # live profiles only
        self.merge_count: dict[str, int] = {}
        self.merged_into: dict[str, str] = {}
        self._made = 0

    def held(self, profile: str) -> list[Key]:
        return [k for k, p in self.owner.items() if p == profile]

    def _counted(self, profile: str, id_type: str, at: datetime) -> set[str]:
        window = self.spec.rule(id_type).window_days
        return {
            value
            for (t, value) in self.held(profile)
            if t == id_type and (window is None or self.last_seen[(t, value)] >= at - timedelta(days=window))
        }

    def _breaks_a_limit(self, keys: list[Key], candidates: Iterable[str], at: datetime) -> bool:
        candidates = list(candidates)
        for id_type in {t for t, _ in keys} | {t for p in candidates for t, _ in self.held(p)}:
            values = {v for t, v in keys if t == id_type}
            for profile in candidates:
                values |= self._counted(profile, id_type, at)
            if len(values) > self.spec.rule(id_type).limit:
                return True
        return False

    def apply(self, event_keys: Iterable[Key], at: datetime, new_id: str | None = None) -> Outcome | None:
        """Resolves one event; None (and no change) when it has no usable identifier."""
        keys = sorted(set(event_keys), key=self.spec.strength)
        if not keys:
            return None
        dropped: list[Key] = []
        while True:
            candidates = {self.owner[k] for k in keys if k in self.owner}
            if len(keys) == 1 or not self._breaks_a_limit(keys, candidates, at):
                break
            dropped.append(keys.pop())  # the weakest

        merged: set[str] = set()
        if not candidates:
            if new_id is None:
                new_id = f"model-{self._made}"
            self._made += 1
            profile, created = new_id, True
            self.created_at[profile] = at
            self.merge_count[profile] = 0
        else:
            profile, created = min(candidates, key=lambda p: (self.created_at[p], p)), False
            others = candidates - {profile}
            adds = sum(1 + self.merge_count[o] for o in others)
            if others and self.merge_count[profile] + adds > self.spec.max_merges:
                refused = [k for k in keys if self.owner.get(k) in others]
                dropped += refused
                keys = [k for k in keys if k not in refused]
            elif others:
                merged = others
                for key, owner in list(self.owner.items()):
                    if owner in others:
                        self.owner[key] = profile
                self.merge_count[profile] += adds
                for other in others:
                    self.merged_into[other] = profile
                    del self.created_at[other], self.merge_count[other]

        room = max(0, self.spec.max_identifiers - len(self.held(profile)))
        new = [k for k in keys if k not in self.owner]
        over = new[room:]
        dropped += over
        keys = [k for k in keys if k not in over]
        for key in keys:
            self.owner[key] = profile
            self.last_seen[key] = max(self.last_seen.get(key, at), at)
        return Outcome(profile, created, frozenset(merged), frozenset(keys), frozenset(dropped))

    def partition(self) -> set[frozenset[Key]]:
        return partition_of(self.owner)


def partition_of(owners: Mapping[Key, str]) -> set[frozenset[Key]]:
    """The identifiers grouped by profile, without the profiles' names."""
    groups: dict[str, set[Key]] = {}
    for key, profile in owners.items():
        groups.setdefault(profile, set()).add(key)
    return {frozenset(g) for g in groups.values()}
