"""Composition root of the identity service."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import grpc

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_common.service import Runtime, ServiceDefinition
from cdp_common.settings import SettingsError, optional
from cdp_identity import core, handlers, store
from cdp_identity.api import IdentityServicer


def load_rules(path: str) -> core.Rules:
    """CDP_IDENTITY_RULES names a JSON file (docs/identity.md); unset means the defaults."""
    if not path:
        return core.DEFAULT_RULES
    try:
        return core.Rules.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as error:
        raise SettingsError(f"environment variable CDP_IDENTITY_RULES ({path}): {error}") from None


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    rules = load_rules(optional("CDP_IDENTITY_RULES", ""))
    servicer = IdentityServicer(runtime.engine, runtime.publisher, runtime.topology, rules)
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(servicer, server)
    one_by_one, whole_batch, pipeline = handlers.make_handlers(runtime.topology, rules)
    runtime.consumer(handlers.SPEC, one_by_one, whole_batch, pipeline)
    return [identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name]


DEFINITION = ServiceDefinition(
    name="identity", schema="identity", default_port=50052, migrations=store.MIGRATIONS, build=build
)
