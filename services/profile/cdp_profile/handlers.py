"""Profile's log consumer: resolved events and merges from identity become the read model.

A fetch batch is applied with a handful of queries: the events go to the timeline in one
statement (its primary key drops redelivered ones), every touched profile is read once, the
new events are folded in memory, each profile is rescored with the stored models, and the
profiles are written back in one statement. Merges and splits in a batch are applied one by
one, in log order. The per-event handler is the same path for one event. A rebuild (`bulk.py`)
applies long stretches of the log with the same pieces: `recorded`, `observed`, `placed`,
`merging` and `rescore`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, db, eventlog, identifiers
from cdp_common.consumer import (
    BatchHandler, ConsumerSpec, Handler, Overlays, PermanentError, Planned, StalePlan,
)
from cdp_profile import core, scoring, store
from cdp_profile.messages import changed_event

# Three batches in flight with the pipeline: one being written, one being decided, one on its way.
SPEC = ConsumerSpec(durable="profile-project", area="identity", max_ack_pending=600)
OPERATIONS = ("profiles_merged", "profile_split")
EMPTY: Mapping[str, core.ProfileState] = {}
# Merges followed from a merged-away id to its survivor, at most.
MERGE_CHAIN = 100


class ModelsCache:
    """The stored base-level models, re-read when the scoring job has stored new ones."""

    def __init__(self, check_every_seconds: float = 1.0) -> None:
        self._models = scoring.Models()
        self._version: datetime | None = None
        self._checked = -float("inf")
        self._every = check_every_seconds

    def put(self, models: scoring.Models) -> None:
        self._models, self._version, self._checked = models, models.computed_at, time.monotonic()

    async def get(self, conn: AsyncConnection) -> scoring.Models:
        if time.monotonic() - self._checked >= self._every:
            version = await store.models_version(conn)
            if version != self._version:
                self._models, self._version = await store.models(conn), version
            self._checked = time.monotonic()
        return self._models


def recorded(event: event_pb2.Event) -> store.Recorded:
    """A resolved event as its timeline row (PermanentError: it can never be applied)."""
    if not event.profile_id:
        raise PermanentError(f"{event.type} event {event.id} reached profile without a profile_id")
    held = event.identifiers
    ids = [(n, value) for n in identifiers.TYPES if (value := getattr(held, n))]
    if held.custom:
        ids += sorted(held.custom.items())
    return store.Recorded(
        event_id=event.id, profile_id=event.profile_id, type=event.type, name=event.name,
        occurred_at=convert.to_datetime(event.occurred_at) or convert.to_datetime(event.received_at) or eventlog.now(),
        source=event.source, properties=convert.struct_to_dict(event.properties),
        traits=convert.struct_to_dict(event.traits), consent=dict(event.consent), identifiers=ids,
    )


def observed(row: store.Recorded, with_identifiers: bool = True) -> core.Observed:
    return core.Observed(
        at=row.occurred_at, name=row.name, type=row.type, properties=row.properties, traits=row.traits,
        consent=row.consent, identifiers=tuple(row.identifiers) if with_identifiers else (),
    )


def placed(profile_id: str, merged_into: Mapping[str, str]) -> str:
    """Where an id lives now: itself, or the survivor at the end of its merges."""
    for _ in range(MERGE_CHAIN):
        if profile_id not in merged_into:
            break
        profile_id = merged_into[profile_id]
    return profile_id


async def _live(
    conn: AsyncConnection, profile_ids: Sequence[str], lock: bool = True
) -> tuple[store.Loaded, dict[str, str]]:
    """The touched profiles (locked), and where each id lives now (a merged-away id: its survivor)."""
    loaded = await store.load_many(conn, profile_ids, lock=lock)
    merged_into = dict(loaded.merged_into)
    pending = dict(loaded.merged_into)
    for _ in range(MERGE_CHAIN):
        if not pending:
            break
        survivors = await store.load_many(conn, list(pending.values()), lock=lock)
        loaded.states.update(survivors.states)
        merged_into.update(survivors.merged_into)
        pending = dict(survivors.merged_into)
    return loaded, {p: placed(p, merged_into) for p in profile_ids}


def merging(
    detail: event_pb2.ProfilesMerged, states: Mapping[str, core.ProfileState], merged_into: Mapping[str, str]
) -> tuple[core.ProfileState, list[str]] | None:
    """The survivor with the merged profiles folded in, and the ids merged away now; None when the
    merge changes nothing (the survivor is merged away itself, or every other id already is: a
    redelivered or replayed merge is not counted again)."""
    merged_ids = [p for p in dict.fromkeys(detail.merged_ids) if p != detail.survivor_id]
    fresh = [p for p in merged_ids if p not in merged_into]
    if not fresh or detail.survivor_id in merged_into:
        return None
    survivor = states.get(detail.survivor_id) or core.ProfileState(detail.survivor_id)
    return core.merge(survivor, [states.get(p) or core.ProfileState(p) for p in fresh]), fresh


def rescore(
    states: Sequence[core.ProfileState], models: scoring.Models, now: datetime,
    before: Mapping[str, core.ProfileState] = EMPTY,
) -> list[core.ProfileState]:
    """Scored with the stored models; a profile whose score inputs did not change keeps its
    scores (the scoring job keeps the time-dependent ones current)."""
    result = []
    for state in states:
        inputs, old = scoring.inputs_of(state), before.get(state.profile_id)
        if old is None or old.scores is None or state.scores is None or scoring.inputs_of(old) != inputs:
            state = replace(state, scores=scoring.score(inputs, models, now))
        result.append(state)
    return result


@dataclass
class _Projected:
    """A run of resolved events folded into their profiles, not written yet."""

    placed: list[store.Recorded]  # timeline rows, on the profiles the events live on now
    fresh: set[str]  # the ids of those not on the timeline yet: the ones folded
    before: Mapping[str, core.ProfileState]
    states: list[core.ProfileState]
    scores_of: list[str]  # the profiles whose scores changed
    out: list[eventlog.Outgoing]


class Projector(Overlays[_Projected]):
    """The live consumer's pipeline (`cdp_common.consumer.Pipeline`): a batch of resolved events is
    read, folded and scored while the batch before it is written. The profiles a batch changes and
    the events it records are kept here until its transaction commits, and overlay what the next
    batches read. Batches with merges or splits go the plain way."""

    def __init__(
        self,
        read: Callable[..., Awaitable[tuple[Mapping[str, core.ProfileState], list[store.Recorded],
                                               dict[str, event_pb2.Event]]]],
        fold: Callable[..., Awaitable[_Projected]],
        write: Callable[[AsyncConnection, _Projected], Awaitable[None]],
    ) -> None:
        super().__init__()
        self._read, self._fold, self._write = read, fold, write

    async def plan(self, conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Planned | None:
        if any(event.type in OPERATIONS for event in events):
            return None
        overlay: dict[str, core.ProfileState] = {}
        ahead: set[str] = set()
        for earlier in self.pending():
            overlay.update((s.profile_id, s) for s in earlier.states)
            ahead |= earlier.fresh
        before, placed, causes = await self._read(conn, events, lock=False, overlay=overlay)
        fresh = await store.unrecorded(conn, [r.event_id for r in placed if r.event_id not in ahead])
        projected = await self._fold(conn, before, placed, fresh, causes)

        async def write(conn: AsyncConnection) -> None:
            await self._write(conn, projected)

        return self.keep(Planned(write, projected.out), projected)


def make_handlers(
    topology: eventlog.Topology, cache: ModelsCache | None = None, publish: bool = True
) -> tuple[Handler, BatchHandler, Projector]:
    """The per-event handler, the batch handler the consumer tries first, and the pipeline of the
    live consumer. `publish=False` (a rebuild: the facts were published already) skips building
    profile_changed events."""
    models_cache = cache or ModelsCache()
    # Counted in timeline rows; unqualified names: the live schema, or the one a rebuild fills.
    statistics = db.Statistics(["events", "profiles", "identifiers"], first=2000)

    async def rescored(
        conn: AsyncConnection, states: Sequence[core.ProfileState], before: Mapping[str, core.ProfileState] = EMPTY
    ) -> list[core.ProfileState]:
        return rescore(states, await models_cache.get(conn), eventlog.now(), before)

    async def read(
        conn: AsyncConnection, events: Sequence[event_pb2.Event], lock: bool = True,
        overlay: Mapping[str, core.ProfileState] = EMPTY,
    ) -> tuple[Mapping[str, core.ProfileState], list[store.Recorded], dict[str, event_pb2.Event]]:
        """The touched profiles (`overlay` over the stored ones), the events as timeline rows on
        the profiles they live on now, and the events by id."""
        rows: dict[str, store.Recorded] = {}
        causes: dict[str, event_pb2.Event] = {}
        for event in events:
            rows.setdefault(event.id, recorded(event))
            causes[event.id] = event
        loaded, where = await _live(conn, sorted({r.profile_id for r in rows.values()}), lock=lock)
        before = {**loaded.states, **{p: overlay[p] for p in where.values() if p in overlay}}
        placed = [r if where[r.profile_id] == r.profile_id else replace(r, profile_id=where[r.profile_id])
                  for r in rows.values()]
        return before, placed, causes

    async def fold(
        conn: AsyncConnection, before: Mapping[str, core.ProfileState], placed: list[store.Recorded],
        fresh: set[str], causes: Mapping[str, event_pb2.Event],
    ) -> _Projected:
        """The fresh events folded into their profiles and rescored; one profile_changed each."""
        by_profile: dict[str, list[store.Recorded]] = {}
        for row in placed:
            if row.event_id in fresh:
                by_profile.setdefault(row.profile_id, []).append(row)
        folded = [
            core.fold(before.get(pid) or core.ProfileState(pid), (observed(r) for r in got))
            for pid, got in by_profile.items()
        ]
        states = await rescored(conn, folded, before) if folded else []
        out = []
        if publish:
            for state in states:
                last = by_profile[state.profile_id][-1].event_id
                fields = core.changed_fields(before.get(state.profile_id), state)
                out.append(changed_event(topology, state, fields, cause_id=last, cause=causes[last]))
        scores_of = [s.profile_id for s, f in zip(states, folded, strict=True) if s.scores is not f.scores]
        return _Projected(placed, fresh, before, states, scores_of, out)

    async def write(conn: AsyncConnection, projected: _Projected) -> None:
        """A planned projection, in the batch's transaction; StalePlan if the timeline moved."""
        # Read outside a transaction: the timeline and the scores (the scoring job may run beside
        # the consumer, in this process or another replica) must still be as read.
        moved = await store.rescored_since(conn, [
            projected.before[s.profile_id] for s in projected.states if s.profile_id in projected.before
        ])
        if moved:
            raise StalePlan(f"the scoring job rescored {len(moved)} of the batch's profiles meanwhile")
        recorded_now = await store.record_events(conn, projected.placed)
        if recorded_now != projected.fresh:
            raise StalePlan(f"{len(projected.fresh)} events were to be new on the timeline, {len(recorded_now)} are")
        await statistics.grew(conn, len(recorded_now))
        if projected.states:
            await store.save_many(conn, projected.states, projected.before, scores_of=projected.scores_of)

    async def project(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> list[eventlog.Outgoing]:
        """Resolved events: timeline, fold, rescore, write; one profile_changed per touched profile."""
        before, placed, causes = await read(conn, events)
        fresh = await store.record_events(conn, placed)
        await statistics.grew(conn, len(fresh))
        projected = await fold(conn, before, placed, fresh, causes)
        if projected.states:
            await store.save_many(conn, projected.states, before, scores_of=projected.scores_of)
        return projected.out

    def retired(cause: event_pb2.Event, profile_id: str, survivor_id: str) -> eventlog.Outgoing:
        event = eventlog.new_event(
            "profile_changed", event_id=eventlog.derived_id(cause.id, f"changed:{profile_id}"),
            source="profile", cause=cause,
        )
        event.profile_id = profile_id
        event.profile_changed.profile.profile_id = profile_id
        event.profile_changed.merged_into = survivor_id
        event.profile_changed.changed_fields.append("merged_into")
        return eventlog.Outgoing(topology.keyed("profile", profile_id, "changed"), event)

    async def on_merged(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        detail = event.profiles_merged
        loaded = await store.load_many(conn, [detail.survivor_id, *detail.merged_ids])
        plan = merging(detail, loaded.states, loaded.merged_into)
        if plan is None:
            return []
        merged, fresh = plan
        survivor = loaded.states.get(detail.survivor_id) or core.ProfileState(detail.survivor_id)
        [state] = await rescored(conn, [merged])
        await store.save_many(conn, [state], loaded.states)
        await store.retire(conn, fresh, detail.survivor_id)
        fields = core.changed_fields(survivor, state)
        return [
            changed_event(topology, state, fields, cause_id=event.id, cause=event),
            *(retired(event, p, detail.survivor_id) for p in fresh),
        ]

    async def recompute(conn: AsyncConnection, profile_id: str, merged_ids: Sequence[str]) -> core.ProfileState:
        """A profile folded again from its own timeline (after a split moved events away)."""
        # Identifiers come from the moved identifier rows: an event may have come through both sides.
        state = core.fold(
            core.ProfileState(profile_id, merged_ids=tuple(merged_ids)),
            (observed(r, with_identifiers=False) for r in await store.timeline(conn, profile_id)),
        )
        return replace(state, identifiers=await store.identifiers_of(conn, profile_id))

    async def on_split(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        detail = event.profile_split
        loaded = await store.load_many(conn, [detail.source_profile_id, detail.new_profile_id])
        source = loaded.states.get(detail.source_profile_id)
        keys = [(i.type, i.value) for i in detail.identifiers]
        await store.move_split(conn, detail.source_profile_id, detail.new_profile_id, keys)
        states = await rescored(conn, [
            await recompute(conn, detail.source_profile_id, source.merged_ids if source else ()),
            await recompute(conn, detail.new_profile_id, ()),
        ])
        await store.save_many(conn, states, loaded.states)
        return [
            changed_event(topology, s, core.changed_fields(loaded.states.get(s.profile_id), s) or ["identifiers"],
                          cause_id=event.id, cause=event)
            for s in states
        ]

    async def operation(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        if event.type == "profiles_merged":
            return await on_merged(conn, event)
        return await on_split(conn, event)

    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        if event.type in OPERATIONS:
            return await operation(conn, event)
        return await project(conn, [event])

    async def handle_batch(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Sequence[eventlog.Outgoing]:
        out: list[eventlog.Outgoing] = []
        run: list[event_pb2.Event] = []
        for event in events:
            if event.type in OPERATIONS:
                if run:
                    out.extend(await project(conn, run))
                    run = []
                out.extend(await operation(conn, event))
            else:
                run.append(event)
        if run:
            out.extend(await project(conn, run))
        return out

    return handle, handle_batch, Projector(read, fold, write)


def make_handler(topology: eventlog.Topology) -> Handler:
    """The per-event handler (tests drive it directly)."""
    return make_handlers(topology)[0]
