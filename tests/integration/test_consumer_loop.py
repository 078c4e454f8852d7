"""The shared consumer loop on real JetStream and PostgreSQL: once-only effects, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp.v1 import event_pb2
from cdp_common import db, eventlog
from cdp_common.consumer import Consumer, ConsumerSpec
from cdp_cli.settle import subject_count

pytestmark = pytest.mark.timeout(60)

SCHEMA = "looptest"
MIGRATIONS = (("CREATE TABLE looptest.totals (name text PRIMARY KEY, n bigint NOT NULL)",),)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(database_url)
    await db.migrate(engine, SCHEMA, MIGRATIONS)
    yield engine
    await engine.dispose()


# Names of events whose first attempt meets a failing database (a restart, a dropped connection).
_FLAKY_SEEN: set[str] = set()


async def handler(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
    if event.name == "poison":
        raise ValueError("this event always fails")
    if event.name == "flaky" and event.id not in _FLAKY_SEEN:
        _FLAKY_SEEN.add(event.id)
        raise ConnectionError("the database went away")
    await conn.execute(
        text("INSERT INTO looptest.totals VALUES ('count', 1) ON CONFLICT (name) DO UPDATE SET n = totals.n + 1")
    )
    return []


def make_consumer(nc: NATS, engine: AsyncEngine, topology: eventlog.Topology) -> Consumer:
    js = nc.jetstream()
    return Consumer(
        js=js, engine=engine, outbox=db.Outbox(engine, eventlog.Publisher(nc), SCHEMA), schema=SCHEMA,
        topology=topology,
        spec=ConsumerSpec(durable="looptest-count", area="collected", batch=7, max_attempts=3,
                          retry_backoff_seconds=0.01),
        handler=handler,
    )


async def publish(nc: NATS, topology: eventlog.Topology, names: list[str]) -> None:
    events = []
    for i, name in enumerate(names):
        event = eventlog.new_event("track", event_id=f"ev-{i}", source="test")
        event.name = name
        events.append(eventlog.Outgoing(topology.collected("track"), event))
    publisher = eventlog.Publisher(nc)
    await publisher.publish_events(events)
    await publisher.close()


async def count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        value = (await conn.execute(text("SELECT n FROM looptest.totals WHERE name = 'count'"))).scalar()
    return int(value or 0)


async def drain(consumer: Consumer, nc: NATS) -> None:
    """Runs the consumer until JetStream reports nothing pending or unacknowledged."""
    await consumer.start()
    for _ in range(400):
        await asyncio.sleep(0.05)
        try:
            info = await nc.jetstream().consumer_info(consumer.stream, consumer.spec.durable)
        except nats.js.errors.NotFoundError:
            continue  # being recreated at the checkpoint after a failure
        if info.num_pending == 0 and info.num_ack_pending == 0:
            break
    await consumer.stop()


async def test_replay_from_the_start_applies_nothing_twice(nc: NATS, engine: AsyncEngine, namespace: str) -> None:
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    await publish(nc, topology, ["ok"] * 50)
    await drain(make_consumer(nc, engine, topology), nc)
    assert await count(engine) == 50

    # Deleting the durable consumer re-delivers the whole stream, as a replay or lost acks would.
    await nc.jetstream().delete_consumer(topology.stream("collected"), "looptest-count")
    await drain(make_consumer(nc, engine, topology), nc)
    assert await count(engine) == 50


async def test_a_batch_that_failed_is_applied_before_anything_newer(
    nc: NATS, engine: AsyncEngine, namespace: str
) -> None:
    """A batch that fails on the database is not overtaken by later batches: were it, the
    checkpoint would move past it and its events would be skipped as already applied."""
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    await publish(nc, topology, ["ok"] * 10 + ["flaky"] + ["ok"] * 39)
    await drain(make_consumer(nc, engine, topology), nc)
    assert await count(engine) == 50


async def test_what_a_dead_holder_had_in_hand_is_applied_by_the_next(
    nc: NATS, engine: AsyncEngine, namespace: str
) -> None:
    """A process killed with messages delivered but not acknowledged: the next one applies them
    first, not after the newer ones (which would move the checkpoint past them)."""
    topology = eventlog.Topology(namespace)
    js = nc.jetstream()
    await eventlog.provision_streams(js, topology)
    await publish(nc, topology, ["ok"] * 50)
    dead = make_consumer(nc, engine, topology)
    await dead.provision()
    in_hand = await (await js.pull_subscribe_bind(dead.spec.durable, stream=dead.stream)).fetch(14, timeout=3)
    assert len(in_hand) == 14  # delivered, never acknowledged: the holder "died"
    await drain(make_consumer(nc, engine, topology), nc)
    assert await count(engine) == 50


async def test_a_poison_message_is_dead_lettered_and_the_rest_flows(nc: NATS, engine: AsyncEngine, namespace: str) -> None:
    topology = eventlog.Topology(namespace)
    js = nc.jetstream()
    await eventlog.provision_streams(js, topology)
    await publish(nc, topology, ["ok", "ok", "poison", "ok", "ok"])
    consumer = make_consumer(nc, engine, topology)
    await drain(consumer, nc)

    assert await count(engine) == 4
    assert consumer.dead_lettered == 1
    dead_letters = topology.stream("deadletter")
    assert await subject_count(js, dead_letters, topology.deadletter("looptest-count")) == 1
    message = await js.get_last_msg(dead_letters, topology.deadletter("looptest-count"))
    letter = eventlog.decode(message.data).dead_lettered
    assert letter.stream_sequence == 3 and letter.attempts == 3
    assert "this event always fails" in letter.error
    assert eventlog.decode(letter.original_payload).name == "poison"


async def test_streams_keep_duplicates_out_for_a_day(nc: NATS, namespace: str) -> None:
    topology = eventlog.Topology(namespace)
    js = nc.jetstream()
    await eventlog.provision_streams(js, topology)
    await eventlog.provision_streams(js, topology)  # idempotent at every start
    info = await js.stream_info(topology.stream("collected"))
    assert info.config.duplicate_window == eventlog.DUPLICATE_WINDOW_SECONDS
    event = eventlog.new_event("track", event_id="same-id", source="test")
    publisher = eventlog.Publisher(nc)
    first, second = await publisher.publish_events([eventlog.Outgoing(topology.collected("track"), event)] * 2)
    await publisher.close()
    assert not first.duplicate and second.duplicate
    assert (await js.stream_info(topology.stream("collected"))).state.messages == 1


async def test_migrations_run_once(engine: AsyncEngine) -> None:
    assert await db.migrate(engine, SCHEMA, MIGRATIONS) == 0
