"""Session fixtures: a real nats-server with JetStream and a real PostgreSQL, from the wheels.

Given CDP_NATS_URL / CDP_DATABASE_URL, those servers are used instead. Each test gets its own
log namespace (streams and subjects) and its own database, so tests never see each other's data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import nats
import pytest
from nats.aio.client import Client as NATS

from cdp_cli import infra
from cdp_common.service import ServiceDefinition, running
from cdp_common.settings import Settings


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    """The servers' data, outside pytest's own temp dirs: pytest prunes old ones, and another
    pytest run on the machine could delete a live server's files under it."""
    directory = Path(tempfile.mkdtemp(prefix="cdp-test-servers-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_url(servers_dir: Path) -> Iterator[str]:
    if os.environ.get("CDP_NATS_URL"):
        yield os.environ["CDP_NATS_URL"]
        return
    server = infra.start_nats(servers_dir / "nats")
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(servers_dir: Path) -> Iterator[str]:
    if os.environ.get("CDP_DATABASE_URL"):
        yield os.environ["CDP_DATABASE_URL"]
        return
    server = infra.start_postgres(servers_dir / "pg" / "data", keep=False)
    yield server.url
    server.stop()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


@pytest.fixture
async def database_url(postgres_url: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_asyncpg_dsn(postgres_url))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield _with_database(postgres_url, name)
    admin = await asyncpg.connect(_asyncpg_dsn(postgres_url))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, for checking what services wrote."""
    conn = await asyncpg.connect(_asyncpg_dsn(database_url))
    yield conn
    await conn.close()


@dataclass(frozen=True)
class Launched:
    """Services running in this process: their gRPC addresses, other listeners, a channel to each."""

    addresses: dict[str, str]
    endpoints: dict[str, str]
    channels: dict[str, grpc.aio.Channel]
    # Each service's Prometheus endpoint, by service name.
    metrics: dict[str, str] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def _launch(
    definitions: Sequence[ServiceDefinition], *, nats_url: str, database_url: str, namespace: str, log_level: str,
    **settings_given: Any,
) -> AsyncIterator[Launched]:
    """`settings_given`: other `Settings` fields, as their environment variables would set them."""
    async with contextlib.AsyncExitStack() as stack:
        addresses, endpoints, metrics = {}, {}, {}
        for definition in definitions:
            settings = Settings(
                service=definition.name, nats_url=nats_url, database_url=database_url,
                grpc_listen="127.0.0.1:0", namespace=namespace, log_level=log_level, metrics_listen="127.0.0.1:0",
                **settings_given,
            )
            service = await stack.enter_async_context(running(definition, settings))
            addresses[definition.name] = service.address
            endpoints.update(service.runtime.endpoints)
            metrics[definition.name] = service.metrics_url or ""
        channels = {name: grpc.aio.insecure_channel(address) for name, address in addresses.items()}
        try:
            yield Launched(addresses, endpoints, channels, metrics)
        finally:
            for channel in channels.values():
                await channel.close()


@pytest.fixture(scope="session")
def launch_services() -> Callable[..., contextlib.AbstractAsyncContextManager[Launched]]:
    """Starts services in-process, each as `cdp up` would run it but sharing this event loop."""
    return _launch
