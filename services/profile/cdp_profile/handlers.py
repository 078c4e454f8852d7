"""Profile's log consumer: resolved events and merges from identity become the read model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog, identifiers
from cdp_common.consumer import ConsumerSpec, Handler, PermanentError
from cdp_profile import core, store
from cdp_profile.messages import snapshot

SPEC = ConsumerSpec(durable="profile-project", area="identity")



def make_handler(topology: eventlog.Topology) -> Handler:
    def changed(cause: event_pb2.Event, state: core.ProfileState, fields: Sequence[str]) -> eventlog.Outgoing:
        event = eventlog.new_event(
            "profile_changed", event_id=eventlog.derived_id(cause.id, f"changed:{state.profile_id}"),
            source="profile", cause=cause,
        )
        event.profile_id = state.profile_id
        event.profile_changed.profile.CopyFrom(snapshot(state))
        event.profile_changed.changed_fields.extend(sorted(set(fields)))
        return eventlog.Outgoing(topology.keyed("profile", state.profile_id, "changed"), event)

    def retired(cause: event_pb2.Event, profile_id: str, survivor_id: str) -> eventlog.Outgoing:
        event = eventlog.new_event(
            "profile_changed", event_id=eventlog.derived_id(cause.id, f"changed:{profile_id}"),
            source="profile", cause=cause,
        )
        event.profile_id = profile_id
        event.profile_changed.profile.profile_id = profile_id
        event.profile_changed.merged_into = survivor_id
        event.profile_changed.changed_fields.append("merged_into")
        return eventlog.Outgoing(topology.keyed("profile", profile_id, "changed"), event)

    async def on_merged(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        detail = event.profiles_merged
        survivor = await store.load(conn, detail.survivor_id) or core.ProfileState(detail.survivor_id)
        others = [s for pid in detail.merged_ids if (s := await store.load(conn, pid)) is not None]
        state = core.merge(survivor, others)
        await store.save(conn, state, survivor)
        await store.retire(conn, list(detail.merged_ids), detail.survivor_id)
        fields = ["merged_ids", "identifiers", "order_count", "revenue", "traits"]
        return [changed(event, state, fields), *(retired(event, pid, detail.survivor_id) for pid in detail.merged_ids)]

    async def on_resolved(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        at = convert.to_datetime(event.occurred_at) or eventlog.now()
        properties = convert.struct_to_dict(event.properties)
        ids = [(n, getattr(event.identifiers, n)) for n in identifiers.TYPES if getattr(event.identifiers, n)]
        ids += list(event.identifiers.custom.items())
        traits = convert.struct_to_dict(event.traits)
        if not await store.record_event(
            conn, event_id=event.id, profile_id=event.profile_id, type_=event.type, name=event.name,
            occurred_at=at, properties=properties, traits=traits, identifiers=ids,
        ):
            return []
        previous = await store.load(conn, event.profile_id)
        state, fields = core.apply_event(
            previous or core.ProfileState(event.profile_id),
            name=event.name,
            properties=properties,
            traits=traits,
            identifiers=ids,
            at=at,
        )
        await store.save(conn, state, previous)
        return [changed(event, state, fields or ["event_count"])]

    async def recompute(conn: AsyncConnection, profile_id: str, merged_ids: Sequence[str]) -> core.ProfileState:
        """A profile folded again from its own timeline (after a split moved events away)."""
        state = core.ProfileState(profile_id, merged_ids=tuple(merged_ids))
        for row in await store.timeline(conn, profile_id):
            state, _ = core.apply_event(
                state, name=row.name, properties=row.properties, traits=row.traits, identifiers=(),
                at=row.occurred_at,
            )
        return replace(state, identifiers=await store.identifiers_of(conn, profile_id))

    async def on_split(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        detail = event.profile_split
        source = await store.load(conn, detail.source_profile_id)
        keys = [(i.type, i.value) for i in detail.identifiers]
        await store.move_split(conn, detail.source_profile_id, detail.new_profile_id, keys)
        out = []
        for profile_id, merged in (
            (detail.source_profile_id, source.merged_ids if source else ()),
            (detail.new_profile_id, ()),
        ):
            state = await recompute(conn, profile_id, merged)
            await store.save(conn, state, state)
            out.append(changed(event, state, ["identifiers", "order_count", "revenue", "traits", "event_count"]))
        return out

    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        if event.type == "profiles_merged":
            return await on_merged(conn, event)
        if event.type == "profile_split":
            return await on_split(conn, event)
        if not event.profile_id:
            raise PermanentError(f"{event.type} event {event.id} reached profile without a profile_id")
        return await on_resolved(conn, event)

    return handle
