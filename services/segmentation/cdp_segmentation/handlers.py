"""Segmentation's log consumer and the evaluation shared with segment definition changes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_common.consumer import BatchHandler, ConsumerSpec, Handler
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


def make_handlers(topology: eventlog.Topology) -> tuple[Handler, BatchHandler]:
    """The per-event handler, and the batch handler the consumer tries first: one path, which
    evaluates the batch's changes in log order in memory and writes the outcome in a few statements."""

    async def apply(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Sequence[eventlog.Outgoing]:
        changes = [e for e in events if e.type == "profile_changed"]
        if not changes:
            return []
        await store.lock(conn)
        segments = {s.segment_id: s for s in await store.segments(conn)}
        ids = sorted({e.profile_changed.profile.profile_id for e in changes})
        before = await store.memberships_of(conn, ids)
        current = {p: set(held) for p, held in before.items()}
        # Profile publishes a snapshot from two places (the projection, the scoring job), and an
        # older one can arrive after a newer one: it is ignored, as if it had come first.
        latest = await store.snapshot_times(conn, ids)
        # Each profile's facts as of its last change (None: merged away); pairs that left a segment.
        final: dict[str, tuple[dict[str, Any], bytes, datetime | None] | None] = {}
        left: set[tuple[str, str]] = set()
        out: list[eventlog.Outgoing] = []
        now = eventlog.now()
        for event in changes:
            change = event.profile_changed
            profile_id = change.profile.profile_id
            inside = current.setdefault(profile_id, set())
            if change.merged_into:
                # A merged-away profile no longer exists on its own: it leaves every segment.
                final[profile_id] = None
                latest.pop(profile_id, None)
                for segment_id in sorted(inside):
                    left.add((segment_id, profile_id))
                    if segment_id in segments:
                        out.append(membership_event(topology, event.id, "exited", segments[segment_id],
                                                    change.profile, event))
                inside.clear()
                continue
            built = convert.to_datetime(change.profile.updated_at)
            if built is not None and profile_id in latest and built < latest[profile_id]:
                continue
            if built is not None:
                latest[profile_id] = built
            profile_facts = facts(change.profile)
            final[profile_id] = (profile_facts, change.profile.SerializeToString(), built)
            for segment in segments.values():
                matches = core.matches(segment, profile_facts, now)
                if matches and segment.segment_id not in inside:
                    inside.add(segment.segment_id)
                    out.append(membership_event(topology, event.id, "entered", segment, change.profile, event))
                elif not matches and segment.segment_id in inside:
                    inside.discard(segment.segment_id)
                    left.add((segment.segment_id, profile_id))
                    out.append(membership_event(topology, event.id, "exited", segment, change.profile, event))
        await store.save_profiles(conn, {p: f for p, f in final.items() if f is not None})
        await store.delete_profiles(conn, [p for p, f in final.items() if f is None])
        # A pair that left and came back within the batch is deleted and inserted again (entered anew).
        await store.exit_pairs(conn, sorted(left))
        await store.enter_pairs(conn, sorted(
            (segment_id, p) for p, inside in current.items() for segment_id in inside
            if segment_id not in before.get(p, ()) or (segment_id, p) in left
        ))
        return out

    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        return await apply(conn, [event])

    return handle, apply


def make_handler(topology: eventlog.Topology) -> Handler:
    """The per-event handler (tests drive it directly)."""
    return make_handlers(topology)[0]


async def evaluate_segment(
    conn: AsyncConnection, topology: eventlog.Topology, segment: core.Segment, cause_id: str, now: datetime
) -> list[eventlog.Outgoing]:
    """(Re-)evaluates one segment over every known profile, e.g. after its definition changed."""
    await store.lock(conn)
    current = await store.members(conn, segment.segment_id)
    out: list[eventlog.Outgoing] = []
    entered: list[str] = []
    exited: list[str] = []
    for profile_id, profile_facts, raw in await store.profiles(conn):
        inside = core.matches(segment, profile_facts, now)
        if inside == (profile_id in current):
            continue
        snapshot = event_pb2.ProfileSnapshot()
        snapshot.ParseFromString(raw)
        (entered if inside else exited).append(profile_id)
        out.append(membership_event(topology, cause_id, "entered" if inside else "exited", segment, snapshot))
    await store.enter_pairs(conn, [(segment.segment_id, p) for p in entered])
    await store.exit_pairs(conn, [(segment.segment_id, p) for p in exited])
    return out
