"""A rebuild's projection in a process of its own: `python -m cdp_profile.replay`, started by
rebuild.py for one rebuild (child.py says why, and how the two talk).

- `("replay", Job)`: reads the stream from its start through the ephemeral consumer the service
  made (no acknowledgements), and bulk.py applies it to `Job.schema` in chunks of up to CHUNK
  events, never past the live consumer's checkpoint. Answered `("progress", Progress)` every 0.25 s, then `("caught_up",
  Progress)` once nothing is left at or below the checkpoint (settled: the history of merged-away
  profiles moved, the indexes made).
- `("finish", None)`: the live consumer has stopped and its checkpoint holds still. Applies the
  rest up to it, settles again, and answers `("done", Progress)`.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import IO

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_common import db, eventlog, logs
from cdp_common.pull import Puller
from cdp_common.service import connect_nats
from cdp_profile import child
from cdp_profile.bulk import Bulk

# Messages per pull request, and events applied in one transaction at most.
FETCH, CHUNK = 5000, 20_000
# How often progress is reported while rebuilding (seconds).
_REPORT_EVERY = 0.25

log = structlog.get_logger("cdp.profile.rebuild")


@dataclass(frozen=True)
class Progress:
    phase: str
    sequence: int = 0
    target: int = 0
    events: int = 0
    skipped: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Job:
    namespace: str
    stream: str
    consumer: str  # an ephemeral one from the stream's start, made (and deleted) by the service
    durable: str  # the live consumer, whose checkpoint the rebuild reaches
    live_schema: str
    schema: str  # the one rebuilt


async def _live_position(engine: AsyncEngine, job: Job) -> int:
    async with engine.connect() as conn:
        value = (
            await conn.execute(
                text(f"SELECT stream_sequence FROM {job.live_schema}.checkpoints WHERE consumer = :c"),
                {"c": job.durable},
            )
        ).scalar()
    return int(value or 0)


async def replay(
    nc: NATS, engine: AsyncEngine, job: Job, report: Callable[[str, Progress], None],
    stopped: Callable[[], Awaitable[None]],
) -> Progress:
    """Applies the log up to the live checkpoint; reports "caught_up" and waits for the live consumer
    to have `stopped`, then finishes at the checkpoint as it is then."""
    started = time.monotonic()
    bulk = Bulk(engine, eventlog.Topology(job.namespace), job.durable)
    await bulk.prepare()
    puller = Puller(nc, job.stream, job.consumer, FETCH, 1.0)
    progress, held, finishing, reported = Progress("rebuilding"), list[Msg](), False, 0.0
    try:
        while True:
            target = await _live_position(engine, job)
            ready: list[Msg] = []
            # Up to a chunk, without waiting for more once the live position is reached.
            while len(ready) < CHUNK and (ready[-1].metadata.sequence.stream if ready else progress.sequence) < target:
                if not held:
                    held = await puller.fetch()
                    if not held:
                        break
                # Those at or below the live position (Msg.metadata parses the reply subject at each
                # read: about 5% of this process's CPU when it was read for every message).
                within = bisect.bisect_right(held, target, key=_sequence)
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
                    report("progress", progress)
                continue
            # Nothing left at or below the live position: caught up.
            await bulk.settle()
            progress = replace(progress, seconds=time.monotonic() - started)
            if finishing:
                return progress
            report("caught_up", progress)
            await stopped()
            finishing = True
    finally:
        await puller.forget()


def _sequence(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


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


class _Ended(Exception):
    """The service closed this process's input (it gave up on the rebuild)."""


async def serve(nats_url: str, database_url: str, requests: IO[bytes], answers: IO[bytes]) -> None:
    async def expect(kind: str) -> object:
        request = await asyncio.to_thread(child.read, requests)
        if request is None:
            raise _Ended
        if not (isinstance(request, tuple) and len(request) == 2 and request[0] == kind):
            raise ValueError(f"expected a {kind!r} request, got {request!r:.80}")
        return request[1]

    async def stopped() -> None:
        await expect("finish")

    try:
        job = await expect("replay")
    except _Ended:
        return
    if not isinstance(job, Job):
        child.write(answers, "error", f"not a replay job: {job!r:.80}")
        return
    engine = db.create_engine(database_url, pool_size=1, search_path=job.schema, application_name="cdp-profile-replay")
    nc = await connect_nats(nats_url, "cdp-profile-replay")
    try:
        progress = await replay(nc, engine, job, lambda kind, p: child.write(answers, kind, p), stopped)
        child.write(answers, "done", progress)
    except _Ended:
        pass
    except Exception as error:  # noqa: BLE001 - answered as text, which always pickles
        log.error("rebuild_failed", error=repr(error))
        child.write(answers, "error", f"{type(error).__name__}: {error}")
    finally:
        await nc.close()
        await engine.dispose()


def main() -> None:
    child.become_child()
    logs.configure("profile", os.environ.get("CDP_LOG_LEVEL", "info"))
    asyncio.run(serve(os.environ["CDP_NATS_URL"], os.environ["CDP_DATABASE_URL"], sys.stdin.buffer,
                      sys.stdout.buffer))


if __name__ == "__main__":
    # As the module cdp_profile.replay, not as __main__: the Job it gets and the Progress it sends
    # are pickled by class name, and the service knows them by that one.
    import importlib

    importlib.import_module("cdp_profile.replay").main()
