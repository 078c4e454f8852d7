"""core.decide, applied step by step in memory, against the reference model (identity_model.py).

Applied two ways: as the per-event handler and the store do it (Graph, below), and as the batch
handler does (cdp_identity.batch._Working, the graph a batch works on in memory).

Random event sequences over a small alphabet of identifiers, so that collisions, conflicting
user_ids, junk values, limits, windows and caps come up often.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_identity import batch, core
from cdp_identity.core import Decision, Key, Known
from identity_model import Model, Spec, keys_of, partition_of

T0 = datetime(2024, 1, 1, tzinfo=UTC)

# --- the alphabet ------------------------------------------------------------------------------

JUNK = ["", "  ", "null", "NULL", "-1", "0", "0000", "anonymous", "Anonymous", "undefined", "n/a", "NaN"]
VALUES: dict[str, list[str]] = {
    "user_id": ["u1", "u2", " u1 ", "U1"],
    "email": ["ada@x.com", " ADA@X.com ", "bob@x.com", "cy@x.com", "not-an-email"],
    "phone": ["(415) 555-2671", "+1 415 555 2671", "(212) 555-0188", "+44 20 7946 0958"],
    "device_id": ["d1", "d2", "d3"],
    "anonymous_id": ["a1", "a2", "a3"],
}
CUSTOM: dict[str, list[str]] = {
    "loyalty_id": ["L1", "L2"],
    "crm_id": ["c1", "c2"],
    "email_sha256": [
        hashlib.sha256(b"ada@x.com").hexdigest().upper(),
        hashlib.sha256(b"zed@x.com").hexdigest(),
        "not-a-hash",
    ],
}


@st.composite
def raw_events(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str]]:
    """One to three identifier types per event (few per event: profiles start apart and later
    events bridge them); about one value in eight is junk."""
    raw: dict[str, str] = {}
    custom: dict[str, str] = {}
    names = [*VALUES, *VALUES, *CUSTOM]  # built-in types twice as likely
    for id_type in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
        junk = draw(st.integers(0, 7)) == 0
        values = JUNK if junk else VALUES.get(id_type) or CUSTOM[id_type]
        (raw if id_type in VALUES else custom)[id_type] = draw(st.sampled_from(values))
    return raw, custom


@st.composite
def rule_sets(draw: st.DrawFn) -> tuple[core.Rules, Spec]:
    """Tight limits, sometimes with windows, sometimes with small caps; or the defaults."""
    if draw(st.integers(0, 4)) == 0:
        return core.DEFAULT_RULES, Spec()
    types: dict[str, Any] = {"user_id": {"priority": 1, "limit": 1}}
    windows = st.one_of(st.none(), st.sampled_from([10, 30.5]))
    for id_type, priority, limits in (("email", 2, [1, 2, 5]), ("phone", 3, [1, 2, 5]),
                                      ("email_sha256", 5, [1, 2, 5]), ("device_id", 6, [1, 3, 20]),
                                      ("anonymous_id", 7, [2, 5, 100])):
        window = draw(windows)
        types[id_type] = {"priority": priority, "limit": draw(st.sampled_from(limits)),
                          **({"window_days": window} if window else {})}
    custom = {"priority": 4, "limit": draw(st.sampled_from([1, 5]))}
    caps = {"max_merges": draw(st.sampled_from([1, 2, 3, 100])),
            "max_identifiers": draw(st.sampled_from([3, 5, 8, 1000]))}
    data = {"types": types, "custom": custom, **caps}
    rules, spec = core.Rules.from_json(data), Spec.from_json(data)
    return rules, spec


# Days since T0: few distinct values, so profiles created at the same moment (the tie-break by
# profile id) happen, and windows of 10 or 30.5 days include, exclude or sit exactly on earlier
# values (the boundary itself is pinned in test_identity_rules.py).
times = st.sampled_from([0, 0, 1, 5, 10, 11, 20, 30.5, 31, 45, 60, 90])


# --- core.decide applied in memory, the way the handler writes it ---------------------------------


@dataclass
class Graph:
    rules: core.Rules
    owner: dict[Key, str] = field(default_factory=dict)
    last_seen: dict[Key, datetime] = field(default_factory=dict)
    created_at: dict[str, datetime] = field(default_factory=dict)
    merge_count: dict[str, int] = field(default_factory=dict)
    merged_into: dict[str, str] = field(default_factory=dict)

    def resolve(self, keys: list[Key], at: datetime, new_id: str) -> Decision:
        owners = {k: self.owner[k] for k in keys if k in self.owner}
        known = {
            p: Known(p, self.created_at[p], self.merge_count[p],
                     {k: self.last_seen[k] for k, q in self.owner.items() if q == p})
            for p in set(owners.values())
        }
        decision = core.decide(keys, owners, known, new_id, at, self.rules)
        pid = decision.profile_id
        if decision.created:
            self.created_at[pid], self.merge_count[pid] = at, 0
        if decision.merged:
            for key, owner in list(self.owner.items()):
                if owner in decision.merged:
                    self.owner[key] = pid
            self.merge_count[pid] += len(decision.merged) + sum(self.merge_count[m] for m in decision.merged)
            for m in decision.merged:
                self.merged_into[m] = pid
                del self.created_at[m], self.merge_count[m]
        for key in decision.link:
            self.owner[key] = pid
            self.last_seen[key] = max(self.last_seen.get(key, at), at)
        dropped = {k for k, _ in decision.dropped}
        for key in [k for k in keys if k not in dropped and k not in decision.link]:  # already held: last_seen
            self.last_seen[key] = max(self.last_seen[key], at)
        return decision


def batch_step(working: batch._Working, keys: list[Key], at: datetime, new_id: str, rules: core.Rules) -> Decision:
    """The batch handler's path: decide against its in-memory working graph, then apply."""
    decision = core.decide(keys, working.owners, working.profiles, new_id, at, rules)
    dropped = {k for k, _ in decision.dropped}
    working.apply(decision, [k for k in keys if k not in dropped], new_id, at)
    return decision


