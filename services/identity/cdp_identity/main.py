"""Composition root of the identity service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_common.service import Runtime, ServiceDefinition
from cdp_identity import handlers, store
from cdp_identity.api import IdentityServicer


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityServicer(runtime.engine), server)
    runtime.consumer(handlers.SPEC, handlers.make_handler(runtime.topology))
    return [identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name]


DEFINITION = ServiceDefinition(
    name="identity", schema="identity", default_port=50052, migrations=store.MIGRATIONS, build=build
)

