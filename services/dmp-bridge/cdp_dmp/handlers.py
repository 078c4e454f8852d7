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


async def on_profiles(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Sequence[eventlog.Outgoing]:
    """Hashed emails of changed profiles, walked in log order in memory: a hash goes to the profile
    that carried it last, and a merged-away profile's are forgotten (with its audience rows), those
    it carried before the merge in this batch too. Then one statement forgets, one sets owners."""
    owners: dict[str, str] = {}
    dropped: set[str] = set()
    forgotten: list[str] = []
    for event in events:
        if event.type != "profile_changed":
            continue
        change = event.profile_changed
        profile_id = change.profile.profile_id
        if change.merged_into:
            carried = [h for h, p in owners.items() if p == profile_id]
            for h in carried:
                del owners[h]
            dropped.update(carried)
            forgotten.append(profile_id)
            continue
        for identifier in change.profile.identifiers:
            if identifier.type == "email_sha256":
                owners[identifier.value] = profile_id
    # Forgotten first: a hash the batch gave to another profile after (or before) is set again.
    await store.forget(conn, forgotten, dropped)
    await store.set_owners(conn, owners)
    return []


async def on_profile(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
    return await on_profiles(conn, [event])


async def on_memberships(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Sequence[eventlog.Outgoing]:
    """Audience members: each (segment, profile) as its last entry or exit in the batch left it."""
    member: dict[tuple[str, str], bool] = {}
    for event in events:
        if event.type in ("segment_entered", "segment_exited"):
            member[(event.membership.segment_id, event.membership.profile.profile_id)] = event.type == "segment_entered"
    await store.set_members(conn, member)
    return []


async def on_membership(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
    return await on_memberships(conn, [event])
