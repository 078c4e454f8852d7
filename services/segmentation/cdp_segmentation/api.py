"""gRPC edge of segmentation."""

from __future__ import annotations

import json
import uuid

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_common import eventlog
from cdp_common.db import Outbox
from cdp_segmentation import core, store
from cdp_segmentation.handlers import evaluate_segment


class SegmentationServicer(segmentation_pb2_grpc.SegmentationServiceServicer):
    def __init__(self, engine: AsyncEngine, outbox: Outbox, topology: eventlog.Topology) -> None:
        self._engine = engine
        self._outbox = outbox
        self._topology = topology

    async def PutSegment(
        self,
        request: segmentation_pb2.Segment,
        context: grpc.aio.ServicerContext[segmentation_pb2.Segment, segmentation_pb2.Segment],
    ) -> segmentation_pb2.Segment:
        try:
            segment = core.parse_segment(
                request.id, request.name, [(c.field, c.op, c.value) for c in request.conditions]
            )
        except core.InvalidSegment as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        async with self._engine.begin() as conn:
            await store.put_segment(conn, segment)
            changes = await evaluate_segment(conn, self._topology, segment, str(uuid.uuid4()), eventlog.now())
            await self._outbox.add(conn, changes)
        try:
            await self._outbox.flush()
        except eventlog.LOG_UNAVAILABLE:
            # Committed: the entries are published by the next flush once the log is back.
            pass
        size = len([c for c in changes if c.event.type == "segment_entered"])
        return segmentation_pb2.Segment(id=segment.segment_id, name=segment.name, conditions=request.conditions,
                                         size=size)

    async def ListSegments(
        self,
        request: segmentation_pb2.ListSegmentsRequest,
        context: grpc.aio.ServicerContext[segmentation_pb2.ListSegmentsRequest, segmentation_pb2.ListSegmentsResponse],
    ) -> segmentation_pb2.ListSegmentsResponse:
        async with self._engine.connect() as conn:
            segments = await store.segments(conn)
            sizes = await store.sizes(conn)
        return segmentation_pb2.ListSegmentsResponse(
            segments=[
                segmentation_pb2.Segment(
                    id=s.segment_id,
                    name=s.name,
                    size=sizes.get(s.segment_id, 0),
                    conditions=[
                        segmentation_pb2.Condition(field=c.field, op=c.op, value=_literal(c))
                        for c in s.conditions
                    ],
                )
                for s in segments
            ]
        )


def _literal(condition: core.Condition) -> str:
    return "" if condition.op == "exists" else json.dumps(condition.value)
