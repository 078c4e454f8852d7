"""A rebuild's projection: long stretches of the log folded in memory and written in bulk.

The live projection (handlers.py) reads, locks, folds and writes every touched profile once per
fetch batch of 200. A rebuild fills a schema nobody else reads or writes, from the start of the
log, so it applies a chunk of many thousand events in one transaction:

- the chunk's profiles are read once, without locks or identifiers (the chunk decides who owns
  each identifier it carries: the profile of the last event that carried it);
- its events are walked in log order with the live projection's own pieces: `handlers.recorded`,
  then `handlers.Walk` (an event of a merged-away profile goes to its survivor, a merge folds the
  merged profiles into it), then `handlers.rescore` once per touched profile;
- the timeline goes in with COPY, every touched profile and claimed identifier is written once,
  and merged-away profiles point at their survivors;
- merged-away profiles' timeline rows and identifiers move to their survivors later, in one
  statement per table (`settle`), and the secondary indexes are dropped for the load and made
  again by `settle`: nothing reads a profile's history until then.

A split reads and moves a profile's history: it settles first and goes through the live handler.
So does a chunk PostgreSQL refuses (an event already on the timeline, a value it rejects): it is
applied again through the live handlers in batches, one by one where a batch fails, as the live
consumer applies it, and what the live consumer dead-letters is skipped.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp.v1 import event_pb2
from cdp_common import eventlog
from cdp_common.consumer import infrastructure_failure
from cdp_profile import core, handlers, store

# Events per transaction when a stretch goes through the live handlers.
BATCH = 1000
# Profiles kept in memory between chunks, at most (a few KiB each): past it, the model is
# forgotten and the next chunks read their profiles again.
HELD = 50_000

log = structlog.get_logger("cdp.profile.rebuild")

Key = tuple[str, str]


class _Model:
    """What the rebuild has written so far, kept in memory across chunks (up to HELD profiles)."""

    def __init__(self) -> None:
        self.states: dict[str, core.ProfileState] = {}  # live profiles, as stored (scored)
        self.merged_into: dict[str, str] = {}
        self.stored: set[str] = set()  # profiles with a row
        self.owners: dict[Key, str] = {}  # identifiers with a row, and their profiles
        # Everything stored is held: an id not held is a new profile, an identifier not held a new row.
        self.complete = True

    def forget(self) -> None:
        """After a rollback, a split, or once it holds too much: what is stored is read again."""
        self.states, self.merged_into, self.stored, self.owners = {}, {}, set(), {}
        self.complete = False


class _Chunk(handlers.Walk):
    """One stretch of the log without splits, walked in memory onto the model; it also makes the
    timeline's rows and decides who owns each identifier it carries."""

    def __init__(self, model: _Model) -> None:
        super().__init__(model.states, model.merged_into, with_identifiers=False)
        self.owners: dict[Key, str] = {}
        self.timeline: list[tuple[Any, ...]] = []

    def add(self, row: store.Recorded) -> None:
        at = self.event(row)
        self.timeline.append(store.timeline_record(row, at))
        for key in row.identifiers:
            self.owners[key] = at


