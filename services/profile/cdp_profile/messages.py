"""Profile state as the ProfileSnapshot message served over gRPC and carried on the log."""

from __future__ import annotations

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_profile.core import ProfileState


def snapshot(state: ProfileState) -> event_pb2.ProfileSnapshot:
    message = event_pb2.ProfileSnapshot(
        profile_id=state.profile_id,
        order_count=state.order_count,
        revenue=state.revenue,
        event_count=state.event_count,
        merged_profile_ids=list(state.merged_ids),
    )
    message.traits.CopyFrom(convert.dict_to_struct(dict(state.traits)))
    for id_type, value in sorted(state.identifiers):
        message.identifiers.add(type=id_type, value=value)
    convert.set_timestamp(message.last_order_at, state.last_order_at)
    convert.set_timestamp(message.first_seen_at, state.first_seen_at)
    convert.set_timestamp(message.updated_at, eventlog.now())
    return message
