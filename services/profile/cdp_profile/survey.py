"""The scoring job's passes over the whole base, in a process of their own.

`python -m cdp_profile.survey` is started by the scoring job (jobs.py) once per round (child.py says
why, and how the two talk). It answers each request with one frame, and exits at the end of its
input:

- `("fit", now)`: every customer's score inputs, and the models fitted to them, answered as
  `("ok", (model rows, customers))`;
- `("rescore", model rows, now, topology)`: finds the profiles whose stored scores differ from what
  those models give them, and rescores them, `CHUNK` at a time: each chunk is read and rescored
  without locks, then its scores and their `profile_changed` events (into the outbox, for the
  service to publish) are written together in one statement, for the profiles nothing wrote
  meanwhile. Answered as `("ok", profiles found)`.

A request that fails is answered `("error", text)`. The models cross as their stored rows.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_common import db, eventlog
from cdp_profile import child, core, scoring, store
from cdp_profile.messages import changed_event

# Profiles read, rescored and written at a time.
CHUNK = 200


async def fit(engine: AsyncEngine, now: datetime) -> tuple[Mapping[str, Any], int]:
    async with engine.begin() as conn:
        base = [inputs async for rows in store.scoring_base(conn, customers_only=True) for _, inputs, _ in rows]
    return scoring.build_models(base, now).to_rows(), len(base)


async def rescore(engine: AsyncEngine, rows: Mapping[str, Any], now: datetime,
                  topology: eventlog.Topology) -> int:
    models = scoring.Models.from_rows(rows, now)
    moved: list[str] = []
    async with engine.begin() as conn:
        async for scanned in store.scoring_base(conn):
            moved += [profile_id for profile_id, inputs, stored in scanned
                      if scoring.score(inputs, models, now).key() != stored]
    for start in range(0, len(moved), CHUNK):
        await write_chunk(engine, await rescore_chunk(engine, moved[start:start + CHUNK], models, now, topology))
    return len(moved)


@dataclass(frozen=True)
class Chunk:
    """Profiles rescored, ready to write: when each was read (its `updated_at`), their new states,
    their scores as written (`store.score_rows`) and their events as outbox rows (profile id,
    subject, message id, payload)."""

    versions: Mapping[str, datetime]
    states: Sequence[core.ProfileState]
    scores: str
    events: Sequence[tuple[str, str, str, bytes]]


async def rescore_chunk(engine: AsyncEngine, profile_ids: Sequence[str], models: scoring.Models, now: datetime,
                        topology: eventlog.Topology) -> Chunk:
    """Reads and rescores profiles, and prepares what is written, holding no lock: this process
    runs at a lower priority, and on a busy machine it waits long for a CPU (a second or more per
    chunk), while every batch of the live consumer that touches a row it holds would wait too."""
    async with engine.connect() as conn:
        # Versions first: a write that lands between the two reads shows as a newer version.
        versions = await store.versions(conn, profile_ids)
        loaded = await store.load_many(conn, profile_ids, lock=False)
    states, events = rescored(list(loaded.states.values()), models, now, topology)
    return Chunk(versions={s.profile_id: versions[s.profile_id] for s in states}, states=states,
                 scores=store.score_rows(states),
                 events=[(s.profile_id, e.subject, e.event.id, eventlog.encode(e.event))
                         for s, e in zip(states, events, strict=True)])


async def write_chunk(engine: AsyncEngine, chunk: Chunk) -> int:
    """Writes a rescored chunk, its scores and their profile_changed events (into the outbox), in
    one statement on its own, for the profiles nothing wrote since they were read. A profile written
    since, or held by the consumer right now, is left to the next round: waiting for the
    consumer's lock could deadlock with a batch that locks its profiles in several statements (runs
    of events, then a merge's). Returns how many were written."""
    if not chunk.states:
        return 0
    async with engine.connect() as conn:
        alone = await conn.execution_options(isolation_level="AUTOCOMMIT")
        return await store.save_scores_if_unchanged(alone, chunk.versions, chunk.scores, chunk.events)


def rescored(
    loaded: Sequence[core.ProfileState], models: scoring.Models, now: datetime, topology: eventlog.Topology
) -> tuple[list[core.ProfileState], list[eventlog.Outgoing]]:
    """The profiles whose scores moved, rescored, and their profile_changed events."""
    cause = f"scores:{now.isoformat()}"
    states, out = [], []
    for before in loaded:
        state = core.with_scores(before, scoring.score(scoring.inputs_of(before), models, now))
        if before.scores is not None and state.scores is not None and before.scores.key() == state.scores.key():
            continue
        states.append(state)
        out.append(changed_event(topology, state, core.changed_fields(before, state), cause_id=cause))
    return states, out


async def serve(database_url: str, schema: str, requests: IO[bytes], answers: IO[bytes]) -> None:
    engine = db.create_engine(database_url, pool_size=1, search_path=schema, application_name="cdp-profile-scoring")
    try:
        while (request := child.read(requests)) is not None:
            try:
                match request:
                    case ("fit", now):
                        answer: tuple[str, Any] = ("ok", await fit(engine, now))
                    case ("rescore", rows, now, topology):
                        answer = ("ok", await rescore(engine, rows, now, topology))
                    case _:
                        answer = ("error", f"unknown request {request!r:.80}")
            except Exception as error:  # noqa: BLE001 - answered as text, which always pickles
                answer = ("error", f"{type(error).__name__}: {error}")
            child.write(answers, *answer)
    finally:
        await engine.dispose()


def main() -> None:
    child.become_child()
    asyncio.run(serve(os.environ["CDP_DATABASE_URL"], os.environ["CDP_PROFILE_SCHEMA"], sys.stdin.buffer,
                      sys.stdout.buffer))


if __name__ == "__main__":
    main()
