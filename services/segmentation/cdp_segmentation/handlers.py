"""Segmentation's log consumer and the evaluation shared with segment definition changes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_common.consumer import ConsumerSpec, Handler
from cdp_segmentation import core, store

SPEC = ConsumerSpec(durable="segmentation-evaluate", area="profile")


def facts(snapshot: event_pb2.ProfileSnapshot) -> dict[str, Any]:
    """What rules are evaluated on, as plain values."""
    last = convert.to_datetime(snapshot.last_order_at)
    return {
        "traits": convert.struct_to_dict(snapshot.traits),
        "order_count": snapshot.order_count,
        "revenue": snapshot.revenue,
        "event_count": snapshot.event_count,
        "last_order_at": last.isoformat() if last else None,
    }


def membership_event(
    topology: eventlog.Topology,
    cause_id: str,
    kind: str,
    segment: core.Segment,
    profile: event_pb2.ProfileSnapshot,
    cause: event_pb2.Event | None = None,
) -> eventlog.Outgoing:
    fact = f"segment_{kind}"
    event = eventlog.new_event(
        fact, event_id=eventlog.derived_id(cause_id, f"{fact}:{segment.segment_id}:{profile.profile_id}"),
        source="segmentation", cause=cause,
    )
    event.profile_id = profile.profile_id
    event.membership.segment_id = segment.segment_id
    event.membership.segment_name = segment.name
    event.membership.profile.CopyFrom(profile)
    return eventlog.Outgoing(topology.keyed("segment", profile.profile_id, kind), event)


def make_handler(topology: eventlog.Topology) -> Handler:
    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        if event.type != "profile_changed":
            return []
        change = event.profile_changed
        profile_id = change.profile.profile_id
        await store.lock(conn)
        segments = {s.segment_id: s for s in await store.segments(conn)}
        current = await store.memberships_of(conn, profile_id)
        out: list[eventlog.Outgoing] = []
        if change.merged_into:
            # A merged-away profile no longer exists on its own: it leaves every segment.
            await store.delete_profile(conn, profile_id)
            for segment_id in sorted(current):
                await store.exit_(conn, segment_id, [profile_id])
                if segment_id in segments:
                    out.append(membership_event(topology, event.id, "exited", segments[segment_id], change.profile, event))
            return out
        profile_facts = facts(change.profile)
        await store.upsert_profile(conn, profile_id, profile_facts, change.profile.SerializeToString())
        now = eventlog.now()
        for segment in segments.values():
            inside = core.matches(segment, profile_facts, now)
            if inside and segment.segment_id not in current:
                await store.enter(conn, segment.segment_id, [profile_id])
                out.append(membership_event(topology, event.id, "entered", segment, change.profile, event))
            elif not inside and segment.segment_id in current:
                await store.exit_(conn, segment.segment_id, [profile_id])
                out.append(membership_event(topology, event.id, "exited", segment, change.profile, event))
        return out

    return handle


async def evaluate_segment(
    conn: AsyncConnection, topology: eventlog.Topology, segment: core.Segment, cause_id: str, now: datetime
) -> list[eventlog.Outgoing]:
    """(Re-)evaluates one segment over every known profile, e.g. after its definition changed."""
    await store.lock(conn)
    current = await store.members(conn, segment.segment_id)
    out: list[eventlog.Outgoing] = []
    entered, exited = [], []
    for profile_id, profile_facts, raw in await store.profiles(conn):
        inside = core.matches(segment, profile_facts, now)
        if inside == (profile_id in current):
            continue
        snapshot = event_pb2.ProfileSnapshot()
        snapshot.ParseFromString(raw)
        (entered if inside else exited).append(profile_id)
        out.append(membership_event(topology, cause_id, "entered" if inside else "exited", segment, snapshot))
    await store.enter(conn, segment.segment_id, entered)
    await store.exit_(conn, segment.segment_id, exited)
    return out
