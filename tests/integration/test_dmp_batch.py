"""The DMP bridge's batch handlers against PostgreSQL: batches end as their events one by one."""

from __future__ import annotations

import random

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.v1 import event_pb2
from cdp_common import db, eventlog
from cdp_dmp import handlers, store


def profile_event(n: int, rng: random.Random) -> event_pb2.Event:
    profile_id = f"p{rng.randrange(6)}"
    event = eventlog.new_event("profile_changed", event_id=f"e{n}", source="profile")
    event.profile_changed.profile.profile_id = profile_id
    if rng.random() < 0.1:
        event.profile_changed.merged_into = f"p{rng.randrange(6)}"
    else:
        # A hashed email may move from one profile to another (a split, a correction).
        for h in rng.sample(["h1", "h2", "h3", "h4"], rng.randrange(3)):
            event.profile_changed.profile.identifiers.add(type="email_sha256", value=h)
    return event


def membership_event(n: int, rng: random.Random) -> event_pb2.Event:
    kind = rng.choice(["segment_entered", "segment_exited"])
    event = eventlog.new_event(kind, event_id=f"m{n}", source="segmentation")
    event.membership.segment_id = rng.choice(["s1", "s2"])
    event.membership.profile.profile_id = f"p{rng.randrange(6)}"
    return event


async def fresh(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP SCHEMA IF EXISTS dmp CASCADE")
    await db.migrate(engine, "dmp", store.MIGRATIONS)


async def tables(engine: AsyncEngine) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    async with engine.connect() as conn:
        hashes = {tuple(r) for r in await conn.exec_driver_sql("SELECT email_sha256, profile_id FROM dmp.hashed_emails")}
        members = {tuple(r) for r in await conn.exec_driver_sql("SELECT segment_id, profile_id FROM dmp.audience_members")}
    return hashes, members


async def test_batches_end_as_their_events_one_by_one(database_url: str) -> None:
    engine = db.create_engine(database_url, pool_size=1)
    try:
        for seed in range(5):
            rng = random.Random(seed)
            log = [(profile_event if rng.random() < 0.6 else membership_event)(n, rng) for n in range(150)]
            profiles = [e for e in log if e.type == "profile_changed"]
            memberships = [e for e in log if e.type != "profile_changed"]
            # Two consumers, each in its own stream's order (the streams' relative order is not fixed).
            await fresh(engine)
            for events, one in ((profiles, handlers.on_profile), (memberships, handlers.on_membership)):
                for event in events:
                    async with engine.begin() as conn:
                        await one(conn, event)
            expected = await tables(engine)
            await fresh(engine)
            for events, batch in ((profiles, handlers.on_profiles), (memberships, handlers.on_memberships)):
                for start in range(0, len(events), 40):
                    async with engine.begin() as conn:
                        await batch(conn, events[start:start + 40])
            assert await tables(engine) == expected
            assert expected[0] and expected[1]
    finally:
        await engine.dispose()
