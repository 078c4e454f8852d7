"""gRPC edge of activation."""

from __future__ import annotations


import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp.activation.v1 import activation_pb2, activation_pb2_grpc
from cdp_activation import core, store


def _message(c: core.Campaign, sent: int = 0) -> activation_pb2.Campaign:
    return activation_pb2.Campaign(
        id=c.campaign_id, segment_id=c.segment_id, channel=c.channel, from_address=c.from_address,
        subject_template=c.subject_template, body_template=c.body_template, sent_count=sent,
    )


class ActivationServicer(activation_pb2_grpc.ActivationServiceServicer):
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def PutCampaign(
        self,
        request: activation_pb2.Campaign,
        context: grpc.aio.ServicerContext[activation_pb2.Campaign, activation_pb2.Campaign],
    ) -> activation_pb2.Campaign:
        try:
            campaign = core.check_campaign(
                core.Campaign(
                    campaign_id=request.id, segment_id=request.segment_id, channel=request.channel,
                    from_address=request.from_address, subject_template=request.subject_template,
                    body_template=request.body_template,
                )
            )
        except core.InvalidCampaign as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        async with self._engine.begin() as conn:
            await store.put_campaign(conn, campaign)
        return _message(campaign)

    async def ListCampaigns(
        self,
        request: activation_pb2.ListCampaignsRequest,
        context: grpc.aio.ServicerContext[activation_pb2.ListCampaignsRequest, activation_pb2.ListCampaignsResponse],
    ) -> activation_pb2.ListCampaignsResponse:
        async with self._engine.connect() as conn:
            campaigns = await store.campaigns(conn)
            sent = await store.sent_counts(conn)
        return activation_pb2.ListCampaignsResponse(
            campaigns=[_message(c, sent.get(c.campaign_id, 0)) for c in campaigns]
        )
