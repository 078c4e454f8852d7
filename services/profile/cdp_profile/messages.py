"""Profile state as the ProfileSnapshot message served over gRPC and carried on the log."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_profile.core import ProfileState, Score


def _set(target: Timestamp, moment: datetime | None) -> None:
    if moment is not None:
        convert.set_timestamp(target, moment)


def _time(iso: str) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def _score(target: event_pb2.Score, score: Score) -> None:
    target.label = score.label
    target.value = score.value
    target.reasons.extend(score.reasons)


def snapshot(state: ProfileState, into: event_pb2.ProfileSnapshot | None = None) -> event_pb2.ProfileSnapshot:
    """The state as a message (filled into `into` when given, e.g. an event's payload)."""
    message = event_pb2.ProfileSnapshot() if into is None else into
    message.profile_id = state.profile_id
    message.order_count = state.order_count
    message.revenue = state.revenue
    message.event_count = state.event_count
    message.merged_profile_ids.extend(state.merged_ids)
    message.average_order_value = state.average_order_value or 0.0
    message.average_order_interval_days = state.average_interval_days or 0.0
    message.refund_count = state.refund_count
    message.refunded_amount = state.refunded
    message.order_categories.update(state.categories)
    message.open_tickets = len(state.open_tickets)
    convert.set_struct(message.traits, state.traits)
    for id_type, value in sorted(state.identifiers):
        message.identifiers.add(type=id_type, value=value)
    _set(message.last_order_at, state.last_order_at)
    _set(message.first_order_at, state.first_order_at)
    _set(message.first_seen_at, state.first_seen_at)
    _set(message.last_seen_at, state.last_seen_at)
    _set(message.updated_at, eventlog.now())

    email = message.email
    email.sends, email.deliveries, email.opens = state.email_sends, state.email_deliveries, state.email_opens
    email.clicks, email.bounces = state.email_clicks, state.email_bounces
    _set(email.last_open_at, state.last_open_at)
    _set(email.last_click_at, state.last_click_at)
    if state.email_open_rate is not None:
        email.open_rate = state.email_open_rate
    if state.email_click_rate is not None:
        email.click_rate = state.email_click_rate

    message.loyalty.points = state.loyalty_points
    if state.loyalty_tier is not None:
        message.loyalty.tier = str(state.loyalty_tier[1])
        _set(message.loyalty.tier_since, _time(state.loyalty_tier[0]))
    for ticket_id, (at, status) in sorted(state.tickets.items()):
        ticket = message.tickets.add(ticket_id=ticket_id, status=str(status))
        _set(ticket.updated_at, _time(at))
    for key, (at, granted) in sorted(state.consents.items()):
        channel, _, purpose = key.partition(".")
        consent = message.consents.add(channel=channel, purpose=purpose, granted=bool(granted))
        _set(consent.updated_at, _time(at))

    scores = state.scores
    if scores is not None:
        _score(message.lifecycle, scores.lifecycle)
        message.purchase_frequency_falling = scores.frequency_falling
        if scores.rfm is not None:
            rfm = scores.rfm
            message.rfm.recency, message.rfm.frequency, message.rfm.monetary = rfm.recency, rfm.frequency, rfm.monetary
            message.rfm.cell = rfm.cell
            message.rfm.reasons.extend(rfm.reasons)
        if scores.churn is not None:
            _score(message.churn_risk, scores.churn)
        if scores.offer is not None:
            _score(message.next_best_offer, scores.offer)
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
    snapshot(state, into=event.profile_changed.profile)
    event.profile_changed.changed_fields.extend(fields)
    return eventlog.Outgoing(topology.keyed("profile", state.profile_id, "changed"), event)
