"""Activation's log consumer: a segment entry queues one send per campaign on that segment.

A fetch batch is applied with two statements: the campaigns of the segments it enters are read
once, and every send it queues goes in with one insert (its key drops a redelivered entry's)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_common.consumer import BatchHandler, ConsumerSpec, Handler
from cdp_activation import core, store

SPEC = ConsumerSpec(durable="activation-trigger", area="segment")

log = structlog.get_logger("cdp.activation")


def sends(event: event_pb2.Event, campaigns: Sequence[core.Campaign]) -> list[store.Queued]:
    """What a segment entry queues: one send per campaign, or the reason it is skipped (a campaign
    whose template fails for this profile is recorded as such; the others still send)."""
    membership = event.membership
    profile: dict[str, Any] = {
        "profile_id": membership.profile.profile_id,
        "traits": convert.struct_to_dict(membership.profile.traits),
        "order_count": membership.profile.order_count,
        "revenue": membership.profile.revenue,
    }
    address = core.recipient(profile["traits"], {i.type: i.value for i in membership.profile.identifiers})
    out = []
    for campaign in campaigns:
        subject, body, error = "", "", None
        try:
            subject, body = core.render(campaign, profile)
        except core.RenderFailed as failed:
            error = str(failed)
        out.append(store.Queued(
            # The key is (campaign, triggering entry): a redelivered or replayed entry queues nothing new.
            send_id=eventlog.derived_id(event.id, f"send:{campaign.campaign_id}"),
            campaign_id=campaign.campaign_id, profile_id=event.profile_id, trigger_event_id=event.id,
            segment_id=membership.segment_id, recipient=address or "", subject=subject, body=body,
            status="skipped_no_address" if not address else "skipped_render_failed" if error else "pending",
            error=error,
        ))
    return out


def make_handlers(on_queued: Callable[[], None]) -> tuple[Handler, BatchHandler]:
    """The per-event handler and the batch handler (`on_queued`: a send is waiting)."""

    async def handle_batch(conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Sequence[eventlog.Outgoing]:
        entries = [e for e in events if e.type == "segment_entered"]
        if not entries:
            return []
        campaigns: Mapping[str, list[core.Campaign]] = await store.campaigns_on(
            conn, (e.membership.segment_id for e in entries))
        queue = [send for e in entries for send in sends(e, campaigns.get(e.membership.segment_id, ()))]
        queued = await store.queue(conn, queue)
        if any(s.status == "pending" and s.send_id in queued for s in queue):
            on_queued()
        for s in queue:
            if s.status != "pending" and s.send_id in queued:
                log.info("send_skipped", status=s.status, error=s.error, campaign_id=s.campaign_id)
        return []

    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        return await handle_batch(conn, [event])

    return handle, handle_batch

