"""The shared consumer loop on real JetStream and PostgreSQL: once-only effects, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp.v1 import event_pb2
from cdp_common import db, eventlog
from cdp_common.consumer import Consumer, ConsumerSpec, LostLock, Overlays, Planned, StalePlan
from cdp_cli.settle import subject_count

pytestmark = pytest.mark.timeout(60)

SCHEMA = "looptest"
MIGRATIONS = (
    ("CREATE TABLE looptest.totals (name text PRIMARY KEY, n bigint NOT NULL)",),
    (
        # The pipelined consumer's test: the n-th event applied, in log order.
        "CREATE TABLE looptest.numbered (event_id text PRIMARY KEY, n int NOT NULL UNIQUE, name text NOT NULL)",
        # nextval is not rolled back with the transaction that fails: "flaky" fails twice in all.
        "CREATE SEQUENCE looptest.flaky_failures",
        """CREATE FUNCTION looptest.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.name = 'poison' OR (NEW.name = 'flaky' AND nextval('looptest.flaky_failures') <= 2) THEN
                RAISE EXCEPTION 'refused %', NEW.name;
            END IF;
            RETURN NEW;
        END $$""",
        "CREATE TRIGGER refuse BEFORE INSERT ON looptest.numbered FOR EACH ROW EXECUTE FUNCTION looptest.refuse()",
    ),
)


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


class Numbering(Overlays[int]):
    """A pipeline that numbers events in log order: each gets the highest number so far plus one,
    read from the table and from the batches planned but not committed yet."""

    def __init__(self) -> None:
        super().__init__()
        self.plans = 0

    async def plan(self, conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Planned:
        overlays = self.pending()  # before the read: the one before may commit meanwhile
        stored = (await conn.execute(text("SELECT coalesce(max(n), 0) FROM looptest.numbered"))).scalar_one()
        top = max([stored, *overlays])
        rows = [{"e": event.id, "n": top + i, "name": event.name} for i, event in enumerate(events, start=1)]

        async def write(conn: AsyncConnection) -> None:
            await conn.execute(text("INSERT INTO looptest.numbered VALUES (:e, :n, :name)"), rows)

        self.plans += 1
        return self.keep(Planned(write, []), top + len(rows))


async def numbered(
    nc: NATS, engine: AsyncEngine, namespace: str, names: list[str], pipeline: Numbering
) -> tuple[Consumer, list[str], list[int]]:
    """`names` published as events and drained through a pipelined consumer (one by one, the plain
    way, it numbers each event alone); the consumer, and the numbered event ids and numbers."""
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    await publish(nc, topology, names)

    async def one_by_one(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        planned = await Numbering().plan(conn, [event])
        await planned.write(conn)
        return []

    consumer = Consumer(
        js=nc.jetstream(), engine=engine, outbox=db.Outbox(engine, eventlog.Publisher(nc), SCHEMA), schema=SCHEMA,
        topology=topology, spec=ConsumerSpec(durable="looptest-number", area="collected", batch=7, max_attempts=3,
                                             retry_backoff_seconds=0.01, max_ack_pending=21),
        handler=one_by_one, pipeline=pipeline,
    )
    await drain(consumer, nc)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT event_id, n FROM looptest.numbered ORDER BY n"))).all()
    return consumer, [r.event_id for r in rows], [r.n for r in rows]


async def test_a_pipelined_consumer_applies_every_event_once_in_order_through_failed_writes(
    nc: NATS, engine: AsyncEngine, namespace: str
) -> None:
    """Batches are planned while the one before is written. A write that fails (twice for
    "flaky", always for "poison") drops what was planned after it; the log is taken again from
    the checkpoint, the plain way, which dead-letters the poison; the numbers show that nothing
    was skipped, applied twice or out of order."""
    names = ["ok"] * 60
    names[20], names[41] = "flaky", "poison"
    pipeline = Numbering()
    consumer, ids, numbers = await numbered(nc, engine, namespace, names, pipeline)
    expected = [f"ev-{i}" for i, name in enumerate(names) if name != "poison"]
    assert ids == expected
    assert numbers == list(range(1, len(expected) + 1))
    assert consumer.dead_lettered == 1 and consumer.batch_failures >= 2
    assert pipeline.plans > 5 and not pipeline.pending()


class GoesStale(Numbering):
    """Numbering whose first planned write of a "moved" event finds what it read changed."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    async def plan(self, conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Planned:
        planned = await super().plan(conn, events)
        if not any(event.name == "moved" for event in events) or self.refused:
            return planned

        async def refuse(conn: AsyncConnection) -> None:
            self.refused += 1
            raise StalePlan("a row the plan read moved")

        return replace(planned, write=refuse)


