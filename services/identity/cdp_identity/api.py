"""gRPC edge of identity."""

from __future__ import annotations

from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_common import identifiers
from cdp_identity import store


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):  # type: ignore[misc]
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def Resolve(self, request: identity_pb2.ResolveRequest, context: grpc.aio.ServicerContext) -> Any:
        id_type, value = request.identifier.type, request.identifier.value
        if not id_type:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "identifier.type is required")
        if not value:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "identifier.value is required")
        normal = identifiers.normalise(id_type, value)
        if normal is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "identifier.value is blocked or malformed")
        async with self._engine.connect() as conn:
            profile_id = await store.resolve(conn, (id_type, normal))
        if profile_id is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no profile holds {id_type}={value}")
        return identity_pb2.ResolveResponse(profile_id=profile_id)

    async def GetStats(self, request: identity_pb2.GetStatsRequest, context: grpc.aio.ServicerContext) -> Any:
        async with self._engine.connect() as conn:
            profiles, ids, merges = await store.stats(conn)
        return identity_pb2.GetStatsResponse(profiles=profiles, identifiers=ids, merges=merges)
