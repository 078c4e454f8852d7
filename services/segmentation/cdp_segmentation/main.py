"""Composition root of the segmentation service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_common.service import Runtime, ServiceDefinition
from cdp_segmentation import handlers, store
from cdp_segmentation.api import SegmentationServicer


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    servicer = SegmentationServicer(runtime.engine, runtime.outbox, runtime.topology)
    segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server(servicer, server)
    one_by_one, whole_batch = handlers.make_handlers(runtime.topology)
    runtime.consumer(handlers.SPEC, one_by_one, whole_batch)
    return [segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"].full_name]


DEFINITION = ServiceDefinition(
    name="segmentation", schema="segmentation", default_port=50054, migrations=store.MIGRATIONS, build=build
)

