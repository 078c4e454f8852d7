"""Profile state as the ProfileSnapshot message served over gRPC and carried on the log."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_profile.core import ProfileState, Score


_time = convert.timestamp_fields


def _iso(iso: str) -> dict[str, int]:
    return _time(datetime.fromisoformat(iso))


def _score(score: Score) -> dict[str, Any]:
    return {"label": score.label, "value": score.value, "reasons": score.reasons}


def snapshot(state: ProfileState) -> event_pb2.ProfileSnapshot:
    """The state as a message. Built from keyword arguments in one constructor call (nested
    messages as dicts): setting its fields one by one costs half as much again."""
    fields: dict[str, Any] = {
        "profile_id": state.profile_id, "order_count": state.order_count, "revenue": state.revenue,
        "event_count": state.event_count, "merged_profile_ids": state.merged_ids,
        "average_order_value": state.average_order_value or 0.0,
        "average_order_interval_days": state.average_interval_days or 0.0,
        "refund_count": state.refund_count, "refunded_amount": state.refunded,
        "order_categories": state.categories, "open_tickets": len(state.open_tickets),
        "identifiers": [{"type": t, "value": v} for t, v in sorted(state.identifiers)],
        "updated_at": _time(eventlog.now()),
    }
    for name in ("last_order_at", "first_order_at", "first_seen_at", "last_seen_at"):
        moment = getattr(state, name)
        if moment is not None:
            fields[name] = _time(moment)

    email: dict[str, Any] = {
        "sends": state.email_sends, "deliveries": state.email_deliveries, "opens": state.email_opens,
        "clicks": state.email_clicks, "bounces": state.email_bounces,
    }
    if state.last_open_at is not None:
        email["last_open_at"] = _time(state.last_open_at)
    if state.last_click_at is not None:
        email["last_click_at"] = _time(state.last_click_at)
    if (open_rate := state.email_open_rate) is not None:
        email["open_rate"] = open_rate
    if (click_rate := state.email_click_rate) is not None:
        email["click_rate"] = click_rate
    fields["email"] = email

    loyalty: dict[str, Any] = {"points": state.loyalty_points}
    if state.loyalty_tier is not None:
        loyalty["tier"] = str(state.loyalty_tier[1])
        loyalty["tier_since"] = _iso(state.loyalty_tier[0])
    fields["loyalty"] = loyalty
    if state.tickets:
        fields["tickets"] = [{"ticket_id": ticket_id, "status": str(status), "updated_at": _iso(at)}
                             for ticket_id, (at, status) in sorted(state.tickets.items())]
    if state.consents:
        fields["consents"] = [
            {"channel": channel, "purpose": purpose, "granted": bool(granted), "updated_at": _iso(at)}
            for key, (at, granted) in sorted(state.consents.items())
            for channel, _, purpose in [key.partition(".")]
        ]

    scores = state.scores
    if scores is not None:
        fields["lifecycle"] = _score(scores.lifecycle)
        fields["purchase_frequency_falling"] = scores.frequency_falling
        if (rfm := scores.rfm) is not None:
            fields["rfm"] = {"recency": rfm.recency, "frequency": rfm.frequency, "monetary": rfm.monetary,
                             "cell": rfm.cell, "reasons": rfm.reasons}
        if scores.churn is not None:
            fields["churn_risk"] = _score(scores.churn)
        if scores.offer is not None:
            fields["next_best_offer"] = _score(scores.offer)
    message = event_pb2.ProfileSnapshot(**fields)
    convert.set_struct(message.traits, state.traits)
    return message


def changed_event(
    topology: eventlog.Topology, state: ProfileState, fields: Sequence[str], *, cause_id: str,
    cause: event_pb2.Event | None = None,
) -> eventlog.Outgoing:
    """profile_changed with the whole snapshot and what changed; its id derives from the cause."""
    event = eventlog.new_event(
        "profile_changed", event_id=eventlog.derived_id(cause_id, f"changed:{state.profile_id}"),
        source="profile", cause=cause,
    )
    event.profile_id = state.profile_id
    event.profile_changed.profile.MergeFrom(snapshot(state))
    event.profile_changed.changed_fields.extend(fields)
    return eventlog.Outgoing(topology.keyed("profile", state.profile_id, "changed"), event)
