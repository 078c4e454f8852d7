"""The scoring job's passes over the whole base, in a process of their own.

`python -m cdp_profile.survey` is started by the scoring job (jobs.py) once per round. It reads
requests from stdin and writes answers to stdout, each a frame (an 8-byte length, then a pickle),
and exits at the end of stdin:

- `("fit", now)`: every customer's score inputs, and the models fitted to them, answered as
  `("ok", (model rows, customers))`;
- `("rescore", model rows, now, topology)`: finds the profiles whose stored scores differ from what
  those models give them, and rescores them, `CHUNK` per transaction: each chunk's scores and
  their `profile_changed` events (into the outbox, for the service to publish) are written
  together. Answered as `("ok", profiles found)`.

A request that fails is answered `("error", text)`. The models cross as their stored rows.

Why a process: a pass takes seconds per 100,000 profiles; in the service's process it would take
the interpreter from the live consumer and the gRPC calls for that long. Here it runs on the other
core, at a lower CPU priority, and imports only what the passes need.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pickle
import signal
import struct
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_common import db, eventlog
from cdp_profile import core, scoring, store
from cdp_profile.messages import changed_event

HEADER = struct.Struct("!Q")
# The service's pid (set by jobs.Survey): this process ends with it.
PARENT_ENV = "CDP_PROFILE_SURVEY_PARENT"
_PR_SET_PDEATHSIG = 1
# Profiles rescored per transaction: bounds how long rows stay locked against the consumer.
CHUNK = 200


def frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def _read(stream: IO[bytes]) -> Any | None:
    """The next request, None at the end of the stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return pickle.loads(stream.read(size))


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
    engine = db.create_engine(database_url, pool_size=1, search_path=schema)
    try:
        while (request := _read(requests)) is not None:
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
            answers.write(frame(answer))
            answers.flush()
    finally:
        await engine.dispose()


def _end_with(parent: int) -> None:
    """A service killed with -9 cannot stop this process; the kernel does (Linux), so that no
    rescoring goes on behind the service's back once it is restarted and runs a round of its own."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: an orphan ends after its pass, when its answer has nowhere to go
    if os.getppid() != parent:  # the service was gone before the line above
        sys.exit(1)


def main() -> None:
    _end_with(int(os.environ[PARENT_ENV]))
    # Ctrl-C in a terminal reaches the whole process group; the service decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: the scheduler serves the service (and PostgreSQL) first.
    os.nice(10)
    asyncio.run(serve(os.environ["CDP_DATABASE_URL"], os.environ["CDP_PROFILE_SCHEMA"], sys.stdin.buffer,
                      sys.stdout.buffer))


if __name__ == "__main__":
    main()
