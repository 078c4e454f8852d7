"""Resolving a whole fetch batch at once: one read of the graph, decisions in memory, bulk writes.

Per-event round trips are the ceiling of a Python consumer; this does the same as resolving the
events one by one (the same `core.decide`, in log order, each seeing the ones before it) with a
handful of queries per batch. Operators' requests in a batch are applied one by one, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, db, eventlog, identifiers
from cdp_common.consumer import BatchHandler, Handler, Overlays, PermanentError, Planned, share_turn
from cdp_identity import core, store

_COMMANDS = ("merge_requested", "split_requested")
# Events decided between two turns of the event loop (`share_turn`).
_SHARE_EVERY = 100


@dataclass
class _Working:
    """The part of the graph a batch touches, as it stands after each decision."""

    owners: dict[core.Key, str]
    profiles: dict[str, core.Known]
    created: dict[str, datetime] = field(default_factory=dict)
    first_seen: dict[core.Key, datetime] = field(default_factory=dict)
    changed: dict[core.Key, None] = field(default_factory=dict)
    merged_into: dict[str, str] = field(default_factory=dict)
    merges: list[tuple[str, str, str, str, datetime]] = field(default_factory=list)
    # Profiles whose user_id may have changed (a user_id linked or merged in).
    user_changed: dict[str, None] = field(default_factory=dict)
    # Merge counts of profiles merged away in this batch, as they stood when they were.
    retired_merge_counts: dict[str, int] = field(default_factory=dict)

    def apply(self, decision: core.Decision, kept: Sequence[core.Key], event_id: str, at: datetime) -> None:
        pid = decision.profile_id
        if decision.created:
            self.created[pid] = at
            self.profiles[pid] = core.Known(pid, at, 0, {})
        survivor = self.profiles[pid]
        held = dict(survivor.identifiers)
        merges = survivor.merge_count
        for merged_id in decision.merged:
            other = self.profiles.pop(merged_id)
            self.retired_merge_counts[merged_id] = other.merge_count
            for key, seen in other.identifiers.items():
                self.owners[key] = pid
                held[key] = max(seen, held.get(key, seen))
                self.changed[key] = None
            merges += 1 + other.merge_count
            self.merged_into[merged_id] = pid
            self.merges.append((merged_id, pid, event_id, decision.reason, at))
        if decision.merged or any(t == "user_id" for t, _ in decision.link):
            self.user_changed[pid] = None
        for key in decision.link:
            if key not in self.owners:
                self.first_seen[key] = at
            self.owners[key] = pid
        for key in [*decision.link, *kept]:
            held[key] = max(at, held.get(key, at))
            self.changed[key] = None
        self.profiles[pid] = core.Known(pid, survivor.created_at, merges, held)


async def _load(conn: AsyncConnection, keys: Sequence[core.Key], overlays: Sequence[_Working] = ()) -> _Working:
    """The graph around `keys` as the database has it, overlaid with batches decided but not yet
    committed (oldest first): their owners and their profiles, each as complete as a read."""
    owners: dict[core.Key, str] = {}
    for overlay in overlays:
        owners.update((key, overlay.owners[key]) for key in keys if key in overlay.owners)
    owners = {**await store.owners(conn, [k for k in keys if k not in owners]), **owners}
    profiles: dict[str, core.Known] = {}
    wanted = set(owners.values())
    for overlay in reversed(overlays):
        profiles.update((p, overlay.profiles[p]) for p in wanted - profiles.keys() if p in overlay.profiles)
    profiles.update(await store.known(conn, sorted(wanted - profiles.keys())))
    return _Working(owners=owners, profiles=profiles)


async def _write(conn: AsyncConnection, w: _Working) -> None:
    if w.created:
        await conn.execute(
            text(
                "INSERT INTO identity.profiles (profile_id, created_at) "
                "SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:ats AS timestamptz[]))"
            ),
            {"ids": list(w.created), "ats": list(w.created.values())},
        )
    if w.changed:
        # One JSON parameter rather than an array per column: asyncpg type-checks every element.
        # Identifiers new to the graph are inserted; the others updated, mostly in place (HOT).
        fresh, seen_before = [], []
        for key in w.changed:
            owner = w.owners[key]
            last = w.profiles[owner].identifiers[key]
            first = w.first_seen.get(key)
            row = {"id_type": key[0], "id_value": key[1], "profile_id": owner, "last_seen": last}
            if first is None:
                seen_before.append(row)
            else:
                fresh.append({**row, "first_seen": first})
        if fresh:
            await conn.execute(
                text(
                    "INSERT INTO identity.identifiers (id_type, id_value, profile_id, first_seen, last_seen) "
                    "SELECT id_type, id_value, profile_id, first_seen, last_seen "
                    "FROM json_populate_recordset(NULL::identity.identifiers, CAST(:rows AS json))"
                ),
                {"rows": convert.to_json(fresh)},
            )
        if seen_before:
            await conn.execute(
                text(
                    "UPDATE identity.identifiers i SET profile_id = r.profile_id, "
                    "last_seen = GREATEST(i.last_seen, r.last_seen) "
                    "FROM json_populate_recordset(NULL::identity.identifiers, CAST(:rows AS json)) r "
                    "WHERE i.id_type = r.id_type AND i.id_value = r.id_value"
                ),
                {"rows": convert.to_json(seen_before)},
            )
    if w.merged_into:
        await conn.execute(
            text(
                "UPDATE identity.profiles p SET merged_into = m.s, user_id = NULL "
                "FROM unnest(CAST(:m AS text[]), CAST(:s AS text[])) AS m(id, s) WHERE p.profile_id = m.id"
            ),
            {"m": list(w.merged_into), "s": list(w.merged_into.values())},
        )
        await conn.execute(
            text(
                "INSERT INTO identity.merges (merged_id, survivor_id, event_id, reason, merged_at) "
                "SELECT * FROM unnest(CAST(:m AS text[]), CAST(:s AS text[]), CAST(:e AS text[]), "
                "CAST(:r AS text[]), CAST(:at AS timestamptz[])) ON CONFLICT (merged_id) DO NOTHING"
            ),
            {"m": [r[0] for r in w.merges], "s": [r[1] for r in w.merges], "e": [r[2] for r in w.merges],
             "r": [r[3] for r in w.merges], "at": [r[4] for r in w.merges]},
        )
    # Every survivor's count, also of one that was itself merged away later in the batch (as it
    # stood then), so a batch writes the same graph as its events one by one.
    survivors = sorted({s for _, s, _, _, _ in w.merges})
    if survivors:
        await conn.execute(
            text(
                "UPDATE identity.profiles p SET merge_count = c.n "
                "FROM unnest(CAST(:ids AS text[]), CAST(:n AS int[])) AS c(id, n) WHERE p.profile_id = c.id"
            ),
            {"ids": survivors, "n": [w.profiles[p].merge_count if p in w.profiles else w.retired_merge_counts[p]
                                     for p in survivors]},
        )
    users = sorted(p for p in w.user_changed if p in w.profiles)
    if users:
        await conn.execute(
            text(
                "UPDATE identity.profiles p SET user_id = (SELECT min(i.id_value) FROM identity.identifiers i "
                "WHERE i.profile_id = p.profile_id AND i.id_type = 'user_id') WHERE p.profile_id = ANY(:ids)"
            ),
            {"ids": users},
        )


def event_time(event: event_pb2.Event) -> datetime:
    return convert.to_datetime(event.occurred_at) or convert.to_datetime(event.received_at) or eventlog.now()


def event_keys(event: event_pb2.Event, rules: core.Rules) -> list[core.Key]:
    raw = {name: getattr(event.identifiers, name) for name in identifiers.TYPES}
    return core.event_identifiers(raw, event.identifiers.custom, rules)


Resolved = Callable[[event_pb2.Event, core.Decision, Sequence[core.Key]], Sequence[eventlog.Outgoing]]


async def _decide(
    conn: AsyncConnection, events: Sequence[event_pb2.Event], rules: core.Rules, resolved: Resolved,
    overlays: Sequence[_Working] = (),
) -> tuple[_Working, list[eventlog.Outgoing]]:
    """Resolves events in order, each seeing the decisions before it, in memory."""
    per_event = []
    for n, event in enumerate(events):
        await share_turn(n, _SHARE_EVERY)
        keys = event_keys(event, rules)
        if not keys:
            raise PermanentError(f"event {event.id} carries no usable identifier (all empty or blocked values)")
        per_event.append(keys)
    working = await _load(conn, sorted({k for keys in per_event for k in keys}), overlays)
    out: list[eventlog.Outgoing] = []
    for n, (event, keys) in enumerate(zip(events, per_event, strict=True)):
        await share_turn(n, _SHARE_EVERY)
        at = event_time(event)
        decision = core.decide(keys, working.owners, working.profiles, eventlog.derived_id(event.id, "profile"),
                               at, rules)
        dropped = {key for key, _ in decision.dropped}
        kept = [k for k in keys if k not in dropped]
        working.apply(decision, kept, event.id, at)
        out.extend(resolved(event, decision, kept))
    return working, out


async def resolve_events(
    conn: AsyncConnection, events: Sequence[event_pb2.Event], rules: core.Rules, resolved: Resolved,
    statistics: db.Statistics | None = None,
) -> list[eventlog.Outgoing]:
    """Resolves events in order, each seeing the decisions before it, and writes the result."""
    working, out = await _decide(conn, events, rules, resolved)
    await _write(conn, working)
    if statistics is not None:
        await statistics.grew(conn, len(working.created))
    return out


class Resolver(Overlays[_Working]):
    """The consumer's pipeline (`cdp_common.consumer.Pipeline`): a batch is decided while the one
    before it is written. The graph a batch changes is kept here until its transaction commits,
    and overlays what the next batches read, which the database does not show yet."""

    def __init__(self, rules: core.Rules, resolved: Resolved, statistics: db.Statistics) -> None:
        super().__init__()
        self._rules, self._resolved, self._statistics = rules, resolved, statistics

    async def plan(self, conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Planned | None:
        if any(event.type in _COMMANDS for event in events):
            return None  # operators' requests read and write the graph themselves
        working, out = await _decide(conn, events, self._rules, self._resolved, self.pending())

        async def write(conn: AsyncConnection) -> None:
            await _write(conn, working)
            await self._statistics.grew(conn, len(working.created))

        return self.keep(Planned(write, out), working)


async def merge(
    conn: AsyncConnection, decision: core.Decision, known: dict[str, core.Known], event_id: str, at: datetime
) -> None:
    """Applies an operator's merge of profiles already read (and locked) into `known`."""
    owners = {key: profile for profile, facts in known.items() for key in facts.identifiers}
    working = _Working(owners=owners, profiles=dict(known))
    working.apply(decision, (), event_id, at)
    await _write(conn, working)


def make_batch_handler(
    rules: core.Rules, one_by_one: Handler, resolved: Resolved, statistics: db.Statistics
) -> BatchHandler:
    async def handle(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Sequence[eventlog.Outgoing]:
        out: list[eventlog.Outgoing] = []
        run: list[event_pb2.Event] = []
        for event in events:
            if event.type in _COMMANDS:
                if run:
                    out.extend(await resolve_events(conn, run, rules, resolved, statistics))
                    run = []
                out.extend(await one_by_one(conn, event))
            else:
                run.append(event)
        if run:
            out.extend(await resolve_events(conn, run, rules, resolved, statistics))
        return out

    return handle
