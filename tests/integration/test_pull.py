"""The consumers' puller on a real JetStream: how a trickle of messages is cut into batches."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cdp_common import eventlog
from cdp_common.pull import Puller
from cdp_common.settings import Settings, SettingsError

pytestmark = pytest.mark.timeout(60)


async def trickle(nc: NATS, topology: eventlog.Topology, names: list[str], every: float) -> None:
    """One event per name, `every` seconds apart."""
    publisher = eventlog.Publisher(nc)
    for name in names:
        event = eventlog.new_event("track", event_id=f"{topology.namespace}-{name}", source="test")
        event.name = name
        await publisher.publish_events([eventlog.Outgoing(topology.collected("track"), event)])
        await asyncio.sleep(every)
    await publisher.close()


async def puller(nc: NATS, topology: eventlog.Topology, batch: int, linger: float) -> Puller:
    stream = topology.stream("collected")
    info = await nc.jetstream().add_consumer(stream, ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0))
    return Puller(nc, stream, info.name, batch, expires_seconds=5.0, linger_seconds=linger)


async def batches_of(pull: Puller, total: int) -> list[list[str]]:
    names: list[list[str]] = []
    while sum(map(len, names)) < total:
        names.append([eventlog.decode(msg.data).name for msg in await pull.fetch()])
    return names


@pytest.mark.parametrize("linger", [0.0, 1.5])
async def test_a_trickle_becomes_few_batches_with_a_linger_and_one_per_event_without(
    nc: NATS, namespace: str, linger: float
) -> None:
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    pull = await puller(nc, topology, batch=100, linger=linger)
    names = [f"e{i}" for i in range(6)]
    # Caught up before the first event: the puller is waiting when the trickle starts.
    fetched = asyncio.create_task(batches_of(pull, len(names)))
    await asyncio.sleep(0.3)
    await trickle(nc, topology, names, every=0.1)
    got = await fetched
    assert [name for batch in got for name in batch] == names
    if linger:
        assert got == [names]  # 0.5 s of events, all inside the linger after the first one
    else:
        assert len(got) >= 4  # each event was alone (or nearly) when it arrived


async def test_a_full_batch_does_not_wait_out_the_linger(nc: NATS, namespace: str) -> None:
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    pull = await puller(nc, topology, batch=3, linger=1.0)
    fetched = asyncio.create_task(batches_of(pull, 3))
    await asyncio.sleep(0.3)
    began = time.monotonic()
    await trickle(nc, topology, ["a", "b", "c"], every=0.0)
    assert await fetched == [["a", "b", "c"]]
    assert time.monotonic() - began < 0.8


@pytest.mark.parametrize(("raw", "error"), [
    ("-5", "must be 0 to 1000, got -5"), ("5000", "must be 0 to 1000, got 5000"), ("soon", "must be an integer"),
])
def test_a_bad_linger_setting_names_the_variable(raw: str, error: str) -> None:
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_CONSUMER_LINGER_MS": raw}
    with pytest.raises(SettingsError, match=f"CDP_CONSUMER_LINGER_MS {error}"):
        Settings.from_env("profile", 50053, environ)
    assert Settings.from_env("profile", 50053, {**environ, "CDP_CONSUMER_LINGER_MS": "0"}).consumer_linger_ms == 0
    assert Settings.from_env("profile", 50053, {"CDP_NATS_URL": "nats://x:4222"}).consumer_linger_ms == 100
