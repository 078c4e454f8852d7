"""Profile's log consumer: resolved events and merges from identity become the read model.

A fetch batch is applied with a handful of queries whatever it holds, splits aside: every touched
profile is read once; the batch is walked in log order in memory (an event folds into the profile
it lives on by then, a merge folds the merged profiles into their survivor); each changed profile
is rescored with the stored models; then merged-away profiles' history moves to their survivors,
the events go to the timeline (its primary key drops redelivered ones) and the profiles are written
back, one statement each. A split reads and moves a profile's history, so it is applied on its own,
in log order. The per-event handler is the same path for one event. A rebuild (`bulk.py`) applies
long stretches of the log with the same pieces: `recorded`, `Walk` and `rescore`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, db, eventlog, identifiers
from cdp_common.consumer import (
    BatchHandler, ConsumerSpec, Handler, Overlays, PermanentError, Planned, StalePlan, share_turn,
)
from cdp_profile import core, scoring, store
from cdp_profile.messages import changed_event

# Three batches in flight with the pipeline: one being written, one being decided, one on its way.
SPEC = ConsumerSpec(durable="profile-project", area="identity", max_ack_pending=600)
MERGED, SPLIT = "profiles_merged", "profile_split"
# Events (or profiles) a batch's plan works through between two turns of the event loop: about half a
# millisecond of CPU, so GetProfile and the health check are answered while the projection is busy
# (every 20, a call's every step queued behind 2 ms stretches: bench/profile.md).
TURN = 5
EMPTY: Mapping[str, core.ProfileState] = {}
EMPTY_MERGES: Mapping[str, str] = {}
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
    """The touched profiles (locked), and every merge on the way from them to their survivors
    (merged-away id -> survivor); the survivors are read too."""
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
    return loaded, merged_into


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
            state = core.with_scores(state, scoring.score(inputs, models, now))
        result.append(state)
    return result


class Walk:
    """A stretch of the log walked in log order in memory: each fresh event goes to the profile it
    lives on by then (folded lazily: a fold is the same in any order and grouping), each merge folds
    the merged profiles into their survivor. The live projection walks a batch over copies of what
    it read; a rebuild (`bulk.py`) walks a chunk over the profiles it keeps between chunks, and its
    states hold no identifiers (`with_identifiers=False`: it keeps who owns which on its own)."""

    def __init__(
        self, states: dict[str, core.ProfileState], merged_into: dict[str, str], with_identifiers: bool = True
    ) -> None:
        self.states = states  # live profiles, changed in place
        self.merged_into = merged_into  # changed in place
        self.before: dict[str, core.ProfileState] = {}  # the changed profiles as they were
        self.changed: dict[str, str] = {}  # live profiles changed -> the event that changed them last
        self.gone: dict[str, core.ProfileState] = {}  # changed here, then merged away: as they were
        self.retired: dict[str, str] = {}  # merged away here -> survivor
        self.merged_by: dict[str, str] = {}  # merged away here -> the merge's event id
        self._with_identifiers = with_identifiers
        self._unfolded: dict[str, list[store.Recorded]] = {}

    def event(self, row: store.Recorded) -> str:
        """Takes a fresh event; returns the profile it lives on."""
        at = placed(row.profile_id, self.merged_into)
        self._unfolded.setdefault(at, []).append(row)
        self.changed[at] = row.event_id
        return at

    def merge(self, event: event_pb2.Event) -> None:
        detail = event.profiles_merged
        self.fold([detail.survivor_id, *detail.merged_ids])
        plan = merging(detail, self.states, self.merged_into)
        if plan is None:
            return
        self._keep(detail.survivor_id)
        self.states[detail.survivor_id], fresh = plan
        self.changed[detail.survivor_id] = event.id
        for profile_id in fresh:
            self.merged_into[profile_id] = self.retired[profile_id] = detail.survivor_id
            self.merged_by[profile_id] = event.id
            state = self.states.pop(profile_id, None)
            if self.changed.pop(profile_id, None) is not None and state is not None:
                self.gone[profile_id] = state

    def unfolded(self) -> list[str]:
        """The profiles with events not folded in yet (`done` folds them)."""
        return list(self._unfolded)

    def fold(self, profile_ids: Sequence[str]) -> None:
        for profile_id in profile_ids:
            rows = self._unfolded.pop(profile_id, None)
            if rows:
                self._keep(profile_id)
                state = self.states.get(profile_id) or core.ProfileState(profile_id)
                self.states[profile_id] = core.fold(state, (observed(r, self._with_identifiers) for r in rows))

    def _keep(self, profile_id: str) -> None:
        state = self.states.get(profile_id)
        if state is not None and profile_id not in self.before:
            self.before[profile_id] = state

    def done(self) -> list[core.ProfileState]:
        """The changed profiles: the live ones, then the ones merged away after a change here."""
        self.fold(list(self._unfolded))
        return [*(self.states[p] for p in self.changed), *self.gone.values()]


@dataclass
class _Projected:
    """A batch walked and scored, not written yet."""

    placed: list[store.Recorded]  # timeline rows, on the profiles the events live on after the batch
    fresh: set[str]  # the ids of those not on the timeline yet: the ones folded
    before: Mapping[str, core.ProfileState]
    states: list[core.ProfileState]  # the live profiles changed
    gone: list[core.ProfileState]  # profiles changed, then merged away, as they were then
    scores_of: list[str]  # the profiles whose scores changed
    retired: dict[str, str]  # merged away by the batch -> survivor
    moved: dict[str, str]  # merged away by the batch -> where their history goes (the last survivor)
    out: list[eventlog.Outgoing]


class Projector(Overlays[_Projected]):
    """The live consumer's pipeline (`cdp_common.consumer.Pipeline`): a batch is read, walked and
    scored while the batch before it is written. The profiles a batch changes, the events it records
    and the merges it makes are kept here until its transaction commits, and overlay what the next
    batches read. Batches with a split go the plain way."""

    def __init__(
        self,
        read: Callable[..., Awaitable[tuple[Mapping[str, core.ProfileState], dict[str, store.Recorded],
                                               dict[str, str]]]],
        fold: Callable[..., Awaitable[_Projected]],
        write: Callable[[AsyncConnection, _Projected], Awaitable[None]],
    ) -> None:
        super().__init__()
        self._read, self._fold, self._write = read, fold, write

    async def plan(self, conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Planned | None:
        if any(event.type == SPLIT for event in events):
            return None
        overlay: dict[str, core.ProfileState] = {}
        merged: dict[str, str] = {}
        ahead: set[str] = set()
        for earlier in self.pending():
            overlay.update((s.profile_id, s) for s in earlier.states)
            merged.update(earlier.retired)
            ahead |= earlier.fresh
        before, rows, merged_into = await self._read(conn, events, lock=False, overlay=overlay, merged=merged)
        fresh = await store.unrecorded(conn, [e for e in rows if e not in ahead])
        projected = await self._fold(conn, events, before, rows, merged_into, fresh)

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
    # The columns the projection and the reads look rows up by (as a rebuild's swap analyses them).
    statistics = db.Statistics(["events (profile_id, occurred_at, event_id)", "profiles (profile_id, merged_into)",
                                "identifiers"], first=2000)

    async def rescored(
        conn: AsyncConnection, states: Sequence[core.ProfileState], before: Mapping[str, core.ProfileState] = EMPTY
    ) -> list[core.ProfileState]:
        models, now = await models_cache.get(conn), eventlog.now()
        result: list[core.ProfileState] = []
        for start in range(0, len(states), TURN):
            result += rescore(states[start:start + TURN], models, now, before)
            await asyncio.sleep(0)
        return result

    async def read(
        conn: AsyncConnection, events: Sequence[event_pb2.Event], lock: bool = True,
        overlay: Mapping[str, core.ProfileState] = EMPTY, merged: Mapping[str, str] = EMPTY_MERGES,
    ) -> tuple[Mapping[str, core.ProfileState], dict[str, store.Recorded], dict[str, str]]:
        """The touched profiles (`overlay` over the stored ones), the resolved events as timeline
        rows by id, and the merges that lead from the touched ids to their survivors (`merged`: the
        ones of batches planned before, over the stored ones)."""
        rows: dict[str, store.Recorded] = {}
        touched: set[str] = set()
        for n, event in enumerate(events):
            if event.type == MERGED:
                touched.add(event.profiles_merged.survivor_id)
                touched.update(event.profiles_merged.merged_ids)
            elif event.id not in rows:
                rows[event.id] = recorded(event)
                touched.add(event.profile_id)
            await share_turn(n, TURN)
        loaded, merged_into = await _live(conn, sorted(touched - merged.keys()), lock=lock)
        merged_into.update(merged)
        before = {p: s for p, s in loaded.states.items() if p not in merged_into}
        before.update((p, overlay[p]) for p in {placed(p, merged_into) for p in touched} if p in overlay)
        return before, rows, merged_into

    async def fold(
        conn: AsyncConnection, events: Sequence[event_pb2.Event], before: Mapping[str, core.ProfileState],
        rows: Mapping[str, store.Recorded], merged_into: Mapping[str, str], fresh: set[str],
    ) -> _Projected:
        """The batch walked in log order, the changed profiles rescored; one profile_changed per live
        profile changed, and one per profile merged away."""
        walk = Walk(dict(before), dict(merged_into))
        folded: set[str] = set()
        for n, event in enumerate(events):
            if event.type == MERGED:
                walk.merge(event)
            elif event.id in fresh and event.id not in folded:
                folded.add(event.id)
                walk.event(rows[event.id])
            await share_turn(n, TURN)
        for n, profile_id in enumerate(walk.unfolded()):
            walk.fold([profile_id])
            await share_turn(n, TURN)
        changed = walk.done()
        states = await rescored(conn, changed, before) if changed else []
        live, gone = states[:len(walk.changed)], states[len(walk.changed):]
        out = []
        if publish:
            causes = {event.id: event for event in events}
            for n, state in enumerate(live):
                cause = walk.changed[state.profile_id]
                fields = core.changed_fields(before.get(state.profile_id), state)
                out.append(changed_event(topology, state, fields, cause_id=cause, cause=causes[cause]))
                await share_turn(n, TURN)
            out.extend(merged_away(causes[walk.merged_by[p]], p, survivor) for p, survivor in walk.retired.items())
        return _Projected(
            placed=[r if (at := placed(r.profile_id, walk.merged_into)) == r.profile_id else replace(r, profile_id=at)
                    for r in rows.values()],
            fresh=fresh, before=before, states=live, gone=gone,
            scores_of=[s.profile_id for s, f in zip(states, changed, strict=True) if s.scores is not f.scores],
            retired=walk.retired, moved={p: placed(p, walk.merged_into) for p in walk.retired}, out=out,
        )

    async def write(conn: AsyncConnection, projected: _Projected, planned: bool = True) -> None:
        """A projection, in the batch's transaction. A planned one checks first that the scoring job
        did not rescore its profiles and that its events are still new (StalePlan otherwise)."""
        if planned:
            # Read outside a transaction: the scores (the scoring job may run beside the consumer,
            # in this process or another replica) must still be as read.
            read = [projected.before[s.profile_id] for s in (*projected.states, *projected.gone)
                    if s.profile_id in projected.before]
            moved = await store.rescored_since(conn, read)
            if moved:
                raise StalePlan(f"the scoring job rescored {len(moved)} of the batch's profiles meanwhile")
        if projected.moved:
            await store.move_history(conn, projected.moved)
        recorded_now = await store.record_events(conn, projected.placed)
        if recorded_now != projected.fresh:
            raise StalePlan(f"{len(projected.fresh)} events were to be new on the timeline, {len(recorded_now)} are")
        await statistics.grew(conn, len(recorded_now))
        if projected.gone:
            # As they were when merged away; their identifiers are the survivors' now.
            await store.save_profiles(conn, projected.gone, projected.scores_of)
        if projected.states:
            await store.save_many(conn, projected.states, projected.before, scores_of=projected.scores_of)
        if projected.retired:
            await store.mark_merged(conn, projected.retired)

    async def project(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> list[eventlog.Outgoing]:
        """Resolved events and merges, read under lock and written at once."""
        before, rows, merged_into = await read(conn, events)
        fresh = await store.unrecorded(conn, list(rows))
        projected = await fold(conn, events, before, rows, merged_into, fresh)
        await write(conn, projected, planned=False)
        return projected.out

    def merged_away(cause: event_pb2.Event, profile_id: str, survivor_id: str) -> eventlog.Outgoing:
        event = eventlog.new_event(
            "profile_changed", event_id=eventlog.derived_id(cause.id, f"changed:{profile_id}"),
            source="profile", cause=cause,
        )
        event.profile_id = profile_id
        event.profile_changed.profile.profile_id = profile_id
        event.profile_changed.merged_into = survivor_id
        event.profile_changed.changed_fields.append("merged_into")
        return eventlog.Outgoing(topology.keyed("profile", profile_id, "changed"), event)

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

    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        if event.type == SPLIT:
            return await on_split(conn, event)
        return await project(conn, [event])

    async def handle_batch(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Sequence[eventlog.Outgoing]:
        out: list[eventlog.Outgoing] = []
        run: list[event_pb2.Event] = []
        for event in events:
            if event.type == SPLIT:
                if run:
                    out.extend(await project(conn, run))
                    run = []
                out.extend(await on_split(conn, event))
            else:
                run.append(event)
        if run:
            out.extend(await project(conn, run))
        return out

    return handle, handle_batch, Projector(read, fold, write)


def make_handler(topology: eventlog.Topology) -> Handler:
    """The per-event handler (tests drive it directly)."""
    return make_handlers(topology)[0]
