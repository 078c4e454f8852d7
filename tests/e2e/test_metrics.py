"""Each service's /metrics as Prometheus scrapes it, after events went through the whole pipeline."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp.v1 import event_pb2
from cdp_cli.infra import free_port
from cdp_cli.suite import healthy
from cdp_common import convert, eventlog
from cdp_identity.main import DEFINITION as IDENTITY

pytestmark = pytest.mark.timeout(120)

INGEST_SERVICE = "cdp.ingest.v1.IngestService"
CONSUMERS = {
    "identity": ["identity-resolve"], "profile": ["profile-project"], "segmentation": ["segmentation-evaluate"],
    "activation": ["activation-trigger"], "dmp-bridge": ["dmp-identities", "dmp-audiences"],
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return parse(await response.text())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def order(event_id: str, user_id: str) -> ingest_pb2.TrackRequest:
    return ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(user_id=user_id), event="Order Completed",
        properties=convert.dict_to_struct({"order_id": f"o-{event_id}", "revenue": 10.0, "currency": "EUR"}),
    )


async def test_handled_counts_match_what_was_sent_and_lag_is_back_to_zero(start_suite: Any) -> None:
    async with start_suite() as suite:
        for i in range(10):
            await suite.ingest.Track(order(f"m-{i}", f"u-{i % 4}"))
        await suite.ingest.Batch(ingest_pb2.BatchRequest(
            items=[ingest_pb2.BatchItem(track=order(f"b-{i}", f"u-{i}")) for i in range(5)]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await suite.ingest.Track(ingest_pb2.TrackRequest(event_id="no-one", event="Order Completed"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await suite.settle()

        ingest = await scrape(suite.metrics["ingest"])
        track = {"grpc_service": INGEST_SERVICE, "grpc_method": "Track"}
        assert value(ingest, "grpc_server_handled_total", **track, grpc_code="OK") == 10
        assert value(ingest, "grpc_server_handled_total", **track, grpc_code="INVALID_ARGUMENT") == 1
        assert value(ingest, "grpc_server_handled_total", grpc_service=INGEST_SERVICE, grpc_method="Batch",
                     grpc_code="OK") == 1
        assert value(ingest, "grpc_server_handling_seconds_count", **track) == 11

        identity = await scrape(suite.metrics["identity"])
        resolve = {"consumer": "identity-resolve"}
        assert value(identity, "cdp_consumer_events_handled_total", **resolve) == 15
        assert value(identity, "cdp_consumer_dead_letters_total", **resolve) == 0
        assert value(identity, "cdp_consumer_handler_errors_total", **resolve) == 0
        assert value(identity, "cdp_consumer_active", **resolve) == 1
        batches = value(identity, "cdp_consumer_batch_seconds_count", **resolve)
        assert batches is not None and 1 <= batches <= 15

        # Profile applies every fact identity published.
        facts = (await suite.js.stream_info(suite.topology.stream("identity"))).state.messages
        profile = await scrape(suite.metrics["profile"])
        assert facts >= 15
        assert value(profile, "cdp_consumer_events_handled_total", consumer="profile-project") == facts

        for service, consumers in CONSUMERS.items():
            samples = await scrape(suite.metrics[service])
            for consumer in consumers:
                assert value(samples, "cdp_consumer_lag_messages", consumer=consumer) == 0, (service, consumer)


async def test_a_poison_message_raises_the_dead_letter_counter(start_suite: Any) -> None:
    async with start_suite((IDENTITY,)) as suite:
        # Only junk identifiers: identity can never resolve it, so it is dead-lettered at once.
        poison = eventlog.new_event("track", event_id="poison-1", source="test")
        poison.name = "Order Completed"
        poison.identifiers.user_id = "null"
        await suite.js.publish(suite.topology.collected("track"), eventlog.encode(poison))
        deadline = time.monotonic() + 30
        while True:
            identity = await scrape(suite.metrics["identity"])
            if value(identity, "cdp_consumer_dead_letters_total", consumer="identity-resolve"):
                break
            assert time.monotonic() < deadline, "the dead-letter counter never rose"
            await asyncio.sleep(0.1)
        resolve = {"consumer": "identity-resolve"}
        assert value(identity, "cdp_consumer_dead_letters_total", **resolve) == 1
        assert value(identity, "cdp_consumer_handler_errors_total", **resolve) == 1
        assert value(identity, "cdp_consumer_events_handled_total", **resolve) == 0
        await suite.settle()
        identity = await scrape(suite.metrics["identity"])
        assert value(identity, "cdp_consumer_lag_messages", **resolve) == 0


def test_ingest_worker_processes_report_their_sum_on_one_port(nats_url: str, namespace: str) -> None:
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "PROMETHEUS_"))}
    env.update(CDP_NATS_URL=nats_url, CDP_NAMESPACE=namespace, CDP_GRPC_LISTEN=f"127.0.0.1:{port}",
               CDP_HTTP_LISTEN=f"127.0.0.1:{http_port}", CDP_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
               CDP_WORKERS="2", CDP_LOG_LEVEL="warning")
    process = subprocess.Popen([sys.executable, "-m", "cdp_ingest"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not healthy(f"127.0.0.1:{port}"):
            assert process.poll() is None and time.monotonic() < deadline, "ingest did not start"
            time.sleep(0.1)
        # A new connection each time: the kernel spreads them over both processes.
        sent = 0
        for connection in range(8):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                for i in range(3):
                    stub.Track(order(f"w-{connection}-{i}", f"u-{i}"), timeout=10)
                    sent += 1
        for _ in range(6):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                samples = parse(response.read().decode())
            # Whichever process answered, it reports both processes' calls.
            assert value(samples, "grpc_server_handled_total", grpc_service=INGEST_SERVICE, grpc_method="Track",
                         grpc_code="OK") == sent
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            assert process.stderr is not None
            process.stderr.close()
