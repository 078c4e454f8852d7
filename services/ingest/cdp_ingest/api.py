"""gRPC edge of ingest: translate the request, validate, append, map errors to status codes."""

from __future__ import annotations

from typing import Any

import grpc
import structlog
from google.protobuf.json_format import MessageToDict
from nats.js import JetStreamContext

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_common.service import correlation_id
from cdp_ingest import core

log = structlog.get_logger("cdp.ingest")

Request = ingest_pb2.TrackRequest | ingest_pb2.IdentifyRequest


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):  # type: ignore[misc]
    def __init__(self, js: JetStreamContext, topology: eventlog.Topology) -> None:
        self._js = js
        self._topology = topology

    async def Track(self, request: ingest_pb2.TrackRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._ingest("track", request, context)

    async def Identify(self, request: ingest_pb2.IdentifyRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._ingest("identify", request, context)

    async def _ingest(self, kind: str, request: Request, context: grpc.aio.ServicerContext) -> Any:
        try:
            event = to_event(kind, request)
        except core.InvalidField as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        event.correlation_id = correlation_id()
        with structlog.contextvars.bound_contextvars(event_id=event.id):
            try:
                [stored] = await eventlog.publish_events(
                    self._js, [eventlog.Outgoing(self._topology.collected(kind), event)]
                )
            except eventlog.LOG_UNAVAILABLE as error:
                log.warning("log_unavailable", error=repr(error))
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the event log is unavailable; retry with the same event_id",
                )
            log.info("event_collected", type=kind, sequence=stored.sequence, duplicate=stored.duplicate)
        return ingest_pb2.IngestResponse(
            event_id=event.id, stream_sequence=stored.sequence, duplicate=stored.duplicate
        )


def to_event(kind: str, request: Request) -> event_pb2.Event:
    """The envelope for a valid request; raises InvalidField naming what is wrong."""
    ids = {
        name: getattr(request.identifiers, name)
        for name in ("user_id", "anonymous_id", "email", "phone", "device_id")
        if getattr(request.identifiers, name)
    }
    custom = dict(request.identifiers.custom)
    core.check_identifiers(ids, custom)
    event = eventlog.new_event(kind, event_id=core.event_id(request.event_id), source=request.source or "grpc")
    received = convert.to_datetime(event.received_at)
    assert received is not None
    moment = core.occurred_at(convert.to_datetime(request.timestamp), received)
    event.occurred_at.CopyFrom(eventlog.timestamp(moment))
    event.identifiers.CopyFrom(request.identifiers)
    event.context.CopyFrom(request.context)
    event.consent.update(request.consent)
    if isinstance(request, ingest_pb2.TrackRequest):
        event.name = core.check_name(request.event)
        core.check_fields("properties", request.properties.fields)
        event.properties.CopyFrom(request.properties)
    else:
        core.check_fields("traits", request.traits.fields)
        event.traits.CopyFrom(request.traits)
        email = core.email_from_traits(ids, MessageToDict(request.traits))
        if email and "@" not in email:
            raise core.InvalidField("traits.email", "is not an email address")
        if email:
            event.identifiers.email = email
    return event