def without_why(decision: Decision) -> Decision:
    """When linking would break several limits, the reason names whichever broken type comes
    first in the order the profile's identifiers are held in -- which differs between the two
    paths (and, from the database, is the order of an unordered SELECT). Compare the rest."""
    return replace(decision, dropped=tuple((k, "") for k, _ in decision.dropped))


def held_values(owner: Mapping[Key, str], profile: str, id_type: str) -> list[str]:
    return [v for (t, v), p in owner.items() if p == profile and t == id_type]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_sets(), st.lists(st.tuples(raw_events(), times), min_size=6, max_size=40))
def test_decide_applied_step_by_step_matches_the_reference_model(
    rule_set: tuple[core.Rules, Spec], events: list[tuple[tuple[dict[str, str], dict[str, str]], float]]
) -> None:
    rules, spec = rule_set
    graph, model = Graph(rules), Model(spec)
    working = batch._Working(owners={}, profiles={})
    for step, ((raw, custom), day) in enumerate(events):
        at = T0 + timedelta(days=day)
        keys = core.event_identifiers(raw, custom, rules)
        assert keys == keys_of(raw, custom, spec), (raw, custom)
        expected = model.apply(keys, at, new_id=f"p{step:02d}")
        if not keys:
            assert expected is None
            continue
        decision = graph.resolve(keys, at, f"p{step:02d}")
        assert without_why(batch_step(working, keys, at, f"p{step:02d}", rules)) == without_why(decision)
        assert expected is not None
        where = (step, raw, custom, decision)

        # The same profile, merges and dropped identifiers at every step, not just at the end.
        assert decision.profile_id == expected.profile_id, where
        assert decision.created == expected.created, where
        assert set(decision.merged) == expected.merged, where
        assert {k for k, _ in decision.dropped} == expected.dropped, where
        assert all(why for _, why in decision.dropped), where
        assert len(decision.dropped) == len({k for k, _ in decision.dropped}), where
        assert partition_of(graph.owner) == model.partition(), where
        assert graph.last_seen == model.last_seen, where
        assert working.owners == graph.owner, where
        assert {k: seen for p in working.profiles.values() for k, seen in p.identifiers.items()} == graph.last_seen

        # Limits: a type without a window never has more than `limit` values on one profile. A
        # windowed type is checked when linking: right after the step, the profile's values seen
        # within the window are within the limit -- unless the event was down to one identifier,
        # which always resolves (it may bring back an old value of its profile).
        for profile in set(graph.owner.values()):
            for id_type in {t for t, _ in graph.owner}:
                rule = rules.rule(id_type)
                values = held_values(graph.owner, profile, id_type)
                if rule.window_days is None:
                    assert len(values) <= rule.limit, (where, profile, id_type, values)
                elif profile == decision.profile_id and len(expected.kept) > 1:
                    recent = [v for v in values
                              if graph.last_seen[(id_type, v)] >= at - timedelta(days=rule.window_days)]
                    assert len(recent) <= rule.limit, (where, profile, id_type, recent)
        # Every identifier belongs to a live profile.
        assert set(graph.owner.values()) <= set(graph.created_at), where

    assert partition_of(graph.owner) == model.partition()
    assert {p: k.merge_count for p, k in working.profiles.items()} == graph.merge_count
    assert {p: model.merge_count[p] for p in model.created_at if p in set(model.owner.values())} == {
        p: graph.merge_count[p] for p in graph.created_at if p in set(graph.owner.values())
    }
