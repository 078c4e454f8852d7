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


def _iso(ts: Any) -> str | None:
    moment = convert.to_datetime(ts)
    return moment.isoformat() if moment else None


def facts(snapshot: event_pb2.ProfileSnapshot) -> dict[str, Any]:
    """What rules are evaluated on, as plain values (None where a profile has no such value).

    The names are those of profile's SearchProfiles fields (docs/profile.md).
    """
    ordered = snapshot.order_count > 0
    email, rfm = snapshot.email, snapshot.rfm
    has_rfm, has_churn = snapshot.HasField("rfm"), snapshot.HasField("churn_risk")
    aov = snapshot.average_order_value if ordered else None
    result = {
        "traits": convert.struct_to_dict(snapshot.traits),
        "order_count": snapshot.order_count,
        "revenue": snapshot.revenue,
        "event_count": snapshot.event_count,
        "last_order_at": _iso(snapshot.last_order_at),
        "first_order_at": _iso(snapshot.first_order_at),
        "average_order_value": aov,
        "aov": aov,
        "average_order_interval_days": snapshot.average_order_interval_days if snapshot.order_count > 1 else None,
        "purchase_frequency_falling": snapshot.purchase_frequency_falling,
        "refund_count": snapshot.refund_count,
        "refunded_amount": snapshot.refunded_amount,
        "email_open_rate": email.open_rate if email.HasField("open_rate") else None,
        "email_click_rate": email.click_rate if email.HasField("click_rate") else None,
        "last_email_open_at": _iso(email.last_open_at),
        "last_email_click_at": _iso(email.last_click_at),
        "loyalty_tier": snapshot.loyalty.tier or None,
        "loyalty_points": snapshot.loyalty.points,
        "open_tickets": snapshot.open_tickets,
        "lifecycle_stage": snapshot.lifecycle.label or None,
        "rfm_recency": rfm.recency if has_rfm else None,
        "rfm_frequency": rfm.frequency if has_rfm else None,
        "rfm_monetary": rfm.monetary if has_rfm else None,
        "rfm_cell": rfm.cell if has_rfm else None,
        "churn_risk": snapshot.churn_risk.value if has_churn else None,
        "churn_label": snapshot.churn_risk.label if has_churn else None,
        "next_best_offer": snapshot.next_best_offer.label if snapshot.HasField("next_best_offer") else None,
        "first_seen_at": _iso(snapshot.first_seen_at),
        "last_seen_at": _iso(snapshot.last_seen_at),
    }
    for consent in snapshot.consents:
        result[f"consents.{consent.channel}.{consent.purpose}"] = consent.granted
    return result


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
