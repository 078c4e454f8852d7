"""gRPC edge of the DMP bridge."""

from __future__ import annotations


import grpc
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.dmp.v1 import dmp_pb2, dmp_pb2_grpc
from cdp_common import convert, eventlog, tracing
from cdp_common.service import correlation_id
from cdp_dmp import core, store

log = structlog.get_logger("cdp.dmp")


class DmpBridgeServicer(dmp_pb2_grpc.DmpBridgeServiceServicer):
    def __init__(self, engine: AsyncEngine, publisher: eventlog.Publisher, topology: eventlog.Topology) -> None:
        self._engine = engine
        self._publisher = publisher
        self._topology = topology

    async def ExportAudience(
        self,
        request: dmp_pb2.ExportAudienceRequest,
        context: grpc.aio.ServicerContext[dmp_pb2.ExportAudienceRequest, dmp_pb2.ExportAudienceResponse],
    ) -> dmp_pb2.ExportAudienceResponse:
        if not request.segment_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "segment_id is required")
        if "\x00" in request.segment_id:  # PostgreSQL text cannot hold it: no segment has it
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "segment_id: contains a NUL character")
        async with self._engine.connect() as conn:
            hashes = await store.audience_hashes(conn, request.segment_id)
        data = core.audience_csv(hashes)
        log.info("audience_exported", segment_id=request.segment_id, rows=len(set(hashes)))
        return dmp_pb2.ExportAudienceResponse(segment_id=request.segment_id, row_count=len(set(hashes)), csv=data)

    async def ImportConversions(
        self,
        request: dmp_pb2.ImportConversionsRequest,
        context: grpc.aio.ServicerContext[dmp_pb2.ImportConversionsRequest, dmp_pb2.ImportConversionsResponse],
    ) -> dmp_pb2.ImportConversionsResponse:
        try:
            platform = core.check_platform(request.platform)
            conversions = core.parse_conversions(request.csv, eventlog.now())
        except core.InvalidFile as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        async with self._engine.connect() as conn:
            done = await store.already_imported(conn, platform, [c.conversion_id for c in conversions])
            matched = await store.known_hashes(conn, [c.email_sha256 for c in conversions])
        fresh = [c for c in conversions if c.conversion_id not in done]
        trace = tracing.grpc_trace(context)
        outgoing = [self._event(platform, c, trace) for c in fresh]
        try:
            stored = await self._publisher.publish_events(outgoing) if outgoing else []
        except eventlog.LOG_UNAVAILABLE:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the event log is unavailable; retry the same file, nothing is doubled"
            )
        # Recorded after the log has them: a retry within the duplicate window is dropped by
        # JetStream, and after it by this table.
        async with self._engine.begin() as conn:
            await store.record_imported(conn, platform, [(c.conversion_id, o.event.id) for c, o in zip(fresh, outgoing)])
        appended = sum(1 for s in stored if not s.duplicate)
        log.info("conversions_imported", platform=platform, received=len(conversions), appended=appended)
        return dmp_pb2.ImportConversionsResponse(
            received=len(conversions),
            appended=appended,
            matched=sum(1 for c in conversions if c.email_sha256 in matched),
        )

    def _event(self, platform: str, conversion: core.Conversion, trace: tracing.Trace) -> eventlog.Outgoing:
        event = eventlog.new_event(
            "track",
            event_id=eventlog.derived_id(f"{platform}:{conversion.conversion_id}", "conversion"),
            source=f"dmp:{platform}",
        )
        event.name = conversion.event
        event.correlation_id = correlation_id()
        tracing.stamp(event, trace)
        event.occurred_at.CopyFrom(eventlog.timestamp(conversion.occurred_at))
        event.identifiers.custom["email_sha256"] = conversion.email_sha256
        event.properties.CopyFrom(
            convert.dict_to_struct(
                {"revenue": conversion.value, "currency": conversion.currency, "platform": platform,
                 "conversion_id": conversion.conversion_id}
            )
        )
        return eventlog.Outgoing(self._topology.collected("track"), event)