async def test_a_stale_plan_is_taken_again_the_plain_way_without_counting_a_failure(
    nc: NATS, engine: AsyncEngine, namespace: str
) -> None:
    names = ["ok"] * 40
    names[17] = "moved"
    pipeline = GoesStale()
    consumer, ids, numbers = await numbered(nc, engine, namespace, names, pipeline)
    assert ids == [f"ev-{i}" for i in range(40)]
    assert numbers == list(range(1, 41))
    assert pipeline.refused == 1 and consumer.stale_plans == 1
    assert consumer.batch_failures == 0 and consumer.dead_lettered == 0


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


async def test_facts_left_in_the_outbox_go_out_with_their_headers(nc: NATS, engine: AsyncEngine, namespace: str) -> None:
    """A crash between commit and publish: the next flush publishes what waits, with the headers
    subscribers and the duplicate window rely on (stored with the row, or derived from its event)."""
    topology = eventlog.Topology(namespace)
    js = nc.jetstream()
    await eventlog.provision_streams(js, topology)
    subject = topology.collected("track")
    fact = eventlog.new_event("track", event_id="left-behind", source="test")
    fact.correlation_id = "corr-1"
    fact.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    publisher = eventlog.Publisher(nc)
    outbox = db.Outbox(engine, publisher, SCHEMA)
    async with engine.begin() as conn:
        await conn.execute(text(f"DELETE FROM {SCHEMA}.outbox"))
        await outbox.add(conn, [eventlog.Outgoing(subject, fact)])
        # A row as older versions wrote it, headers stored with it.
        await conn.execute(
            text(f"INSERT INTO {SCHEMA}.outbox (subject, msg_id, headers, payload) VALUES (:s, 'older', :h, :p)"),
            {"s": subject, "h": '{"Nats-Msg-Id": "older", "Cdp-Event-Type": "track"}',
             "p": eventlog.encode(eventlog.new_event("track", event_id="older", source="test"))},
        )
    # Published, then flushed again as if the deletes were lost: the duplicate window drops them.
    assert await db.Outbox(engine, publisher, SCHEMA).flush() == 2
    async with engine.begin() as conn:
        await outbox.add(conn, [eventlog.Outgoing(subject, fact)])
    assert await db.Outbox(engine, publisher, SCHEMA).flush() == 1
    await publisher.close()

    stream = topology.stream("collected")
    assert (await js.stream_info(stream)).state.messages == 2
    first, second = await js.get_msg(stream, seq=1), await js.get_msg(stream, seq=2)
    assert first.headers == {**eventlog.Outgoing(subject, fact).headers()}
    assert first.headers[eventlog.MSG_ID_HEADER] == "left-behind"
    assert first.headers[eventlog.TRACEPARENT_HEADER] == fact.traceparent
    assert eventlog.decode(first.data) == fact
    assert second.headers == {"Nats-Msg-Id": "older", "Cdp-Event-Type": "track"}
    async with engine.connect() as conn:
        assert (await conn.execute(text(f"SELECT count(*) FROM {SCHEMA}.outbox"))).scalar() == 0


async def test_an_applier_whose_lock_session_ends_stops_and_a_standby_takes_over(
    nc: NATS, engine: AsyncEngine, namespace: str
) -> None:
    """Each batch is written in the session that holds the consumer's lock. Once that session is
    gone (a PostgreSQL restart, a killed backend) the applier stops at its next batch instead of
    writing without the lock, and the standby applies the rest: every event once, none skipped,
    although both pulled from the durable meanwhile (acknowledging its batch would acknowledge the
    other's too, so the standby repositions instead)."""
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    first, standby = make_consumer(nc, engine, topology), make_consumer(nc, engine, topology)
    await publish(nc, topology, ["ok"] * 30)
    running = await first.start()
    for _ in range(200):
        if await count(engine) == 30:
            break
        await asyncio.sleep(0.05)
    waiting = await standby.start()
    await asyncio.sleep(0.3)
    assert first.active and not standby.active
    async with engine.connect() as conn:
        ended = (await conn.execute(text(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.pid <> pg_backend_pid()"
        ))).scalars().all()
    assert ended == [True]
    for _ in range(100):
        if standby.active:
            break
        await asyncio.sleep(0.05)
    assert standby.active  # while the first does not know yet, and still pulls
    publisher = eventlog.Publisher(nc)
    for i in range(40):
        # One at a time, so both processes' pull requests get some.
        await publisher.publish_events([eventlog.Outgoing(
            topology.collected("track"), eventlog.new_event("track", event_id=f"later-{i}", source="test")
        )])
        await asyncio.sleep(0.01)
    await publisher.close()
    with pytest.raises(LostLock):
        await asyncio.wait_for(running, 10)
    for _ in range(300):
        if await count(engine) == 70:
            break
        await asyncio.sleep(0.05)
    await standby.stop()
    await waiting
    assert await count(engine) == 70
