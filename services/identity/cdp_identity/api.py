"""gRPC edge of identity: look-ups, and operators' merge and split requests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog, identifiers, tracing
from cdp_common.service import correlation_id
from cdp_identity import core, handlers, store

# How long Merge and Split wait for the resolver to apply the request they appended to the log.
APPLY_TIMEOUT_SECONDS = 15.0


def _graph(row: store.GraphRow) -> identity_pb2.Graph:
    graph = identity_pb2.Graph(profile_id=row.profile_id)
    convert.set_timestamp(graph.created_at, row.created_at)
    for id_type, value, first, last in row.identifiers:
        item = graph.identifiers.add(type=id_type, value=value)
        convert.set_timestamp(item.first_seen, first)
        convert.set_timestamp(item.last_seen, last)
    for merged_id, survivor_id, event_id, reason, at in row.merges:
        merge = graph.merges.add(merged_id=merged_id, survivor_id=survivor_id, event_id=event_id, reason=reason)
        convert.set_timestamp(merge.merged_at, at)
    for source, new, keys, event_id, reason, at in row.splits:
        split = graph.splits.add(source_profile_id=source, new_profile_id=new, event_id=event_id, reason=reason)
        for id_type, value in keys:
            split.identifiers.add(type=id_type, value=value)
        convert.set_timestamp(split.split_at, at)
    return graph


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(
        self, engine: AsyncEngine, publisher: eventlog.Publisher, topology: eventlog.Topology, rules: core.Rules
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._topology = topology
        self._rules = rules

    async def _key(self, identifier: event_pb2.Identifier, context: grpc.aio.ServicerContext[Any, Any],
                   field: str = "identifier") -> core.Key:
        if not identifier.type:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.type is required")
        if not identifier.value:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.value is required")
        keys = core.event_identifiers({}, {identifier.type: identifier.value}, self._rules)
        key = next((k for k in keys if k[0] == identifier.type), None)
        if key is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.value is blocked or malformed")
        return key

    async def Resolve(
        self,
        request: identity_pb2.ResolveRequest,
        context: grpc.aio.ServicerContext[identity_pb2.ResolveRequest, identity_pb2.ResolveResponse],
    ) -> identity_pb2.ResolveResponse:
        key = await self._key(request.identifier, context)
        async with self._engine.connect() as conn:
            profile_id = await store.resolve(conn, key)
        if profile_id is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no profile holds {key[0]}={request.identifier.value}")
        return identity_pb2.ResolveResponse(profile_id=profile_id)

    async def _refuse_nul(self, context: grpc.aio.ServicerContext[Any, Any], **fields: str | Sequence[str]) -> None:
        field = identifiers.nul_in(**fields)
        if field is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: contains the character U+0000")

    async def GetGraph(
        self,
        request: identity_pb2.GetGraphRequest,
        context: grpc.aio.ServicerContext[identity_pb2.GetGraphRequest, identity_pb2.Graph],
    ) -> identity_pb2.Graph:
        await self._refuse_nul(context, profile_id=request.profile_id)
        which = request.WhichOneof("key")
        async with self._engine.connect() as conn:
            if which == "identifier":
                key = await self._key(request.identifier, context)
                found = await store.resolve(conn, key)
            elif which == "profile_id" and request.profile_id:
                found = await store.current(conn, request.profile_id)
            else:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "profile_id or identifier is required")
            row = None if found is None else await store.graph(conn, found)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such profile")
        return _graph(row)

    async def GetStats(
        self,
        request: identity_pb2.GetStatsRequest,
        context: grpc.aio.ServicerContext[identity_pb2.GetStatsRequest, identity_pb2.GetStatsResponse],
    ) -> identity_pb2.GetStatsResponse:
        async with self._engine.connect() as conn:
            profiles, ids, merges = await store.stats(conn)
        return identity_pb2.GetStatsResponse(profiles=profiles, identifiers=ids, merges=merges)

    async def Merge(
        self,
        request: identity_pb2.MergeRequest,
        context: grpc.aio.ServicerContext[identity_pb2.MergeRequest, identity_pb2.Graph],
    ) -> identity_pb2.Graph:
        await self._refuse_nul(context, survivor_id=request.survivor_id, profile_ids=list(request.profile_ids))
        others = [p for p in dict.fromkeys(request.profile_ids) if p != request.survivor_id]
        if not request.survivor_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "survivor_id is required")
        if not others:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "profile_ids: name at least one other profile")
        async with self._engine.connect() as conn:
            live = await store.live_profiles(conn, [request.survivor_id, *others])
            known = await store.known(conn, [request.survivor_id, *others])
        missing = [p for p in [request.survivor_id, *others] if p not in live]
        if missing:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live profile {', '.join(missing)}")
        refusal = core.merge_refusal(known[request.survivor_id], [known[p] for p in others], eventlog.now(), self._rules)
        if refusal:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        command = self._command("merge_requested", context)
        command.profile_id = request.survivor_id
        command.merge_requested.survivor_id = request.survivor_id
        command.merge_requested.profile_ids.extend(others)
        command.merge_requested.reason = request.reason
        await self._append_and_wait(command, context)
        async with self._engine.connect() as conn:
            outcome = await store.merged_into(conn, others)
            row = await store.graph(conn, request.survivor_id)
        if any(outcome.get(p) != request.survivor_id for p in others) or row is None:
            await context.abort(grpc.StatusCode.ABORTED, "the profiles changed meanwhile; the merge was refused")
        return _graph(row)

    async def Split(
        self,
        request: identity_pb2.SplitRequest,
        context: grpc.aio.ServicerContext[identity_pb2.SplitRequest, identity_pb2.SplitResponse],
    ) -> identity_pb2.SplitResponse:
        await self._refuse_nul(context, profile_id=request.profile_id)
        if not request.profile_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "profile_id is required")
        keys = [await self._key(i, context, f"identifiers[{n}]") for n, i in enumerate(request.identifiers)]
        async with self._engine.connect() as conn:
            live = await store.live_profiles(conn, [request.profile_id])
            known = await store.known(conn, [request.profile_id])
        if not live:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live profile {request.profile_id}")
        refusal = core.split_refusal(known[request.profile_id], keys)
        if refusal:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        command = self._command("split_requested", context)
        command.profile_id = request.profile_id
        command.split_requested.profile_id = request.profile_id
        for id_type, value in keys:
            command.split_requested.identifiers.add(type=id_type, value=value)
        command.split_requested.reason = request.reason
        await self._append_and_wait(command, context)
        new = eventlog.derived_id(command.id, "split")
        async with self._engine.connect() as conn:
            source, split_off = await store.graph(conn, request.profile_id), await store.graph(conn, new)
        if source is None or split_off is None:
            await context.abort(grpc.StatusCode.ABORTED, "the profile changed meanwhile; the split was refused")
        return identity_pb2.SplitResponse(source=_graph(source), split_off=_graph(split_off))

    def _command(self, kind: str, context: grpc.aio.ServicerContext[Any, Any]) -> event_pb2.Event:
        command = eventlog.new_event(kind, event_id=str(uuid.uuid4()), source="identity-operator")
        command.correlation_id = correlation_id()
        tracing.stamp(command, tracing.grpc_trace(context))
        return command

    async def _append_and_wait(
        self,
        command: event_pb2.Event,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Appends the request to the collected log, so that it is applied in order with the events
        (and again, identically, by a replay), then waits for the resolver to have applied it."""
        try:
            [stored] = await self._publisher.publish_events(
                [eventlog.Outgoing(self._topology.collected(command.type), command)]
            )
        except eventlog.LOG_UNAVAILABLE:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the event log is unavailable; nothing was changed")
        deadline = time.monotonic() + APPLY_TIMEOUT_SECONDS
        while True:
            async with self._engine.connect() as conn:
                if await store.applied_sequence(conn, handlers.SPEC.durable) >= stored.sequence:
                    return
            if time.monotonic() > deadline:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request is on the log (sequence {stored.sequence}) but not applied yet",
                )
            await asyncio.sleep(0.05)
