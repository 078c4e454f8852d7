"""Activation's batch handler against PostgreSQL: a batch of segment entries queues what its
entries one by one would, once per (campaign, entry), whatever is delivered twice."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.v1 import event_pb2
from cdp_activation import handlers, store
from cdp_activation.core import Campaign
from cdp_common import db, eventlog

CAMPAIGNS = (
    Campaign("welcome", "buyers", "email", "shop@example.com", "Hi {{ traits.name }}", "Thanks, {{ traits.name }}!"),
    Campaign("vip", "big", "email", "shop@example.com", "For you", "{{ traits.name | upper }} is {{ 1 // profile.order_count }}"),
    Campaign("unused", "nobody", "email", "shop@example.com", "x", "y"),
)


def entry(n: int, segment_id: str, profile_id: str, email: str = "", orders: int = 1, kind: str = "segment_entered",
          ) -> event_pb2.Event:
    event = eventlog.new_event(kind, event_id=f"m{n}", source="segmentation")
    event.profile_id = profile_id
    event.membership.segment_id = segment_id
    event.membership.profile.profile_id = profile_id
    event.membership.profile.order_count = orders
    event.membership.profile.traits.update({"name": profile_id.title()})
    if email:
        event.membership.profile.identifiers.add(type="email", value=email)
    return event


LOG = [
    entry(1, "buyers", "ada", "ada@example.com"),
    entry(2, "big", "ada", "ada@example.com"),
    entry(3, "buyers", "bob"),  # no address: recorded as skipped
    entry(4, "big", "cy", "cy@example.com", orders=0),  # the VIP body divides by zero: skipped, welcome unaffected
    entry(5, "buyers", "cy", "cy@example.com", orders=0),
    entry(6, "buyers", "ada", kind="segment_exited"),
    entry(1, "buyers", "ada", "ada@example.com"),  # delivered again
]


async def fresh(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP SCHEMA IF EXISTS activation CASCADE")
    await db.migrate(engine, "activation", store.MIGRATIONS)
    async with engine.begin() as conn:
        for campaign in CAMPAIGNS:
            await store.put_campaign(conn, campaign)


async def ledger(engine: AsyncEngine) -> set[tuple[str, ...]]:
    async with engine.connect() as conn:
        return {tuple(r) for r in await conn.exec_driver_sql(
            "SELECT campaign_id, profile_id, trigger_event_id, recipient, subject, status FROM activation.sends")}


async def test_a_batch_queues_what_its_entries_one_by_one_do(database_url: str) -> None:
    engine = db.create_engine(database_url, pool_size=1)
    woken: list[str] = []
    one_by_one, whole_batch = handlers.make_handlers(lambda: woken.append("x"))
    try:
        await fresh(engine)
        for event in LOG:
            async with engine.begin() as conn:
                await one_by_one(conn, event)
        singly, woken_singly = await ledger(engine), len(woken)

        await fresh(engine)
        woken.clear()
        async with engine.begin() as conn:
            await whole_batch(conn, LOG)
        async with engine.begin() as conn:
            await whole_batch(conn, LOG[:2])  # a redelivered batch queues nothing new, wakes no sender
        assert await ledger(engine) == singly == {
            ("welcome", "ada", "m1", "ada@example.com", "Hi Ada", "pending"),
            ("vip", "ada", "m2", "ada@example.com", "For you", "pending"),
            ("welcome", "bob", "m3", "", "Hi Bob", "skipped_no_address"),
            ("vip", "cy", "m4", "cy@example.com", "", "skipped_render_failed"),
            ("welcome", "cy", "m5", "cy@example.com", "Hi Cy", "pending"),
        }
        assert woken == ["x"] and woken_singly == 3
    finally:
        await engine.dispose()
