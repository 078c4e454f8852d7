"""Rebuilding the read model from the log while the service keeps answering from the current one.

1. A new schema, `profile_next`, is made by the same migrations. The base-level scoring models are
   copied into it, so rebuilt profiles are scored as the live ones are.
2. A process of its own (replay.py, started for the rebuild: the service's process goes on
   answering meanwhile) reads the identity stream from its start through an ephemeral consumer (no
   acknowledgements), and `bulk.py` applies it in chunks of up to 20,000 events through connections
   whose search_path is the new schema: each chunk folded in memory with the live projection's own
   pieces and written in one transaction (the timeline with COPY, each touched profile once), the
   secondary indexes made only once it has caught up. No facts are published: the live model
   published them already. It never applies past the live consumer's checkpoint.
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
from dataclasses import replace

import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_common import db
from cdp_common.consumer import Consumer
from cdp_common.service import Runtime
from cdp_profile import child, store
from cdp_profile.replay import Job, Progress

LIVE, NEXT, OLD = "profile", "profile_next", "profile_old"

log = structlog.get_logger("cdp.profile.rebuild")


class RebuildRefused(Exception):
    """A rebuild cannot start here (one is running, or this replica is a standby)."""


class RebuildFailed(Exception):
    """The rebuild's projection failed (the message names the error); the old read model stays."""


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
            swapped = stopped_live = False
            # While the live consumer is stopped, this holds its lock, so that no standby replica
            # starts applying the log to the old tables meanwhile.
            hold: AsyncConnection | None = None
            try:
                progress = Progress("rebuilding")
                async with contextlib.aclosing(self._replayed()) as reports:
                    async for kind, progress in reports:
                        progress = replace(progress, seconds=time.monotonic() - started)
                        if kind == "caught_up":
                            stopped_live = True
                            hold = await self._stop_live(engine)
                        else:
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
                if not swapped:
                    async with engine.begin() as conn:
                        await conn.execute(text(f"DROP SCHEMA IF EXISTS {NEXT} CASCADE"))
                if hold is not None:
                    await hold.invalidate()  # the session ends, and its lock with it
                    await hold.close()
                if stopped_live:
                    # Also when the rebuild was cancelled while the consumer was stopping: its loop
                    # ends first, so that one loop applies the log.
                    await self._live.stop()
                    await self._live.start(reposition=swapped)
            async with engine.begin() as conn:
                await conn.execute(text(f"DROP SCHEMA IF EXISTS {OLD} CASCADE"))
            yield replace(progress, phase="done", seconds=time.monotonic() - started)

    async def _replayed(self) -> AsyncGenerator[tuple[str, Progress], None]:
        """Starts the projection's process (replay.py), makes the new schema and the ephemeral
        consumer for it, and yields its reports: "progress" as it goes, then "caught_up" (the
        caller stops the live consumer before the next step), then "progress" again until it has
        reached the stopped consumer's checkpoint. The consumer is deleted whatever happens."""
        runtime, spec = self._runtime, self._live.spec
        stream = runtime.topology.stream(spec.area)
        env = {"CDP_NATS_URL": runtime.settings.nats_url, "CDP_DATABASE_URL": runtime.settings.database_url}
        consumer: str | None = None
        try:
            async with child.Child.started("cdp_profile.replay", env) as replaying:
                # The process imports its modules (most of a second) while the new schema is made.
                await self._prepare(runtime.engine)
                # Made here, not in the process: one that is killed cannot delete it.
                consumer = (await runtime.js.add_consumer(stream, ConsumerConfig(
                    deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0,
                    mem_storage=True, filter_subjects=list(spec.filter_subjects) or None,
                ))).name
                await replaying.send(("replay", Job(
                    namespace=runtime.topology.namespace, stream=stream, consumer=consumer, durable=spec.durable,
                    live_schema=LIVE, schema=NEXT,
                )))
                while True:
                    kind, progress = await replaying.receive()
                    if kind == "done":
                        return
                    yield kind, progress
                    if kind == "caught_up":
                        await replaying.send(("finish", None))
        except child.ChildFailed as failed:
            raise RebuildFailed(f"the rebuild failed: {failed}") from None
        finally:
            try:
                if consumer is not None:
                    await runtime.js.delete_consumer(stream, consumer)
            except Exception as error:  # noqa: BLE001 - it goes away on its own after inactive_threshold
                log.warning("rebuild_consumer_not_deleted", error=repr(error))

    async def _stop_live(self, engine: AsyncEngine) -> AsyncConnection:
        await self._live.stop()
        hold = await engine.connect()
        held = await hold.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": self._live.lock_key})
        if not held.scalar():
            await hold.close()
            raise RebuildRefused("another replica took over applying the log during the rebuild; run it there")
        return hold

    async def _prepare(self, engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {NEXT} CASCADE"))
        await db.migrate(engine, NEXT, store.MIGRATIONS)
        async with engine.begin() as conn:
            await conn.execute(text(f"INSERT INTO {NEXT}.models SELECT * FROM {LIVE}.models"))

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

