"""Composition root of the ingest service: the gRPC API and the HTTP collector."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from aiohttp import web

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp_common.service import Runtime, ServiceDefinition
from cdp_common.settings import listen_address, optional
from cdp_ingest.api import IngestServicer
from cdp_ingest.http import Collector
from cdp_ingest.ingestor import Ingestor, WriteKeys


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    keys = WriteKeys.parse(optional("CDP_WRITE_KEYS", ""))
    if keys.open:
        runtime.log.warning("write_keys_not_configured", hint="set CDP_WRITE_KEYS; every request is accepted")
    ingestor = Ingestor(runtime.publisher, runtime.topology)
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(IngestServicer(ingestor, keys), server)

    host, port = listen_address("CDP_HTTP_LISTEN", "127.0.0.1:8088")
    runner = web.AppRunner(Collector(ingestor, keys).app(runtime.tracing.http_middlewares), access_log=None)
    await runner.setup()
    # reuse_port: with CDP_WORKERS > 1 every worker process listens on the same port.
    site = web.TCPSite(runner, host, port, reuse_port=True)
    await site.start()
    bound = runner.addresses[0]
    runtime.endpoints["http"] = f"http://{bound[0]}:{bound[1]}"
    runtime.on_stop.append(runner.cleanup)
    return [ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name]


# Ingest keeps no read model, so it needs no database: PostgreSQL being down never stops intake.
DEFINITION = ServiceDefinition(name="ingest", schema=None, default_port=50051, migrations=(), build=build)
