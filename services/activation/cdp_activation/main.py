"""Composition root of the activation service."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from cdp.activation.v1 import activation_pb2, activation_pb2_grpc
from cdp_activation import handlers, store
from cdp_activation.api import ActivationServicer
from cdp_activation.sender import Sender, SmtpSettings
from cdp_common.service import Runtime, ServiceDefinition
from cdp_common.settings import optional_int, require


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    smtp = SmtpSettings(host=require("CDP_SMTP_HOST"), port=optional_int("CDP_SMTP_PORT", 25))
    sender = Sender(runtime.engine, runtime.outbox, runtime.topology, smtp)
    activation_pb2_grpc.add_ActivationServiceServicer_to_server(ActivationServicer(runtime.engine), server)
    runtime.consumer(handlers.SPEC, *handlers.make_handlers(sender.wake.set))
    runtime.background.append(asyncio.create_task(sender.run(), name="activation-sender"))
    return [activation_pb2.DESCRIPTOR.services_by_name["ActivationService"].full_name]


DEFINITION = ServiceDefinition(
    name="activation", schema="activation", default_port=50055, migrations=store.MIGRATIONS, build=build
)

