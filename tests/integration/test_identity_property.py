"""The identity resolver on real JetStream and PostgreSQL, against the reference model.

Random sequences of collected events are published to a fresh namespace and resolved by the
identity handlers in the shared consumer loop, into a fresh database each time:

- once, in log order, by the per-event handler (handlers.make_handler)
      -> (a) a consistent graph, (b) the reference model's (exactly: profile ids derive from
         event ids, so even the profile ids, last-seen times and merge counts must agree)
- again from the start of the log into a fresh database, by the handlers the service runs
  (handlers.make_handlers: the batch handler first, the per-event one as fallback)
      -> (c) the same graph, row for row
- with redeliveries: the first messages given to two consumer instances at once (as when ack_wait
  expires while the first still applies them), then the durable deleted and re-created (which
  replays the log from the start) with two consumer loops of that durable running at once
      -> (d) the same graph, row for row
- the same events in another order, in a second namespace -> (a) and (b) for that order.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import hypothesis
import nats
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp.v1 import event_pb2
from cdp_common import convert, db, eventlog
from cdp_common.consumer import Consumer, ConsumerSpec
from cdp_identity import core, handlers, store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from identity_model import Key, Model, Spec, partition_of  # noqa: E402

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
SCHEMA = "identity"

# The rules: the defaults, or tight limits with windows and small caps (configured as a file
# would be), so that conflicts, drops, refused merges and cut-off links all happen.
TIGHT = {
    "types": {
        "email": {"priority": 2, "limit": 2, "window_days": 30},
        "device_id": {"priority": 6, "limit": 2},
        "anonymous_id": {"priority": 7, "limit": 3, "window_days": 10},
    },
    "max_merges": 2,
    "max_identifiers": 6,
}
RULES = {"default": {}, "tight": TIGHT}

BUILT_IN = ("user_id", "email", "phone", "device_id", "anonymous_id")
ALPHABET: dict[str, list[str]] = {
    "user_id": ["u1", "u2", "U1", "null"],
    "email": ["ada@x.com", " Ada@X.COM", "bob@x.com", "cy@x.com", "undefined"],
    "phone": ["(415) 555-2671", "+1 415 555 2671", "(212) 555-0188", "0000"],
    "device_id": ["d1", "d2", "d3", "-1"],
    "anonymous_id": ["a1", "a2", "a3", "a4", "anonymous"],
    "loyalty_id": ["L1", "L2"],
}


@dataclass(frozen=True)
class Draft:
    kind: str  # track or identify
    identifiers: tuple[tuple[str, str], ...]
    day: float

    def event(self, event_id: str) -> event_pb2.Event:
        event = eventlog.new_event(self.kind, event_id=event_id, source="test")
        if self.kind == "track":
            event.name = "Viewed"
        for id_type, value in self.identifiers:
            if id_type in BUILT_IN:
                setattr(event.identifiers, id_type, value)
            else:
                event.identifiers.custom[id_type] = value
        convert.set_timestamp(event.occurred_at, T0 + timedelta(days=self.day))
        return event


drafts = st.builds(
    Draft,
    st.sampled_from(["track", "identify"]),
    st.lists(st.sampled_from(list(ALPHABET)), min_size=1, max_size=3, unique=True).flatmap(
        lambda types: st.tuples(*[st.tuples(st.just(t), st.sampled_from(ALPHABET[t])) for t in types])
    ),
    st.sampled_from([0, 0, 1, 4, 10, 12, 30, 31, 45]),
)


# --- a run: a fresh database, the durable consumer over one namespace ------------------------


Row = tuple[str, datetime, datetime]  # profile_id, first_seen, last_seen


@dataclass
class Graph:
    identifiers: dict[Key, Row]
    profiles: dict[str, tuple[str | None, int]]  # profile_id -> (merged_into, merge_count)

    @property
    def owners(self) -> dict[Key, str]:
        return {k: row[0] for k, row in self.identifiers.items()}


@asynccontextmanager
async def fresh_database(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    name = f"tp_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        engine = db.create_engine(urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}")), pool_size=2)
        try:
            await db.migrate(engine, SCHEMA, store.MIGRATIONS)
            yield engine
        finally:
            await engine.dispose()
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def read_graph(engine: AsyncEngine) -> Graph:
    async with engine.connect() as conn:
        identifiers = {
            (r.id_type, r.id_value): (r.profile_id, r.first_seen, r.last_seen)
            for r in await conn.execute(
                text("SELECT id_type, id_value, profile_id, first_seen, last_seen FROM identity.identifiers")
            )
        }
        profiles = {
            r.profile_id: (r.merged_into, r.merge_count)
            for r in await conn.execute(text("SELECT profile_id, merged_into, merge_count FROM identity.profiles"))
        }
    return Graph(identifiers, profiles)


def spec(batch: int, ack_wait: float = 30.0, max_ack_pending: int = 400) -> ConsumerSpec:
    return replace(handlers.SPEC, batch=batch, ack_wait_seconds=ack_wait, max_ack_pending=max_ack_pending,
                   fetch_timeout_seconds=0.1, retry_backoff_seconds=0.01, max_attempts=2)


def consumer(nc: NATS, engine: AsyncEngine, topology: eventlog.Topology, rules: core.Rules,
             consumer_spec: ConsumerSpec, batched: bool = True) -> Consumer:
    """With `batched`, as the service runs it (main.build); else the per-event handler alone."""
    one_by_one, whole_batch, pipeline = handlers.make_handlers(topology, rules)
    if not batched:
        one_by_one, whole_batch, pipeline = handlers.make_handler(topology, rules), None, None
    return Consumer(
        js=nc.jetstream(), engine=engine, outbox=db.Outbox(engine, eventlog.Publisher(nc), SCHEMA), schema=SCHEMA,
        topology=topology, spec=consumer_spec, handler=one_by_one, batch_handler=whole_batch, pipeline=pipeline,
    )


async def forget_durable(nc: NATS, topology: eventlog.Topology) -> None:
    """Deleting the durable consumer makes the next one replay the log from the start."""
    try:
        await nc.jetstream().delete_consumer(topology.stream("collected"), handlers.SPEC.durable)
    except NotFoundError:
        pass


async def drain(nc: NATS, *consumers: Consumer) -> None:
    """Runs the consumers at once until JetStream reports nothing pending or unacknowledged."""
    for c in consumers:
        await c.start()
    js = nc.jetstream()
    try:
        for _ in range(400):
            await asyncio.sleep(0.02)
            info = await js.consumer_info(consumers[0].stream, consumers[0].spec.durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
        else:
            raise AssertionError("the consumer did not drain the stream")
    finally:
        await asyncio.gather(*(c.stop() for c in consumers))


async def publish(nc: NATS, topology: eventlog.Topology, events: Sequence[tuple[str, Draft]]) -> None:
    publisher = eventlog.Publisher(nc)
    await publisher.publish_events(
        [eventlog.Outgoing(topology.collected(d.kind), d.event(event_id)) for event_id, d in events]
    )
    await publisher.close()


async def run_once(nc: NATS, postgres_url: str, topology: eventlog.Topology, rules: core.Rules,
                   batch: int, batched: bool) -> tuple[Graph, int]:
    """Resolves the whole log into a fresh database; the graph and how many were dead-lettered."""
    await forget_durable(nc, topology)
    async with fresh_database(postgres_url) as engine:
        c = consumer(nc, engine, topology, rules, spec(batch), batched)
        await drain(nc, c)
        return await read_graph(engine), c.dead_lettered


async def run_redelivered(nc: NATS, postgres_url: str, topology: eventlog.Topology, rules: core.Rules,
                          first: int) -> Graph:
    await forget_durable(nc, topology)
    js = nc.jetstream()
    async with fresh_database(postgres_url) as engine:
        # The first `first` messages to two consumer instances at once. With at most `first`
        # unacknowledged, the second fetch can only be their redelivery after ack_wait.
        twice = spec(first, ack_wait=0.5, max_ack_pending=first)
        one, two = consumer(nc, engine, topology, rules, twice), consumer(nc, engine, topology, rules, twice)
        await one.provision()
        sub_one = await js.pull_subscribe_bind(handlers.SPEC.durable, stream=one.stream)
        sub_two = await js.pull_subscribe_bind(handlers.SPEC.durable, stream=two.stream)
        batch_one = await sub_one.fetch(first, timeout=3)
        batch_two = await sub_two.fetch(first, timeout=3)
        assert [m.metadata.sequence.stream for m in batch_one] == list(range(1, first + 1))
        assert [m.metadata.sequence.stream for m in batch_two] == list(range(1, first + 1))
        # The checkpoint's row lock makes one wait for the other, which then skips them all.
        await asyncio.gather(one.process(batch_one), two.process(batch_two))
        await sub_one.unsubscribe()
        await sub_two.unsubscribe()

        # The whole log delivered again, to two consumer loops of the durable at once.
        await forget_durable(nc, topology)
        await drain(nc, consumer(nc, engine, topology, rules, spec(2)), consumer(nc, engine, topology, rules, spec(3)))
        return await read_graph(engine)


# --- the model, fed what the handler is fed ----------------------------------------------------


def modelled(events: Sequence[tuple[str, Draft]], data: dict[str, Any]) -> tuple[Model, int]:
    """The reference model after `events`, and how many had no usable identifier."""
    rules = core.Rules.from_json(data)
    model, unusable = Model(Spec.from_json(data)), 0
    for event_id, draft in events:
        raw = {t: v for t, v in draft.identifiers if t in BUILT_IN}
        custom = {t: v for t, v in draft.identifiers if t not in BUILT_IN}
        # event_identifiers itself is checked against the model in tests/unit.
        keys = core.event_identifiers(raw, custom, rules)
        outcome = model.apply(keys, T0 + timedelta(days=draft.day), new_id=eventlog.derived_id(event_id, "profile"))
        unusable += outcome is None
    return model, unusable


def check_consistent(graph: Graph) -> None:
    """(a) every identifier belongs to a live profile, and every live profile holds one."""
    live = {p for p, (merged_into, _) in graph.profiles.items() if merged_into is None}
    assert set(graph.owners.values()) == live
    for merged_into, _ in graph.profiles.values():
        seen = 0
        while merged_into is not None:  # merged profiles lead to a live one
            merged_into = graph.profiles[merged_into][0]
            seen += 1
            assert seen < len(graph.profiles)


def check_equals_model(graph: Graph, model: Model) -> None:
    """(b) the reference model's partition -- and, since profile ids derive from event ids, its
    very profiles, last-seen times and merge counts."""
    assert partition_of(graph.owners) == model.partition()
    assert graph.owners == model.owner
    assert {k: row[2] for k, row in graph.identifiers.items()} == model.last_seen
    live = {p: count for p, (merged_into, count) in graph.profiles.items() if merged_into is None}
    assert live == {p: model.merge_count[p] for p in live}
    assert {p: m for p, (m, _) in graph.profiles.items() if m is not None} == model.merged_into


@asynccontextmanager
async def namespace(nc: NATS) -> AsyncIterator[eventlog.Topology]:
    topology = eventlog.Topology(f"t{uuid.uuid4().hex[:10]}")
    js = nc.jetstream()
    await eventlog.provision_streams(js, topology)
    try:
        yield topology
    finally:
        for area in eventlog.AREAS:
            await js.delete_stream(topology.stream(area))


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          # About 2 s an example: shrinking a failure would take minutes (the failing example
          # is printed unshrunk; tests/unit/test_identity_model.py shrinks the same rules fast).
          phases=[Phase.explicit, Phase.generate])
@given(
    rules_name=st.sampled_from(sorted(RULES)),
    events=st.lists(drafts, min_size=4, max_size=14),
    data=st.data(),
)
async def test_the_resolver_matches_the_model_whatever_the_delivery(
    nats_url: str, postgres_url: str, rules_name: str, events: list[Draft], data: st.DataObject
) -> None:
    rules = core.Rules.from_json(RULES[rules_name])
    in_order = [(f"ev-{i}", d) for i, d in enumerate(events)]
    shuffled = data.draw(st.permutations(in_order), label="shuffled")
    batch = data.draw(st.integers(1, 6), label="batch")
    first = data.draw(st.integers(1, len(events) - 1), label="first delivered twice")
    batched = data.draw(st.booleans(), label="reordered run with the batch handler")

    nc = await nats.connect(nats_url)
    try:
        async with namespace(nc) as one, namespace(nc) as other:
            await publish(nc, one, in_order)
            await publish(nc, other, shuffled)

            single, dead_lettered = await run_once(nc, postgres_url, one, rules, batch, batched=False)
            replayed, _ = await run_once(nc, postgres_url, one, rules, batch=7, batched=True)
            redelivered = await run_redelivered(nc, postgres_url, one, rules, first)
            reordered, _ = await run_once(nc, postgres_url, other, rules, batch, batched)
    finally:
        await nc.close()

    model, unusable = modelled(in_order, RULES[rules_name])
    hypothesis.event(f"rules: {rules_name}")
    hypothesis.event(f"profiles merged: {bool(model.merged_into)}")
    check_consistent(single)
    check_equals_model(single, model)
    assert dead_lettered == unusable  # events with no usable identifier go to the dead letters
    assert replayed == single  # (c), and the batch handler agrees with the per-event one
    assert redelivered == single  # (d)
    check_consistent(reordered)
    check_equals_model(reordered, modelled(shuffled, RULES[rules_name])[0])


async def test_two_consumer_loops_of_the_durable_lose_nothing(nats_url: str, postgres_url: str) -> None:
    """Two replicas of the resolver on one durable: they must not apply batches concurrently,
    or the checkpoint (one high-water mark) would skip whichever batch commits second. Random
    pauses in the handlers shuffle which transaction would commit first."""
    rng = random.Random(7)
    events = [
        (f"ev-{i}", Draft("identify", (("anonymous_id", f"a{i}"), ("device_id", f"d{rng.randrange(80)}")), i % 5))
        for i in range(300)
    ]

    def jittered(c: Consumer) -> Consumer:
        one_by_one, whole_batch = c._handler, c._batch_handler
        assert whole_batch is not None

        async def slow_one(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
            await asyncio.sleep(rng.random() / 200)
            return await one_by_one(conn, event)

        async def slow_batch(conn: AsyncConnection, batch: Sequence[event_pb2.Event]) -> Sequence[eventlog.Outgoing]:
            await asyncio.sleep(rng.random() / 50)
            return await whole_batch(conn, batch)

        c._handler, c._batch_handler = slow_one, slow_batch
        return c

    nc = await nats.connect(nats_url)
    try:
        async with namespace(nc) as topology, fresh_database(postgres_url) as engine:
            await publish(nc, topology, events)
            rules = core.DEFAULT_RULES
            await drain(nc, jittered(consumer(nc, engine, topology, rules, spec(4))),
                        jittered(consumer(nc, engine, topology, rules, spec(4))))
            graph = await read_graph(engine)
    finally:
        await nc.close()
    check_consistent(graph)
    check_equals_model(graph, modelled(events, {})[0])


# Found by the property test above: a profile that absorbs another and is itself merged away later
# in the same batch. Its merge count must be written as it stood when it was merged away, as the
# events one by one write it.
MERGED_TWICE_IN_A_BATCH = [
    Draft("track", (("anonymous_id", "a2"), ("phone", "0000")), 0),
    Draft("identify", (("phone", "0000"), ("email", "bob@x.com"), ("loyalty_id", "L1")), 0),
    Draft("track", (("email", "cy@x.com"),), 45),
    Draft("identify", (("phone", "+1 415 555 2671"), ("anonymous_id", "a3")), 0),
    Draft("track", (("phone", "0000"),), 12),
    Draft("track", (("phone", "(212) 555-0188"), ("email", "undefined")), 1),
    Draft("identify", (("anonymous_id", "a4"), ("user_id", "u2")), 4),
    Draft("identify", (("anonymous_id", "a4"), ("user_id", "U1")), 4),
    Draft("identify", (("device_id", "d3"), ("email", " Ada@X.COM")), 0),
    Draft("track", (("loyalty_id", "L2"), ("phone", "0000"), ("device_id", "d2")), 30),
    Draft("track", (("email", "cy@x.com"), ("device_id", "d2")), 31),
    Draft("track", (("user_id", "u1"), ("anonymous_id", "a4"), ("email", "bob@x.com")), 45),
    Draft("identify", (("email", "cy@x.com"), ("user_id", "u2"), ("anonymous_id", "a4")), 10),
    Draft("identify", (("email", "ada@x.com"), ("loyalty_id", "L1")), 0),
]


async def test_a_batch_writes_the_graph_its_events_write_one_by_one(nats_url: str, postgres_url: str) -> None:
    rules = core.Rules.from_json(RULES["default"])
    in_order = [(f"ev-{i}", d) for i, d in enumerate(MERGED_TWICE_IN_A_BATCH)]
    nc = await nats.connect(nats_url)
    try:
        async with namespace(nc) as one:
            await publish(nc, one, in_order)
            single, _ = await run_once(nc, postgres_url, one, rules, batch=5, batched=False)
            batched, _ = await run_once(nc, postgres_url, one, rules, batch=7, batched=True)
    finally:
        await nc.close()
    check_equals_model(single, modelled(in_order, RULES["default"])[0])
    assert batched == single
