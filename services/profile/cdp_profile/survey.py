"""The scoring job's passes over the whole base, in a process of their own.

`python -m cdp_profile.survey` is started by the scoring job (jobs.py) once per round (child.py says
why, and how the two talk). It answers each request with one frame, and exits at the end of its
input:

- `("fit", now)`: every customer's score inputs, and the models fitted to them, answered as
  `("ok", (model rows, customers))`;
- `("rescore", model rows, now, topology)`: finds the profiles whose stored scores differ from what
  those models give them, and rescores them, `CHUNK` per transaction: each chunk's scores and
  their `profile_changed` events (into the outbox, for the service to publish) are written
  together. Answered as `("ok", profiles found)`.

A request that fails is answered `("error", text)`. The models cross as their stored rows.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_common import db, eventlog
from cdp_profile import child, core, scoring, store
from cdp_profile.messages import changed_event

# Profiles rescored per transaction: bounds how long rows stay locked against the consumer.
CHUNK = 200


async def fit(engine: AsyncEngine, now: datetime) -> tuple[Mapping[str, Any], int]:
    async with engine.begin() as conn:
        base = [inputs async for rows in store.scoring_base(conn, customers_only=True) for _, inputs, _ in rows]
    return scoring.build_models(base, now).to_rows(), len(base)


async def rescore(engine: AsyncEngine, schema: str, rows: Mapping[str, Any], now: datetime,
                  topology: eventlog.Topology) -> int:
    models = scoring.Models.from_rows(rows, now)
    moved: list[str] = []
    async with engine.begin() as conn:
        async for scanned in store.scoring_base(conn):
            moved += [profile_id for profile_id, inputs, stored in scanned
                      if scoring.score(inputs, models, now).key() != stored]
    for start in range(0, len(moved), CHUNK):
        # Read again under lock: the consumer may have changed a profile since the scan. A profile
        # the consumer holds right now is left to the next round: waiting for it could deadlock with
        # a batch that locks its profiles in several statements (runs of events, then a merge's).
        async with engine.begin() as conn:
            loaded = await store.load_many(conn, moved[start:start + CHUNK], skip_locked=True)
            states, out = rescored(list(loaded.states.values()), models, now, topology)
            await store.save_scores(conn, states)
            await db.add_to_outbox(conn, schema, out)
    return len(moved)


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
                        answer = ("ok", await rescore(engine, schema, rows, now, topology))
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
