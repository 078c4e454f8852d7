"""The bridge's own projections: hashed emails per profile, and segment members."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import eventlog
from cdp_common.consumer import ConsumerSpec
from cdp_dmp import store

IDENTITIES = ConsumerSpec(durable="dmp-identities", area="profile")
AUDIENCES = ConsumerSpec(durable="dmp-audiences", area="segment")


async def on_profile(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
    if event.type != "profile_changed":
        return []
    change = event.profile_changed
    if change.merged_into:
        await store.forget_profile(conn, change.profile.profile_id)
        return []
    hashes = [i.value for i in change.profile.identifiers if i.type == "email_sha256"]
    if hashes:
        await store.set_hashes(conn, change.profile.profile_id, hashes)
    return []


async def on_membership(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
    if event.type in ("segment_entered", "segment_exited"):
        await store.set_member(
            conn, event.membership.segment_id, event.membership.profile.profile_id, event.type == "segment_entered"
        )
    return []