class Bulk:
    """Applies decoded events to the schema `engine`'s connections name (one nobody else writes)."""

    def __init__(self, engine: AsyncEngine, topology: eventlog.Topology, durable: str) -> None:
        self._engine = engine
        self._durable = durable
        self._models = handlers.ModelsCache()
        self._one_by_one, self._whole_batch, _ = handlers.make_handlers(topology, self._models, publish=False)
        self._model = _Model()
        # Merged away since the last settle -> survivor: their history has not moved yet.
        self._unmoved: dict[str, str] = {}
        self._dropped: list[str] = []  # definitions of the indexes to make again

    async def prepare(self) -> None:
        """Drops the secondary indexes (the unique ones stay: upserts and the timeline's dedupe need them)."""
        async with self._engine.begin() as conn:
            rows = (await conn.execute(text(
                "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE NOT i.indisunique "
                "AND c.relnamespace = CAST(current_schema() AS regnamespace) ORDER BY c.relname"
            ))).all()
            for row in rows:
                await conn.execute(text(f'DROP INDEX "{row.name}"'))
        self._dropped = [row.definition for row in rows]

    async def settle(self) -> None:
        """Moves merged-away profiles' history to their survivors and makes the indexes again:
        what reading a profile's history (a split, the live handlers, the swap) needs."""
        async with self._engine.begin() as conn:
            if self._unmoved:
                await store.move_history(conn, {m: handlers.placed(m, self._unmoved) for m in self._unmoved})
            for definition in self._dropped:
                await conn.execute(text(definition))
            if self._dropped:
                # The planner's statistics of what the live projection and the reads look rows up
                # by (of every column, ANALYZE takes several times as long: the jsonb ones).
                await conn.execute(text(
                    "ANALYZE events (profile_id, occurred_at, event_id), profiles (profile_id, merged_into), identifiers"
                ))
        self._unmoved, self._dropped = {}, []

    async def apply(self, events: Sequence[event_pb2.Event], sequence: int) -> int:
        """Applies events in log order, up to stream `sequence`; returns how many were skipped."""
        skipped, stretch = 0, list[event_pb2.Event]()
        for event in events:
            if event.type == "profile_split":
                skipped += await self._stretch(stretch)
                stretch = []
                await self.settle()
                self._model.forget()  # the split rewrote profiles behind its back
                skipped += await self._through_handlers([event])
            else:
                stretch.append(event)
        skipped += await self._stretch(stretch)
        async with self._engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO checkpoints (consumer, stream_sequence) VALUES (:c, :s) "
                    "ON CONFLICT (consumer) DO UPDATE SET stream_sequence = EXCLUDED.stream_sequence"
                ),
                {"c": self._durable, "s": sequence},
            )
        return skipped

    async def _stretch(self, events: Sequence[event_pb2.Event]) -> int:
        if not events:
            return 0
        try:
            with _collector_paused():
                async with self._engine.begin() as conn:
                    skipped, retired = await self._in_memory(conn, events)
        except Exception as error:  # noqa: BLE001 - decided below
            self._model.forget()  # it holds what was rolled back
            if infrastructure_failure(error):
                raise
            log.warning("rebuild_chunk_through_handlers", error=repr(error)[:500], events=len(events))
            await self.settle()
            return await self._through_handlers(events)
        self._unmoved.update(retired)
        if len(self._model.states) > HELD:
            self._model.forget()
        return skipped

    async def _in_memory(self, conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> tuple[int, dict[str, str]]:
        """A stretch without splits in one transaction; (skipped, merged away -> survivor)."""
        items: list[store.Recorded | event_pb2.Event] = []
        ids: set[str] = set()
        seen: set[str] = set()
        skipped = 0
        for event in events:
            if event.type == handlers.MERGED:
                items.append(event)
                ids.add(event.profiles_merged.survivor_id)
                ids.update(event.profiles_merged.merged_ids)
                continue
            try:
                row = handlers.recorded(event)
            except Exception:  # noqa: BLE001 - the live consumer dead-letters it
                skipped += 1
                continue
            if row.event_id not in seen:  # a redelivered event: the first copy counts
                seen.add(row.event_id)
                items.append(row)
                ids.add(row.profile_id)
        if not items:
            return skipped, {}
        model = self._model
        # The transaction begins with this statement (the COPYs below need it begun).
        models = await self._models.get(conn)
        if not model.complete:
            loaded = await _load(conn, ids - model.states.keys() - model.merged_into.keys())
            model.states.update(loaded.states)
            model.merged_into.update(loaded.merged_into)
            model.stored.update(loaded.states, loaded.merged_into)
        chunk = _Chunk(model)
        for item in items:
            if isinstance(item, store.Recorded):
                chunk.add(item)
            else:
                chunk.merge(item)
        written = chunk.done()
        states = handlers.rescore(written, models, eventlog.now(), chunk.before)
        await store.copy_timeline(conn, chunk.timeline)
        await store.copy_profiles(conn, [s for s in states if s.profile_id not in model.stored])
        await store.save_profiles(conn, [s for s in states if s.profile_id in model.stored], scores_of=[
            s.profile_id for s, w in zip(states, written, strict=True) if s.scores is not w.scores
        ])
        claimed = [(key, p) for key, p in chunk.owners.items() if model.owners.get(key) != p]
        if model.complete:
            await store.copy_identifiers(conn, [(key, p) for key, p in claimed if key not in model.owners])
            await store.claim_identifiers(conn, [(key, p) for key, p in claimed if key in model.owners])
        else:
            await store.claim_identifiers(conn, claimed)
        await store.mark_merged(conn, chunk.retired)
        # As stored, once committed (a failure forgets the model).
        for state in states:
            if state.profile_id in model.states:
                model.states[state.profile_id] = state
        model.stored.update(s.profile_id for s in states)
        model.stored.update(chunk.retired)
        model.owners.update(claimed)
        return skipped, chunk.retired

    async def _through_handlers(self, events: Sequence[event_pb2.Event]) -> int:
        """The live projection's way, in batches; returns how many failed (dead-lettered live)."""
        failed = 0
        for start in range(0, len(events), BATCH):
            batch = events[start:start + BATCH]
            async with self._engine.begin() as conn:
                try:
                    async with conn.begin_nested():
                        await self._whole_batch(conn, batch)
                except Exception as error:  # noqa: BLE001 - one by one below, as the live consumer does
                    if infrastructure_failure(error):
                        raise
                    for event in batch:
                        try:
                            async with conn.begin_nested():
                                await self._one_by_one(conn, event)
                        except Exception as caught:  # noqa: BLE001 - dead-lettered by the live consumer too
                            if infrastructure_failure(caught):
                                raise
                            failed += 1
        return failed


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused: a chunk allocates objects by the million (none in a
    cycle; reference counting frees them), and the collections they set off scan every object of
    the process each time the heap has grown by a quarter, which made a chunk half again as slow."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def _load(conn: AsyncConnection, profile_ids: Iterable[str]) -> store.Loaded:
    """These profiles as stored, and the survivors of the merged-away ones (to the end of the chain)."""
    asked = set(profile_ids)
    loaded = await store.load_many(conn, list(asked), lock=False, identifiers=False)
    for _ in range(handlers.MERGE_CHAIN):
        wanted = set(loaded.merged_into.values()) - asked
        if not wanted:
            break
        asked |= wanted
        more = await store.load_many(conn, list(wanted), lock=False, identifiers=False)
        loaded.states.update(more.states)
        loaded.merged_into.update(more.merged_into)
    return loaded
