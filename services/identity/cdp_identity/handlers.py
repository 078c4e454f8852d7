"""Identity's log consumer: resolve each collected event, publish the resolution and merges."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_common.consumer import ConsumerSpec, Handler, PermanentError
from cdp_identity import core, store

SPEC = ConsumerSpec(durable="identity-resolve", area="collected")

_BUILT_IN = ("user_id", "anonymous_id", "email", "phone", "device_id")


def _identifiers(keys: Sequence[core.Key]) -> event_pb2.Identifiers:
    result = event_pb2.Identifiers()
    for id_type, value in keys:
        if id_type in _BUILT_IN:
            setattr(result, id_type, value)
        else:
            result.custom[id_type] = value
    return result


def make_handler(topology: eventlog.Topology) -> Handler:
    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        raw = {name: getattr(event.identifiers, name) for name in _BUILT_IN}
        keys = core.event_identifiers(raw, event.identifiers.custom)
        if not keys:
            raise PermanentError("event carries no usable identifier (all empty or blocked values)")
        owners = await store.owners(conn, keys)
        known = await store.facts(conn, sorted(set(owners.values())))
        decision = core.decide(keys, owners, known, eventlog.derived_id(event.id, "profile"))
        at = convert.to_datetime(event.occurred_at) or convert.to_datetime(event.received_at) or eventlog.now()
        await store.apply(conn, decision, event.id, at)
        await store.touch(conn, [k for k in keys if k not in decision.link and k not in decision.dropped], at)

        out: list[eventlog.Outgoing] = []
        if decision.merged:
            merged = eventlog.new_event("profiles_merged", event_id=eventlog.derived_id(event.id, "merged"),
                                        source="identity", cause=event)
            merged.profile_id = decision.profile_id
            merged.profiles_merged.survivor_id = decision.profile_id
            merged.profiles_merged.merged_ids.extend(decision.merged)
            merged.profiles_merged.reason = decision.reason
            for id_type, value in keys:
                if (id_type, value) not in decision.dropped:
                    merged.profiles_merged.linking_identifiers.add(type=id_type, value=value)
            out.append(eventlog.Outgoing(topology.keyed("identity", decision.profile_id, "merged"), merged))
        resolved = event_pb2.Event()
        resolved.CopyFrom(event)
        resolved.profile_id = decision.profile_id
        resolved.identifiers.CopyFrom(_identifiers([k for k in keys if k not in decision.dropped]))
        out.append(eventlog.Outgoing(topology.keyed("identity", decision.profile_id, "resolved"), resolved))
        return out

    return handle
