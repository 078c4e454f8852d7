"""gRPC edge of profile."""

from __future__ import annotations

from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_common import identifiers
from cdp_profile import store
from cdp_profile.messages import snapshot


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):  # type: ignore[misc]
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def GetProfile(self, request: profile_pb2.GetProfileRequest, context: grpc.aio.ServicerContext) -> Any:
        key = request.WhichOneof("key")
        async with self._engine.connect() as conn:
            if key == "profile_id":
                found = await store.current_id(conn, request.profile_id)
                wanted = f"profile_id={request.profile_id}"
            elif key == "identifier":
                id_type, value = request.identifier.type, request.identifier.value
                if not id_type or not value:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "identifier.type and identifier.value are required"
                    )
                normal = identifiers.normalise(id_type, value)
                if normal is None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "identifier.value is blocked or malformed")
                found = await store.by_identifier(conn, id_type, normal)
                wanted = f"{id_type}={value}"
            else:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "profile_id or identifier is required")
            state = None if found is None else await store.load(conn, found, lock=False)
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no profile for {wanted}")
        return snapshot(state)
