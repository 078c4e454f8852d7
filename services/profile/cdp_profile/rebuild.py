"""Rebuilding the read model from the log while the service keeps answering from the current one.

1. A new schema, `profile_next`, is made by the same migrations. The base-level scoring models are
   copied into it, so rebuilt profiles are scored as the live ones are.
2. An ephemeral consumer reads the identity stream from its start (no acknowledgements), and
   `bulk.py` applies it in chunks of up to 20,000 events through connections whose search_path is
   the new schema: each chunk folded in memory with the live projection's own pieces and written
   in one transaction (the timeline with COPY, each touched profile once), the secondary indexes
   made only once it has caught up. No facts are published: the live model published them
   already. It never applies past the live consumer's checkpoint.
3. Once it has caught up, the live consumer stops, the rebuild reaches the live checkpoint
   exactly, and one transaction carries the checkpoints, unpublished outbox rows and models over
   and renames the schemas (`profile` -> `profile_old`, `profile_next` -> `profile`).
4. The connection pools are replaced (their prepared statements point at the old tables), the live
   consumer restarts from the checkpoint on the new schema, and the old schema is dropped.

GetProfile and the other reads answer from the old read model until step 3, and from the new
one after it. If the rebuild fails or is cancelled, the new schema is dropped and the live
consumer goes on as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_common import db, eventlog
from cdp_common.consumer import Consumer
from cdp_common.pull import Puller
from cdp_common.service import Runtime
from cdp_profile import store
from cdp_profile.bulk import Bulk

LIVE, NEXT, OLD = "profile", "profile_next", "profile_old"
# Messages per pull request, and events applied in one transaction at most.
FETCH, CHUNK = 5000, 20_000
# How often progress is reported while rebuilding (seconds).
_REPORT_EVERY = 0.25

log = structlog.get_logger("cdp.profile.rebuild")


class RebuildRefused(Exception):
    """A rebuild cannot start here (one is running, or this replica is a standby)."""


@dataclass(frozen=True)
class Progress:
    phase: str
    sequence: int = 0
    target: int = 0
    events: int = 0
    skipped: int = 0
    seconds: float = 0.0


class Rebuilder:
    def __init__(self, runtime: Runtime, live: Consumer, swapped: Callable[[], Awaitable[None]] | None = None) -> None:
        """`swapped` is called once the new read model is in place (other pools to renew)."""
        self._runtime = runtime
        self._live = live
        self._swapped = swapped
        self._running = asyncio.Lock()

    async def run(self) -> AsyncIterator[Progress]:
        if self._running.locked():
            raise RebuildRefused("a rebuild of the profile read model is already running")
        if not self._live.active:
            raise RebuildRefused(
                "this replica is a standby: ask the replica that applies the log (its log says "
                "consumer_repositioned / it is not 'standby')"
            )
        async with self._running:
            started = time.monotonic()
            engine = self._runtime.engine
            await self._prepare(engine)
            target_engine = db.create_engine(self._runtime.settings.database_url, pool_size=1, search_path=NEXT)
            swapped = False
            # While the live consumer is stopped, this holds its lock, so that no standby replica
            # starts applying the log to the old tables meanwhile.
            hold: AsyncConnection | None = None
            try:
                progress = Progress("rebuilding")
                bulk = Bulk(target_engine, self._runtime.topology, self._live.spec.durable)
                await bulk.prepare()
                async with contextlib.aclosing(self._replay(engine, bulk, started)) as steps:
                    async for progress in steps:
                        if progress.phase == "stopping":
                            hold = await self._stop_live(engine)
                            continue
                        yield progress
                yield replace(progress, phase="swapping", seconds=time.monotonic() - started)
                await self._swap(engine)
                swapped = True
                await engine.dispose()
                if self._swapped is not None:
                    await self._swapped()
                log.info("rebuilt", events=progress.events, skipped=progress.skipped,
                         seconds=round(time.monotonic() - started, 1))
            finally:
                await target_engine.dispose()
                if not swapped:
                    async with engine.begin() as conn:
                        await conn.execute(text(f"DROP SCHEMA IF EXISTS {NEXT} CASCADE"))
                if hold is not None:
                    await hold.invalidate()  # the session ends, and its lock with it
                    await hold.close()
                    await self._live.start(reposition=swapped)
            async with engine.begin() as conn:
                await conn.execute(text(f"DROP SCHEMA IF EXISTS {OLD} CASCADE"))
            yield replace(progress, phase="done", seconds=time.monotonic() - started)

    async def _stop_live(self, engine: AsyncEngine) -> AsyncConnection:
        await self._live.stop()
        hold = await engine.connect()
        held = await hold.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": self._live.lock_key})
        if not held.scalar():
            await hold.close()
            await self._live.start()
            raise RebuildRefused("another replica took over applying the log during the rebuild; run it there")
        return hold

    async def _prepare(self, engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {NEXT} CASCADE"))
        await db.migrate(engine, NEXT, store.MIGRATIONS)
        async with engine.begin() as conn:
            await conn.execute(text(f"INSERT INTO {NEXT}.models SELECT * FROM {LIVE}.models"))

    async def _live_position(self, engine: AsyncEngine) -> int:
        async with engine.connect() as conn:
            value = (
                await conn.execute(
                    text(f"SELECT stream_sequence FROM {LIVE}.checkpoints WHERE consumer = :c"),
                    {"c": self._live.spec.durable},
                )
            ).scalar()
        return int(value or 0)

    async def _replay(self, engine: AsyncEngine, bulk: Bulk, started: float) -> AsyncGenerator[Progress, None]:
        """Applies the log up to the live checkpoint; yields "stopping" once caught up, so the live
        consumer stops and the checkpoint holds still, then finishes at it (settled: the history
        of merged-away profiles moved and the indexes made, before the swap)."""
        runtime = self._runtime
        stream = runtime.topology.stream(self._live.spec.area)
        info = await runtime.js.add_consumer(stream, ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True,
            filter_subjects=list(self._live.spec.filter_subjects) or None,
        ))
        puller = Puller(runtime.nc, stream, info.name, FETCH, 1.0)
        progress, held, stopped, reported = Progress("rebuilding"), list[Msg](), False, 0.0
        try:
            while True:
                target = await self._live_position(engine)
                ready: list[Msg] = []
                # Up to a chunk, without waiting for more once the live position is reached.
                while len(ready) < CHUNK and (ready[-1].metadata.sequence.stream if ready else progress.sequence) < target:
                    if not held:
                        held = await puller.fetch()
                        if not held:
                            break
                    sequences = [m.metadata.sequence.stream for m in held]
                    within = next((i for i, s in enumerate(sequences) if s > target), len(held))
                    ready += held[:within]
                    held = held[within:]
                    if held:
                        break
                if ready:
                    applied, skipped = await _apply(bulk, ready)
                    progress = replace(progress, sequence=ready[-1].metadata.sequence.stream, target=target,
                                       events=progress.events + applied, skipped=progress.skipped + skipped,
                                       seconds=time.monotonic() - started)
                    if time.monotonic() - reported >= _REPORT_EVERY:
                        reported = time.monotonic()
                        yield progress
                    continue
                # Nothing left at or below the live position: caught up.
                await bulk.settle()
                if stopped:
                    return
                yield replace(progress, phase="stopping")
                stopped = True
        finally:
            await puller.forget()
            try:
                await runtime.js.delete_consumer(stream, info.name)
            except Exception as error:  # noqa: BLE001 - it goes away on its own after inactive_threshold
                log.warning("rebuild_consumer_not_deleted", error=repr(error))

    async def _swap(self, engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            for statement in (
                f"DROP SCHEMA IF EXISTS {OLD} CASCADE",
                f"INSERT INTO {NEXT}.checkpoints (consumer, stream_sequence) SELECT consumer, stream_sequence "
                f"FROM {LIVE}.checkpoints ON CONFLICT (consumer) DO UPDATE SET stream_sequence = EXCLUDED.stream_sequence",
                f"INSERT INTO {NEXT}.outbox (subject, msg_id, headers, payload) "
                f"SELECT subject, msg_id, headers, payload FROM {LIVE}.outbox ORDER BY id",
                f"DELETE FROM {NEXT}.models",
                f"INSERT INTO {NEXT}.models SELECT * FROM {LIVE}.models",
                f"ALTER SCHEMA {LIVE} RENAME TO {OLD}",
                f"ALTER SCHEMA {NEXT} RENAME TO {LIVE}",
            ):
                await conn.execute(text(statement))


async def _apply(bulk: Bulk, msgs: list[Msg]) -> tuple[int, int]:
    """One chunk into the new schema with its checkpoint; (applied, skipped)."""
    events, undecodable = [], 0
    for msg in msgs:
        try:
            events.append(eventlog.decode(msg.data))
        except Exception:  # noqa: BLE001 - the live consumer dead-lettered it too
            undecodable += 1
    failed = await bulk.apply(events, msgs[-1].metadata.sequence.stream)
    return len(events) - failed, undecodable + failed
