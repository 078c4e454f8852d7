"""One suite of the six services per test module, for tests that throw many inputs at it.

Built like tests/e2e's `start_suite`, but module-scoped: starting six services per hypothesis
example (or per test) would spend the time budget on start-ups.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import nats
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Sink

from cdp_activation.main import DEFINITION as ACTIVATION
from cdp_cli.infra import free_port
from cdp_cli.settle import settle
from cdp_common import eventlog
from cdp_dmp.main import DEFINITION as DMP
from cdp_identity.main import DEFINITION as IDENTITY
from cdp_ingest.main import DEFINITION as INGEST
from cdp_profile.main import DEFINITION as PROFILE
from cdp_segmentation.main import DEFINITION as SEGMENTATION

ALL = (INGEST, IDENTITY, PROFILE, SEGMENTATION, ACTIVATION, DMP)
WRITE_KEY = "wk_fuzz"


@dataclass
class Suite:
    addresses: dict[str, str]
    channels: dict[str, grpc.aio.Channel]
    js: Any
    topology: eventlog.Topology
    http: str

    async def settle(self) -> int:
        return await settle(self.js, self.topology, timeout=60, quiet_seconds=0.3)


@pytest.fixture(scope="module")
def module_env() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def smtp_port() -> Iterator[int]:
    port = free_port()
    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port
    controller.stop()


@pytest.fixture(scope="module")
async def module_database(postgres_url: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture(scope="module")
async def suite(
    nats_url: str, module_database: str, smtp_port: int, module_env: pytest.MonkeyPatch, launch_services: Any
) -> AsyncIterator[Suite]:
    """All six services with write keys required, in this module's own namespace and database."""
    module_env.setenv("CDP_SMTP_HOST", "127.0.0.1")
    module_env.setenv("CDP_SMTP_PORT", str(smtp_port))
    module_env.setenv("CDP_HTTP_LISTEN", "127.0.0.1:0")
    module_env.setenv("CDP_WRITE_KEYS", f"{WRITE_KEY}=fuzz")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    nc = await nats.connect(nats_url)
    async with launch_services(ALL, nats_url=nats_url, database_url=module_database, namespace=namespace,
                               log_level="error") as launched:
        yield Suite(launched.addresses, launched.channels, nc.jetstream(), eventlog.Topology(namespace),
                    launched.endpoints["http"])
    await nc.close()
