"""Profile's log consumer: resolved events and merges from identity become the read model."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_common.consumer import ConsumerSpec, Handler, PermanentError
from cdp_profile import core, store
from cdp_profile.messages import snapshot

SPEC = ConsumerSpec(durable="profile-project", area="identity")

_BUILT_IN = ("user_id", "anonymous_id", "email", "phone", "device_id")


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
        if not await store.record_event(
            conn, event_id=event.id, profile_id=event.profile_id, type_=event.type, name=event.name,
            occurred_at=at, properties=properties,
        ):
            return []
        previous = await store.load(conn, event.profile_id)
        ids = [(n, getattr(event.identifiers, n)) for n in _BUILT_IN if getattr(event.identifiers, n)]
        ids += list(event.identifiers.custom.items())
        state, fields = core.apply_event(
            previous or core.ProfileState(event.profile_id),
            name=event.name,
            properties=properties,
            traits=convert.struct_to_dict(event.traits),
            identifiers=ids,
            at=at,
        )
        await store.save(conn, state, previous)
        return [changed(event, state, fields or ["event_count"])]

    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        if event.type == "profiles_merged":
            return await on_merged(conn, event)
        if not event.profile_id:
            raise PermanentError(f"{event.type} event {event.id} reached profile without a profile_id")
        return await on_resolved(conn, event)

    return handle
