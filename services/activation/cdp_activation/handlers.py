"""Activation's log consumer: a segment entry queues one send per campaign on that segment."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_common.consumer import ConsumerSpec, Handler
from cdp_activation import core, store

SPEC = ConsumerSpec(durable="activation-trigger", area="segment")

log = structlog.get_logger("cdp.activation")


def make_handler(on_queued: Callable[[], None]) -> Handler:
    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        if event.type != "segment_entered":
            return []
        membership = event.membership
        profile: dict[str, Any] = {
            "profile_id": membership.profile.profile_id,
            "traits": convert.struct_to_dict(membership.profile.traits),
            "order_count": membership.profile.order_count,
            "revenue": membership.profile.revenue,
        }
        identifiers = {i.type: i.value for i in membership.profile.identifiers}
        address = core.recipient(profile["traits"], identifiers)
        for campaign in await store.campaigns(conn, membership.segment_id):
            # One campaign whose template fails for this profile is recorded as such; the other
            # campaigns on the segment still send.
            subject, body, error = "", "", None
            try:
                subject, body = core.render(campaign, profile)
            except core.RenderFailed as failed:
                error = str(failed)
            status = "skipped_no_address" if not address else "skipped_render_failed" if error else "pending"
            # The key is (campaign, triggering entry): a redelivered or replayed entry queues nothing new.
            queued = await store.queue(
                conn,
                send_id=eventlog.derived_id(event.id, f"send:{campaign.campaign_id}"),
                campaign_id=campaign.campaign_id,
                profile_id=event.profile_id,
                trigger_event_id=event.id,
                segment_id=membership.segment_id,
                recipient=address or "",
                subject=subject,
                body=body,
                status=status,
                error=error,
            )
            if queued and status == "pending":
                on_queued()
            elif status != "pending":
                log.info("send_skipped", status=status, error=error, campaign_id=campaign.campaign_id)
        return []

    return handle
