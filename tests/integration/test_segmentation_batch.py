"""Segmentation's batch handler against PostgreSQL: a batch of profile changes ends as the same
memberships, and publishes the same entries and exits in the same order, as its events one by one."""

from __future__ import annotations

import random

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.v1 import event_pb2
from cdp_common import db, eventlog
from cdp_segmentation import handlers, store
from cdp_segmentation.core import Condition, Segment

TOPOLOGY = eventlog.Topology("t")
SEGMENTS = (
    Segment("buyers", "Buyers", (Condition("order_count", "gte", 1),)),
    Segment("big", "Big spenders", (Condition("revenue", "gte", 100),)),
)


def change(n: int, profile_id: str, orders: int, revenue: float, merged_into: str = "") -> event_pb2.Event:
    event = eventlog.new_event("profile_changed", event_id=f"e{n}", source="profile")
    event.profile_id = profile_id
    event.profile_changed.profile.profile_id = profile_id
    event.profile_changed.profile.order_count = orders
    event.profile_changed.profile.revenue = revenue
    event.profile_changed.merged_into = merged_into
    return event


def sequence(seed: int) -> list[event_pb2.Event]:
    """Profiles entering, leaving and re-entering segments, and some merged away, in one log."""
    rng = random.Random(seed)
    events = []
    for n in range(120):
        profile_id = f"p{rng.randrange(8)}"
        if rng.random() < 0.05:
            events.append(change(n, profile_id, 0, 0, merged_into=f"p{rng.randrange(8)}"))
        else:
            events.append(change(n, profile_id, rng.choice([0, 1, 2]), rng.choice([0.0, 50.0, 150.0])))
    return events


async def fresh(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP SCHEMA IF EXISTS segmentation CASCADE")
    await db.migrate(engine, "segmentation", store.MIGRATIONS)
    async with engine.begin() as conn:
        for segment in SEGMENTS:
            await store.put_segment(conn, segment)


async def outcome(engine: AsyncEngine) -> tuple[set[tuple[str, str]], dict[str, bytes]]:
    async with engine.connect() as conn:
        pairs = {(r.segment_id, r.profile_id) for r in await conn.exec_driver_sql(
            "SELECT segment_id, profile_id FROM segmentation.memberships")}
        profiles = {r.profile_id: bytes(r.snapshot) for r in await conn.exec_driver_sql(
            "SELECT profile_id, snapshot FROM segmentation.profiles")}
    return pairs, profiles


async def test_a_batch_applies_as_its_events_one_by_one(database_url: str) -> None:
    engine = db.create_engine(database_url, pool_size=1)
    one_by_one, whole_batch = handlers.make_handlers(TOPOLOGY)
    try:
        for seed in range(3):
            events = sequence(seed)
            await fresh(engine)
            singly = []
            for event in events:
                async with engine.begin() as conn:
                    singly += [(o.subject, o.event.id, o.event.type) for o in await one_by_one(conn, event)]
            expected = await outcome(engine)

            await fresh(engine)
            batched = []
            for start in range(0, len(events), 50):
                async with engine.begin() as conn:
                    batched += [(o.subject, o.event.id, o.event.type) for o in
                                await whole_batch(conn, events[start:start + 50])]
            assert batched == singly
            assert await outcome(engine) == expected
            assert any(kind == "segment_exited" for _, _, kind in singly)
            assert expected[0]
    finally:
        await engine.dispose()


async def test_a_snapshot_older_than_the_stored_one_is_ignored(database_url: str) -> None:
    """Profile's scoring job and its projection both publish snapshots; the older of two arriving
    last must not take the profile back out of a segment (and send the entry's email again later)."""
    engine = db.create_engine(database_url, pool_size=1)
    one_by_one, whole_batch = handlers.make_handlers(TOPOLOGY)
    newer, older = change(1, "p1", 2, 150.0), change(2, "p1", 0, 0.0)
    newer.profile_changed.profile.updated_at.FromSeconds(2_000_000_000)
    older.profile_changed.profile.updated_at.FromSeconds(1_999_999_999)
    try:
        for apply in ("one by one", "batched"):
            await fresh(engine)
            async with engine.begin() as conn:
                if apply == "batched":
                    out = await whole_batch(conn, [newer, older])
                else:
                    out = [*await one_by_one(conn, newer), *await one_by_one(conn, older)]
            assert [(o.event.type, o.event.membership.segment_id) for o in out] == [
                ("segment_entered", "big"), ("segment_entered", "buyers")]
            pairs, profiles = await outcome(engine)
            assert pairs == {("big", "p1"), ("buyers", "p1")}
            assert profiles == {"p1": newer.profile_changed.profile.SerializeToString()}
    finally:
        await engine.dispose()

