"""gRPC edge of ingest: translate requests, authenticate, hand them to the ingestor, map outcomes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp_common import convert, tracing
from cdp_common.service import correlation_id
from cdp_ingest import core
from cdp_ingest.ingestor import INVALID, OK, Ingestor, Result, WriteKeys

log = structlog.get_logger("cdp.ingest")

_CODES = {OK: grpc.StatusCode.OK, INVALID: grpc.StatusCode.INVALID_ARGUMENT}
# How many events of an Import stream are stored together.
IMPORT_CHUNK = 500


def _time(request: Any, name: str) -> datetime | None:
    try:
        return convert.to_datetime(getattr(request, name))
    except (ValueError, OverflowError):  # outside Timestamp's range: years 1-9999, nanos below 1e9
        raise core.InvalidField(name, "not a valid time") from None


def to_incoming(kind: str, request: Any, open_source: bool = True) -> core.Incoming:
    """Any of the six request messages as an Incoming (field names are shared, see the proto);
    raises InvalidField for a timestamp no time can be made of."""
    ids = request.identifiers
    fields = request.DESCRIPTOR.fields_by_name

    def struct(name: str) -> Mapping[str, Any]:
        # A view, not a copy: the envelope copies the Struct whole when nothing was added.
        return convert.StructView(getattr(request, name)) if name in fields and request.HasField(name) else {}

    return core.Incoming(
        kind=kind,
        event_id=request.event_id,
        ids={f.name: value for f, value in ids.ListFields() if f.name != "custom"},
        custom=dict(ids.custom) if ids.custom else {},
        name=getattr(request, "event", "") or getattr(request, "name", ""),
        properties=struct("properties"),
        traits=struct("traits"),
        timestamp=_time(request, "timestamp"),
        sent_at=_time(request, "sent_at"),
        context=struct("context"),
        consent=dict(request.consent) if request.consent else {},
        previous_id=getattr(request, "previous_id", ""),
        group_id=getattr(request, "group_id", ""),
        category=getattr(request, "category", ""),
        source=request.source if open_source else "",
    )


def _item_result(result: Result) -> ingest_pb2.ItemResult:
    code = _CODES.get(result.outcome, grpc.StatusCode.UNAVAILABLE)
    return ingest_pb2.ItemResult(
        index=result.index, event_id=result.event_id, code=code.value[0], error=result.error,
        stream_sequence=result.sequence, duplicate=result.duplicate,
    )


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, ingestor: Ingestor, keys: WriteKeys) -> None:
        self._ingestor = ingestor
        self._keys = keys

    async def _source(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        # Only `-bin` keys carry bytes values; the keys read here are text.
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        key = metadata.get("x-write-key") or WriteKeys.from_basic(metadata.get("authorization"))
        source = self._keys.source(key, "grpc")
        if source is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "unknown write key: send one as x-write-key metadata"
            )
        return source

    async def _single(
        self, kind: str, request: Message, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.IngestResponse:
        source = await self._source(context)
        try:
            item: core.Incoming | core.InvalidField = to_incoming(kind, request, self._keys.open)
        except core.InvalidField as error:
            item = error
        [result] = await self._ingestor.ingest(
            [item], source=source, correlation_id=correlation_id(), trace=tracing.grpc_trace(context)
        )
        if result.outcome == INVALID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, result.error)
        if result.outcome != OK:
            await context.abort(grpc.StatusCode.UNAVAILABLE, result.error)
        log.debug("event_collected", type=kind, event_id=result.event_id, sequence=result.sequence,
                 duplicate=result.duplicate)
        return ingest_pb2.IngestResponse(
            event_id=result.event_id, stream_sequence=result.sequence, duplicate=result.duplicate
        )

    async def Track(
        self,
        request: ingest_pb2.TrackRequest,
        context: grpc.aio.ServicerContext[ingest_pb2.TrackRequest, ingest_pb2.IngestResponse],
    ) -> ingest_pb2.IngestResponse:
        return await self._single("track", request, context)

    async def Identify(
        self,
        request: ingest_pb2.IdentifyRequest,
        context: grpc.aio.ServicerContext[ingest_pb2.IdentifyRequest, ingest_pb2.IngestResponse],
    ) -> ingest_pb2.IngestResponse:
        return await self._single("identify", request, context)

    async def Alias(
        self,
        request: ingest_pb2.AliasRequest,
        context: grpc.aio.ServicerContext[ingest_pb2.AliasRequest, ingest_pb2.IngestResponse],
    ) -> ingest_pb2.IngestResponse:
        return await self._single("alias", request, context)

    async def Page(
        self,
        request: ingest_pb2.PageRequest,
        context: grpc.aio.ServicerContext[ingest_pb2.PageRequest, ingest_pb2.IngestResponse],
    ) -> ingest_pb2.IngestResponse:
        return await self._single("page", request, context)

    async def Screen(
        self,
        request: ingest_pb2.ScreenRequest,
        context: grpc.aio.ServicerContext[ingest_pb2.ScreenRequest, ingest_pb2.IngestResponse],
    ) -> ingest_pb2.IngestResponse:
        return await self._single("screen", request, context)

    async def Group(
        self,
        request: ingest_pb2.GroupRequest,
        context: grpc.aio.ServicerContext[ingest_pb2.GroupRequest, ingest_pb2.IngestResponse],
    ) -> ingest_pb2.IngestResponse:
        return await self._single("group", request, context)

    async def Batch(
        self,
        request: ingest_pb2.BatchRequest,
        context: grpc.aio.ServicerContext[ingest_pb2.BatchRequest, ingest_pb2.BatchResponse],
    ) -> ingest_pb2.BatchResponse:
        source = await self._source(context)
        if len(request.items) > core.MAX_BATCH_EVENTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"items: more than {core.MAX_BATCH_EVENTS} events in one batch"
            )
        results = await self._store(request.items, source, tracing.grpc_trace(context))
        stored = sum(1 for r in results if r.outcome == OK)
        log.info("batch_collected", events=len(results), stored=stored)
        return ingest_pb2.BatchResponse(
            results=[_item_result(r) for r in results], stored=stored, rejected=len(results) - stored
        )

    async def Import(
        self,
        request_iterator: AsyncIterator[ingest_pb2.BatchItem],
        context: grpc.aio.ServicerContext[ingest_pb2.BatchItem, ingest_pb2.ItemResult],
    ) -> AsyncIterator[ingest_pb2.ItemResult]:
        source = await self._source(context)
        trace = tracing.grpc_trace(context)
        chunk: list[ingest_pb2.BatchItem] = []
        offset = 0
        async for item in request_iterator:
            chunk.append(item)
            if len(chunk) >= IMPORT_CHUNK:
                for result in await self._store(chunk, source, trace, offset):
                    yield _item_result(result)
                offset += len(chunk)
                chunk = []
        if chunk:
            for result in await self._store(chunk, source, trace, offset):
                yield _item_result(result)

    async def _store(
        self, items: Sequence[ingest_pb2.BatchItem], source: str, trace: tracing.Trace, offset: int = 0
    ) -> list[Result]:
        incoming: list[core.Incoming | core.InvalidField] = []
        for item in items:
            kind = item.WhichOneof("kind")
            try:
                incoming.append(
                    to_incoming(kind, getattr(item, kind), self._keys.open)
                    if kind
                    else core.InvalidField("kind", "empty batch item")
                )
            except core.InvalidField as error:
                incoming.append(error)
        results = await self._ingestor.ingest(incoming, source=source, correlation_id=correlation_id(), trace=trace)
        return [replace(r, index=r.index + offset) for r in results] if offset else results
