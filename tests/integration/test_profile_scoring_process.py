"""The scoring job's passes over the whole base run in a child process (cdp_profile.survey), against
PostgreSQL: a round is the same there, a failed pass says why, and a stopped round leaves no
process behind."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_common import db, eventlog
from cdp_profile import jobs, scoring, store
from cdp_profile.core import ProfileState
from cdp_profile.handlers import ModelsCache
from processes import children, running

DAY = datetime(2026, 6, 1, tzinfo=UTC)


def customer(name: str, orders: int, spent_cents: int, last_order_days: int) -> ProfileState:
    return ProfileState(f"p-{name}", order_count=orders, revenue_cents=spent_cents, first_order_at=DAY,
                        last_order_at=DAY + timedelta(days=last_order_days), first_seen_at=DAY,
                        categories={"shoes": orders})


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(database_url, search_path="profile")
    await db.migrate(engine, "profile", store.MIGRATIONS)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def outbox(engine: AsyncEngine, nc: NATS, namespace: str) -> AsyncIterator[tuple[db.Outbox, eventlog.Topology]]:
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    publisher = eventlog.Publisher(nc)
    try:
        yield db.Outbox(engine, publisher, "profile"), topology
    finally:
        await publisher.close()


@pytest.fixture
async def one_customer(engine: AsyncEngine) -> datetime:
    """One customer stored unscored; the time to score at."""
    async with engine.begin() as conn:
        await store.save_many(conn, [customer("ada", 2, 5_000, 20)], {})
    return DAY + timedelta(days=60)


async def many_customers(engine: AsyncEngine, profiles: int) -> None:
    """`profiles` customers stored unscored: a round moves them all."""
    for start in range(0, profiles, 2_000):
        async with engine.begin() as conn:
            await store.save_many(conn, [customer(f"{n:05}", 1, 1_000, 0)
                                         for n in range(start, min(start + 2_000, profiles))], {})


def survey_children(of: int | None = None) -> list[int]:
    return children("cdp_profile.survey", of)


# A stand-in for the service: starts a round's child and has it rescore, until it is killed.
SERVICE = """
import asyncio, sys
from datetime import datetime
from cdp_common import eventlog
from cdp_profile import jobs, scoring

async def main():
    url, namespace, now = sys.argv[1:4]
    async with jobs.Survey.started(url, "profile") as surveyed:
        await surveyed.rescore(scoring.Models(), datetime.fromisoformat(now), eventlog.Topology(namespace))

asyncio.run(main())
"""


async def test_a_round_in_the_child_scores_like_the_models_fitted_here(
    engine: AsyncEngine, outbox: tuple[db.Outbox, eventlog.Topology]
) -> None:
    customers = [customer("ada", 6, 60_000, 150), customer("bob", 1, 2_000, 0), customer("cyd", 3, 9_000, 90)]
    visitor = ProfileState("p-eve", first_seen_at=DAY)
    async with engine.begin() as conn:
        await store.save_many(conn, [*customers, visitor], {})
    now = DAY + timedelta(days=160)
    cache = ModelsCache()

    done = await jobs.rescore(engine, *outbox, cache, now)

    assert done == jobs.Rescored(customers=3, rescored=4)
    expected = scoring.build_models([scoring.inputs_of(c) for c in customers], now)
    async with engine.connect() as conn:
        assert await store.models(conn) == expected
        stored = (await store.load_many(conn, ["p-ada", "p-bob", "p-cyd", "p-eve"], lock=False)).states
    for state in [*customers, visitor]:
        assert stored[state.profile_id].scores == scoring.score(scoring.inputs_of(state), expected, now)
    assert survey_children() == []


async def test_a_failed_pass_names_the_error_and_the_next_round_works(
    engine: AsyncEngine, outbox: tuple[db.Outbox, eventlog.Topology], one_customer: datetime
) -> None:
    now = one_customer

    # A schema without the profile tables: the child's first query fails.
    with pytest.raises(jobs.PassFailed, match=r"'fit' pass failed: .*relation \"profiles\" does not exist"):
        await jobs.rescore(engine, *outbox, ModelsCache(), now, schema="public")

    again = await jobs.rescore(engine, *outbox, ModelsCache(), now)  # the advisory lock was released
    assert again == jobs.Rescored(customers=1, rescored=1)
    assert survey_children() == []


async def test_a_round_stopped_midway_kills_its_child_and_releases_the_job(
    engine: AsyncEngine, outbox: tuple[db.Outbox, eventlog.Topology], one_customer: datetime
) -> None:
    now = one_customer
    round_ = asyncio.create_task(jobs.rescore(engine, *outbox, ModelsCache(), now))
    for _ in range(200):
        if survey_children():
            break
        await asyncio.sleep(0.01)
    assert survey_children(), "the round started no child process"

    round_.cancel()  # what the service does on SIGTERM
    with pytest.raises(asyncio.CancelledError):
        await round_

    assert survey_children() == []
    async with engine.connect() as conn:
        assert await store.models_version(conn) is None  # it stopped before storing anything
    assert await jobs.rescore(engine, *outbox, ModelsCache(), now) == jobs.Rescored(customers=1, rescored=1)


async def test_a_service_killed_with_9_takes_its_rounds_child_with_it(
    engine: AsyncEngine, database_url: str, namespace: str
) -> None:
    """kill -9 gives the service no chance to stop the child: the kernel must, or it would go on
    rescoring (and publishing into the outbox) beside the restarted service's own round."""
    profiles = 10_000
    await many_customers(engine, profiles)

    async def outbox_rows() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one())

    service = subprocess.Popen([sys.executable, "-c", SERVICE, database_url, namespace,
                                (DAY + timedelta(days=30)).isoformat()])
    try:
        deadline = time.monotonic() + 60
        while (children := survey_children(service.pid)) == [] or await outbox_rows() == 0:
            assert service.poll() is None and time.monotonic() < deadline, "no chunk was rescored"
            await asyncio.sleep(0.02)
        # The child is mid-round: at least one chunk is written.
        service.send_signal(signal.SIGKILL)
        service.wait()
        deadline = time.monotonic() + 5
        while running(children[0]):
            assert time.monotonic() < deadline, "the round's child outlived the service"
            await asyncio.sleep(0.02)
    finally:
        service.kill()
        service.wait()
    written = await outbox_rows()
    await asyncio.sleep(0.5)
    assert await outbox_rows() == written < profiles


async def test_a_round_publishes_its_profile_changed_events_as_it_goes(
    engine: AsyncEngine, outbox: tuple[db.Outbox, eventlog.Topology], nc: NATS
) -> None:
    """Not all at the end: segmentation gets a round's thousands of changes spread over it."""
    profiles = 6_000
    await many_customers(engine, profiles)
    topology = outbox[1]
    subscription = await nc.subscribe(topology.area_subjects("profile"))
    round_ = asyncio.create_task(jobs.rescore(engine, *outbox, ModelsCache(), DAY + timedelta(days=30)))
    try:
        await subscription.next_msg(timeout=60)
        child_still_rescoring = survey_children() != []
        for _ in range(profiles - 1):
            await subscription.next_msg(timeout=60)
    finally:
        await subscription.unsubscribe()
    assert await round_ == jobs.Rescored(customers=profiles, rescored=profiles)
    assert child_still_rescoring, "the first profile_changed came only after the round's child had finished"
