"""Composition root of the ingest service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp_common.service import Runtime, ServiceDefinition
from cdp_ingest.api import IngestServicer


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(IngestServicer(runtime.js, runtime.topology), server)
    return [ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name]


# Ingest keeps no read model, so it needs no database: PostgreSQL being down never stops intake.
DEFINITION = ServiceDefinition(name="ingest", schema=None, default_port=50051, migrations=(), build=build)

