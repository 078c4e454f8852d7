"""Composition root of the DMP bridge service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cdp.dmp.v1 import dmp_pb2, dmp_pb2_grpc
from cdp_common.service import Runtime, ServiceDefinition
from cdp_dmp import handlers, store
from cdp_dmp.api import DmpBridgeServicer


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    dmp_pb2_grpc.add_DmpBridgeServiceServicer_to_server(
        DmpBridgeServicer(runtime.engine, runtime.publisher, runtime.topology), server
    )
    runtime.consumer(handlers.IDENTITIES, handlers.on_profile, handlers.on_profiles)
    runtime.consumer(handlers.AUDIENCES, handlers.on_membership, handlers.on_memberships)
    return [dmp_pb2.DESCRIPTOR.services_by_name["DmpBridgeService"].full_name]


DEFINITION = ServiceDefinition(
    name="dmp-bridge", schema="dmp", default_port=50056, migrations=store.MIGRATIONS, build=build
)

