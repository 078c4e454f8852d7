"""The whole suite in the test's event loop: six services on real NATS, PostgreSQL and SMTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller
from nats.aio.client import Client as NATS

from cdp.activation.v1 import activation_pb2_grpc
from cdp.dmp.v1 import dmp_pb2_grpc
from cdp.identity.v1 import identity_pb2_grpc
from cdp.ingest.v1 import ingest_pb2_grpc
from cdp.profile.v1 import profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2_grpc
from cdp_activation.main import DEFINITION as ACTIVATION
from cdp_cli.infra import free_port
from cdp_cli.settle import settle
from cdp_common import eventlog
from cdp_common.service import ServiceDefinition
from cdp_dmp.main import DEFINITION as DMP
from cdp_identity.main import DEFINITION as IDENTITY
from cdp_ingest.main import DEFINITION as INGEST
from cdp_profile import jobs
from cdp_profile.main import DEFINITION as PROFILE
from cdp_segmentation.main import DEFINITION as SEGMENTATION

ALL = (INGEST, IDENTITY, PROFILE, SEGMENTATION, ACTIVATION, DMP)


@dataclass
class Inbox:
    """What the SMTP server received."""

    messages: list[Message] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


@dataclass
class Suite:
    addresses: dict[str, str]
    channels: dict[str, grpc.aio.Channel]
    js: Any
    topology: eventlog.Topology
    # Other listeners by name, e.g. "http" for ingest's collector.
    endpoints: dict[str, str] = field(default_factory=dict)
    # Each service's Prometheus /metrics URL, by service name.
    metrics: dict[str, str] = field(default_factory=dict)

    @property
    def ingest(self) -> ingest_pb2_grpc.IngestServiceStub:
        return ingest_pb2_grpc.IngestServiceStub(self.channels["ingest"])

    @property
    def identity(self) -> identity_pb2_grpc.IdentityServiceStub:
        return identity_pb2_grpc.IdentityServiceStub(self.channels["identity"])

    @property
    def profile(self) -> profile_pb2_grpc.ProfileServiceStub:
        return profile_pb2_grpc.ProfileServiceStub(self.channels["profile"])

    @property
    def segmentation(self) -> segmentation_pb2_grpc.SegmentationServiceStub:
        return segmentation_pb2_grpc.SegmentationServiceStub(self.channels["segmentation"])

    @property
    def activation(self) -> activation_pb2_grpc.ActivationServiceStub:
        return activation_pb2_grpc.ActivationServiceStub(self.channels["activation"])

    @property
    def dmp(self) -> dmp_pb2_grpc.DmpBridgeServiceStub:
        return dmp_pb2_grpc.DmpBridgeServiceStub(self.channels["dmp-bridge"])

    async def settle(self) -> int:
        return await settle(self.js, self.topology, timeout=30, quiet_seconds=0.5)


StartSuite = Callable[..., contextlib.AbstractAsyncContextManager[Suite]]


@pytest.fixture
def start_suite(
    nats_url: str, database_url: str, namespace: str, nc: NATS, smtp: tuple[Inbox, int],
    monkeypatch: pytest.MonkeyPatch, launch_services: Any,
) -> StartSuite:
    """Returns a context manager starting the given services (all six by default)."""
    monkeypatch.setenv("CDP_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("CDP_SMTP_PORT", str(smtp[1]))
    monkeypatch.setenv("CDP_HTTP_LISTEN", "127.0.0.1:0")

    @contextlib.asynccontextmanager
    async def start(definitions: tuple[ServiceDefinition, ...] = ALL, url: str = nats_url) -> AsyncIterator[Suite]:
        async with launch_services(definitions, nats_url=url, database_url=database_url, namespace=namespace,
                                   log_level="warning") as launched:
            yield Suite(launched.addresses, launched.channels, nc.jetstream(), eventlog.Topology(namespace),
                        launched.endpoints, launched.metrics)

    return start


@pytest.fixture
async def no_scoring_rounds(db: Any) -> None:
    """Holds the profile scoring job's lock for the whole test, taken before the services start: no
    round refits the base-level models (scores are relative to the base and to the clock) while
    the test compares profiles; the consumer scores with the default models meanwhile."""
    for _ in range(100):
        if await db.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", jobs.LOCK):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the scoring job held its lock for 10 s")
