"""gRPC edge of profile."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, NoReturn

import grpc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog, identifiers
from cdp_profile import search, store
from cdp_profile.messages import snapshot
from cdp_profile.reader import Reader
from cdp_profile.rebuild import Rebuilder, RebuildFailed, RebuildRefused

DEFAULT_PAGE = 50
MAX_TIMELINE_PAGE = 500
MAX_SEARCH_PAGE = 1000


class _Invalid(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _page_size(requested: int, largest: int) -> int:
    if requested < 0 or requested > largest:
        raise _Invalid(grpc.StatusCode.INVALID_ARGUMENT, f"page_size: must be 1 to {largest} (0 means {DEFAULT_PAGE})")
    return requested or DEFAULT_PAGE


def _token(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def _untoken(token: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error):
        raise _Invalid(grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token this service gave") from None


def _refuse_nul(**fields: str) -> None:
    field = identifiers.nul_in(**fields)
    if field is not None:
        raise _Invalid(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: contains the character U+0000")


def _identifier(request: profile_pb2.GetProfileRequest | profile_pb2.GetTimelineRequest) -> tuple[str, str]:
    """The request's identifier as the read model keys it (type, normalised value)."""
    id_type, value = request.identifier.type, request.identifier.value
    if not id_type or not value:
        raise _Invalid(grpc.StatusCode.INVALID_ARGUMENT, "identifier: type and value are required")
    normal = identifiers.normalise(id_type, value)
    if normal is None:
        raise _Invalid(grpc.StatusCode.INVALID_ARGUMENT, "identifier.value: blocked or malformed")
    return id_type, normal


async def _profile_id(conn: AsyncConnection, request: profile_pb2.GetTimelineRequest) -> str:
    """The live profile a request names by profile_id or identifier (NOT_FOUND if none)."""
    key = request.WhichOneof("key")
    if key == "profile_id":
        found = await store.current_id(conn, request.profile_id)
        wanted = f"profile_id={request.profile_id}"
    elif key == "identifier":
        id_type, normal = _identifier(request)
        found = await store.by_identifier(conn, id_type, normal)
        wanted = f"{id_type}={request.identifier.value}"
    else:
        raise _Invalid(grpc.StatusCode.INVALID_ARGUMENT, "profile_id or identifier is required")
    if found is None:
        raise _Invalid(grpc.StatusCode.NOT_FOUND, f"no profile for {wanted}")
    return found


def _timeline_event(row: store.Recorded) -> profile_pb2.TimelineEvent:
    message = profile_pb2.TimelineEvent(
        event_id=row.event_id, type=row.type, name=row.name, source=row.source, consent=dict(row.consent)
    )
    convert.set_timestamp(message.occurred_at, row.occurred_at)
    message.properties.CopyFrom(convert.dict_to_struct(dict(row.properties)))
    message.traits.CopyFrom(convert.dict_to_struct(dict(row.traits)))
    for id_type, value in row.identifiers:
        message.identifiers.add(type=id_type, value=value)
    return message


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(self, engine: AsyncEngine, reader: Reader, rebuilder: Rebuilder | None = None) -> None:
        self._engine = engine
        self._reader = reader
        self._rebuilder = rebuilder

    async def Rebuild(
        self,
        request: profile_pb2.RebuildRequest,
        context: grpc.aio.ServicerContext[profile_pb2.RebuildRequest, profile_pb2.RebuildProgress],
    ) -> AsyncIterator[profile_pb2.RebuildProgress]:
        if self._rebuilder is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this profile service cannot rebuild its read model")
        try:
            async for step in self._rebuilder.run():
                yield profile_pb2.RebuildProgress(
                    phase=step.phase, sequence=step.sequence, target=step.target, events=step.events,
                    skipped=step.skipped, seconds=step.seconds,
                )
        except RebuildRefused as refused:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(refused))
        except RebuildFailed as failed:
            await context.abort(grpc.StatusCode.INTERNAL, str(failed))

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], error: _Invalid) -> NoReturn:
        await context.abort(error.code, str(error))
        raise AssertionError("unreachable")

    async def GetProfile(
        self,
        request: profile_pb2.GetProfileRequest,
        context: grpc.aio.ServicerContext[profile_pb2.GetProfileRequest, event_pb2.ProfileSnapshot],
    ) -> event_pb2.ProfileSnapshot:
        try:
            _refuse_nul(profile_id=request.profile_id)
            key = request.WhichOneof("key")
            if key == "profile_id":
                state = await self._reader.by_id(request.profile_id)
                wanted = f"profile_id={request.profile_id}"
            elif key == "identifier":
                id_type, value = _identifier(request)
                state = await self._reader.by_identifier(id_type, value)
                wanted = f"{request.identifier.type}={request.identifier.value}"
            else:
                raise _Invalid(grpc.StatusCode.INVALID_ARGUMENT, "profile_id or identifier is required")
            if state is None:
                raise _Invalid(grpc.StatusCode.NOT_FOUND, f"no profile for {wanted}")
        except _Invalid as error:
            await self._abort(context, error)
        return snapshot(state)

    async def GetTimeline(
        self,
        request: profile_pb2.GetTimelineRequest,
        context: grpc.aio.ServicerContext[profile_pb2.GetTimelineRequest, profile_pb2.GetTimelineResponse],
    ) -> profile_pb2.GetTimelineResponse:
        try:
            _refuse_nul(profile_id=request.profile_id, type=request.type, name=request.name)
            size = _page_size(request.page_size, MAX_TIMELINE_PAGE)
            before = None
            if request.page_token:
                at, event_id = _untoken(request.page_token)
                before = (datetime.fromisoformat(at), str(event_id))
            async with self._engine.connect() as conn:
                profile_id = await _profile_id(conn, request)
                rows = await store.timeline_page(
                    conn, profile_id, before=before, limit=size + 1, type_=request.type, name=request.name
                )
        except _Invalid as error:
            await self._abort(context, error)
        except (TypeError, ValueError):
            await self._abort(context, _Invalid(grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token this service gave"))
        page = rows[:size]
        response = profile_pb2.GetTimelineResponse(profile_id=profile_id, events=[_timeline_event(r) for r in page])
        if len(rows) > size:
            response.next_page_token = _token([page[-1].occurred_at.isoformat(), page[-1].event_id])
        return response

    async def SearchProfiles(
        self,
        request: profile_pb2.SearchProfilesRequest,
        context: grpc.aio.ServicerContext[profile_pb2.SearchProfilesRequest, profile_pb2.SearchProfilesResponse],
    ) -> profile_pb2.SearchProfilesResponse:
        try:
            size = _page_size(request.page_size, MAX_SEARCH_PAGE)
            filters = search.parse([(f.field, f.op, f.value) for f in request.filters])
            after = str(_untoken(request.page_token)) if request.page_token else ""
            async with self._engine.connect() as conn:
                ids = await store.search_ids(conn, filters, after=after, limit=size + 1, now=eventlog.now())
                loaded = await store.load_many(conn, ids[:size], lock=False)
        except search.InvalidFilter as error:
            await self._abort(context, _Invalid(grpc.StatusCode.INVALID_ARGUMENT, str(error)))
        except _Invalid as error:
            await self._abort(context, error)
        response = profile_pb2.SearchProfilesResponse(
            profiles=[snapshot(loaded.states[p]) for p in ids[:size] if p in loaded.states]
        )
        if len(ids) > size:
            response.next_page_token = _token(ids[size - 1])
        return response
