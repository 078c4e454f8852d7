"""Composition root of the profile service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_common.service import Runtime, ServiceDefinition
from cdp_profile import handlers, store
from cdp_profile.api import ProfileServicer


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(ProfileServicer(runtime.engine), server)
    runtime.consumer(handlers.SPEC, handlers.make_handler(runtime.topology))
    return [profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name]


DEFINITION = ServiceDefinition(
    name="profile", schema="profile", default_port=50053, migrations=store.MIGRATIONS, build=build
)

