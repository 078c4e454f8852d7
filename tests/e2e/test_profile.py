"""The single customer view end to end: events in through ingest, the profile, its timeline and
search out of profile's gRPC API, scores kept current by the scoring job, replay."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest

from cdp.ingest.v1 import ingest_pb2
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_identity.main import DEFINITION as IDENTITY
from cdp_ingest.main import DEFINITION as INGEST
from cdp_profile.main import DEFINITION as PROFILE
from cdp_segmentation.main import DEFINITION as SEGMENTATION

pytestmark = pytest.mark.timeout(180)

CORE = (INGEST, IDENTITY, PROFILE)


def ago(days: float) -> Any:
    return eventlog.timestamp(eventlog.now() - timedelta(days=days))


def track(event_id: str, user: str, name: str, days: float, consent: dict[str, bool] | None = None,
          **properties: Any) -> ingest_pb2.BatchItem:
    return ingest_pb2.BatchItem(track=ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(user_id=user), event=name,
        properties=convert.dict_to_struct(properties), timestamp=ago(days), consent=consent or {}, source="shop",
    ))


def identify(event_id: str, user: str, days: float, traits: dict[str, Any],
             consent: dict[str, bool] | None = None, **ids: str) -> ingest_pb2.BatchItem:
    return ingest_pb2.BatchItem(identify=ingest_pb2.IdentifyRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(user_id=user, **ids),
        traits=convert.dict_to_struct(traits), timestamp=ago(days), consent=consent or {}, source="crm",
    ))


def order(event_id: str, user: str, days: float, revenue: float, *categories: str) -> ingest_pb2.BatchItem:
    products = [{"product_id": f"{event_id}-{i}", "category": c, "quantity": 1} for i, c in enumerate(categories)]
    return track(event_id, user, "Order Completed", days, order_id=event_id, revenue=revenue, products=products)


async def send(suite: Any, *items: ingest_pb2.BatchItem) -> None:
    response = await suite.ingest.Batch(ingest_pb2.BatchRequest(items=items))
    assert [r.error for r in response.results if r.code] == []


async def profile(suite: Any, user: str) -> event_pb2.ProfileSnapshot:
    return await suite.profile.GetProfile(
        profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="user_id", value=user)))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


# Five customers and a visitor. Ada buys every 10 days, most recently and most; Cy bought every
# 10 days but stopped 80 days ago; Bob bought once long ago.
STORY = [
    order("a1", "ada", 31, 100.0, "shoes"), order("a2", "ada", 21, 100.0, "socks"),
    order("a3", "ada", 11, 100.0, "shoes"), order("a4", "ada", 1, 100.0, "shoes", "socks"),
    track("a5", "ada", "Order Refunded", 0.5, order_id="a4", total=40.0),
    identify("a6", "ada", 2, {"plan": "pro", "first_name": "Ada"}, consent={"email.marketing": True},
             email="ada@example.com"),
    track("a7", "ada", "Consent Updated", 1.5, channel="email", purpose="marketing", granted=False),
    track("a8", "ada", "Consent Updated", 6, channel="sms", purpose="transactional", granted=True),
    track("a9", "ada", "Loyalty Tier Changed", 3, tier="gold"),
    track("a10", "ada", "Loyalty Points Earned", 3, points=100, balance=300),
    track("a11", "ada", "Ticket Resolved", 2, ticket_id="t-1"),
    track("a12", "ada", "Ticket Opened", 1, ticket_id="t-2", channel="chat"),
    *(track(f"a2{i}", "ada", "Email Delivered", 9 - i, campaign_id="spring") for i in range(4)),
    track("a30", "ada", "Email Opened", 6, campaign_id="spring"),
    track("a31", "ada", "Email Opened", 5, campaign_id="spring"),
    track("a32", "ada", "Email Link Clicked", 5, campaign_id="spring", link_url="https://shop.example/s"),
    order("b1", "bob", 200, 20.0, "hats"),
    order("c1", "cy", 100, 30.0, "hats"), order("c2", "cy", 90, 30.0, "hats"), order("c3", "cy", 80, 30.0),
    order("d1", "dee", 60, 50.0, "hats"),
    order("e1", "eve", 40, 60.0, "scarves"), order("e2", "eve", 20, 60.0),
    track("v1", "vic", "Product Viewed", 3, product_id="p-1", category="hats"),
]
# Older facts arriving after newer ones: none of them may win.
LATE = [
    identify("l1", "ada", 10, {"plan": "free", "city": "London"}),
    track("l2", "ada", "Consent Updated", 20, channel="email", purpose="marketing", granted=True),
    track("l3", "ada", "Loyalty Tier Changed", 15, tier="silver"),
    track("l4", "ada", "Ticket Opened", 4, ticket_id="t-1"),
    track("l5", "ada", "Loyalty Points Earned", 8, points=50, balance=150),
]


async def load_story(suite: Any) -> None:
    await send(suite, *STORY)
    await suite.settle()
    await send(suite, *LATE)
    await suite.settle()

    async def scored() -> bool:
        # The scoring job refits the models on the whole base and rescores.
        return (await profile(suite, "ada")).rfm.cell == "champions"

    await eventually(scored)


async def test_the_profile_shows_aggregates_consents_loyalty_tickets_and_explained_scores(
    start_suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDP_PROFILE_SCORES_INTERVAL_SECONDS", "0.5")
    async with start_suite(CORE) as suite:
        await load_story(suite)
        ada = await profile(suite, "ada")

        assert convert.struct_to_dict(ada.traits) == {"plan": "pro", "first_name": "Ada", "city": "London"}
        assert (ada.order_count, ada.revenue, ada.average_order_value) == (4, 400.0, 100.0)
        assert (ada.refund_count, ada.refunded_amount) == (1, 40.0)
        assert round(ada.average_order_interval_days) == 10
        assert ada.last_order_at.ToSeconds() - ada.first_order_at.ToSeconds() == pytest.approx(30 * 86400, abs=5)
        assert dict(ada.order_categories) == {"shoes": 3, "socks": 2}
        assert {(c.channel, c.purpose): c.granted for c in ada.consents} == {
            ("email", "marketing"): False, ("sms", "transactional"): True}
        assert (ada.loyalty.tier, ada.loyalty.points) == ("gold", 300)
        assert {t.ticket_id: t.status for t in ada.tickets} == {"t-1": "resolved", "t-2": "open"}
        assert ada.open_tickets == 1
        email = ada.email
        assert (email.deliveries, email.opens, email.clicks) == (4, 2, 1)
        assert (email.open_rate, email.click_rate) == (0.5, 0.25)
        assert email.last_open_at.ToSeconds() > 0 and email.last_click_at.ToSeconds() > 0

        assert (ada.rfm.recency, ada.rfm.frequency, ada.rfm.monetary, ada.rfm.cell) == (5, 5, 5, "champions")
        assert any("4 orders: F=5" in r for r in ada.rfm.reasons)
        assert ada.lifecycle.label == "active" and ada.lifecycle.reasons
        assert not ada.purchase_frequency_falling
        assert ada.churn_risk.label in ("low", "medium", "high") and ada.churn_risk.reasons
        assert ada.next_best_offer.label == "hats"
        assert "hats is bought by" in ada.next_best_offer.reasons[0]

        cy = await profile(suite, "cy")
        assert cy.lifecycle.label == "lapsed" and cy.purchase_frequency_falling
        assert cy.churn_risk.value > ada.churn_risk.value
        assert (await profile(suite, "bob")).rfm.cell in ("lost", "hibernating")
        vic = await profile(suite, "vic")
        assert vic.lifecycle.label == "prospect"
        assert not vic.HasField("rfm") and not vic.HasField("churn_risk")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await profile(suite, "nobody")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "user_id=nobody" in caught.value.details()


async def test_timeline_pages_newest_first_and_search_filters_on_traits_and_scores(
    start_suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDP_PROFILE_SCORES_INTERVAL_SECONDS", "0.5")
    async with start_suite(CORE) as suite:
        await load_story(suite)
        ada = await profile(suite, "ada")

        seen: list[profile_pb2.TimelineEvent] = []
        token = ""
        while True:
            page = await suite.profile.GetTimeline(profile_pb2.GetTimelineRequest(
                identifier=event_pb2.Identifier(type="email", value="ADA@example.com"), page_size=7, page_token=token))
            assert page.profile_id == ada.profile_id and len(page.events) <= 7
            seen.extend(page.events)
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == ada.event_count == len({e.event_id for e in seen})
        times = [e.occurred_at.ToNanoseconds() for e in seen]
        assert times == sorted(times, reverse=True)
        assert seen[0].event_id == "a5"
        assert {e.source for e in seen} == {"shop", "crm"}
        orders = await suite.profile.GetTimeline(profile_pb2.GetTimelineRequest(
            profile_id=ada.profile_id, name="Order Completed"))
        assert [e.event_id for e in orders.events] == ["a4", "a3", "a2", "a1"]
        assert convert.struct_to_dict(orders.events[0].properties)["revenue"] == 100.0
        identifies = await suite.profile.GetTimeline(profile_pb2.GetTimelineRequest(
            profile_id=ada.profile_id, type="identify"))
        assert [e.event_id for e in identifies.events] == ["a6", "l1"]
        assert dict(identifies.events[0].consent) == {"email.marketing": True}
        for bad, field in ((profile_pb2.GetTimelineRequest(profile_id=ada.profile_id, page_size=501), "page_size"),
                           (profile_pb2.GetTimelineRequest(profile_id=ada.profile_id, page_token="x!"), "page_token")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await suite.profile.GetTimeline(bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith(field + ":")

        async def users(*filters: tuple[str, str, str], page_size: int = 0) -> list[str]:
            found, token = [], ""
            while True:
                page = await suite.profile.SearchProfiles(profile_pb2.SearchProfilesRequest(
                    filters=[profile_pb2.Filter(field=f, op=o, value=v) for f, o, v in filters],
                    page_size=page_size, page_token=token))
                found += [next(i.value for i in p.identifiers if i.type == "user_id") for p in page.profiles]
                token = page.next_page_token
                if not token:
                    return sorted(found)

        assert await users(("lifecycle_stage", "eq", '"lapsed"')) == ["bob", "cy"]
        assert await users(("rfm_cell", "eq", '"champions"')) == ["ada"]
        assert await users(("order_count", "gte", "2"), ("traits.plan", "eq", '"pro"')) == ["ada"]
        assert await users(("consents.email.marketing", "eq", "false")) == ["ada"]
        assert await users(("purchase_frequency_falling", "eq", "true"), ("aov", "lt", "40")) == ["cy"]
        assert await users(("email_open_rate", "gte", "0.5"), ("loyalty_tier", "eq", '"gold"'),
                           ("open_tickets", "eq", "1")) == ["ada"]
        assert await users(("days_since_last_order", "gt", "100")) == ["bob"]
        assert await users(("traits.city", "contains", '"Lon"')) == ["ada"]
        assert await users(("next_best_offer", "exists", "")) == ["ada", "bob", "cy", "dee", "eve", "vic"]
        assert await users(page_size=1) == ["ada", "bob", "cy", "dee", "eve", "vic"]
        for filters, where, says in (
            ([("rfm_segment", "eq", '"x"')], "filters[0].field", "unknown field 'rfm_segment'"),
            ([("order_count", "gte", "1"), ("order_count", "like", "1")], "filters[1].op", "unknown operator 'like'"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await suite.profile.SearchProfiles(profile_pb2.SearchProfilesRequest(
                    filters=[profile_pb2.Filter(field=f, op=o, value=v) for f, o, v in filters]))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith(f"{where}: ") and says in caught.value.details()


def without_scores(p: event_pb2.ProfileSnapshot) -> event_pb2.ProfileSnapshot:
    """The profile's own facts: not the moment it was read, nor scores against a base that moved."""
    copy = event_pb2.ProfileSnapshot.FromString(p.SerializeToString())
    for name in ("updated_at", "lifecycle", "rfm", "churn_risk", "next_best_offer", "purchase_frequency_falling"):
        copy.ClearField(name)
    return copy


async def test_replaying_the_log_with_merges_changes_nothing_twice(start_suite, db, monkeypatch) -> None:
    """The profile consumer re-reads identity's whole stream: redelivered events and merges are
    neither counted nor merged again."""
    monkeypatch.setenv("CDP_PROFILE_SCORES_INTERVAL_SECONDS", "3600")
    async with start_suite(CORE) as suite:
        await send(
            suite,
            ingest_pb2.BatchItem(track=ingest_pb2.TrackRequest(
                event_id="r1", identifiers=event_pb2.Identifiers(anonymous_id="phone"), event="Order Completed",
                properties=convert.dict_to_struct({"order_id": "r1", "revenue": 25.0}), timestamp=ago(3))),
            identify("r2", "lin", 2, {"plan": "pro"}, consent={"email": True}),
            track("r3", "lin", "Loyalty Points Earned", 2, points=10),
            track("r4", "lin", "Ticket Opened", 1, ticket_id="t-9"),
        )
        await suite.settle()
        # The phone's anonymous profile merges into Lin's.
        await send(suite, ingest_pb2.BatchItem(track=ingest_pb2.TrackRequest(
            event_id="r5", identifiers=event_pb2.Identifiers(anonymous_id="phone", user_id="lin"),
            event="Order Completed", properties=convert.dict_to_struct({"order_id": "r5", "revenue": 75.0}),
            timestamp=ago(0.5))))
        await suite.settle()
        before = await profile(suite, "lin")
        assert (before.order_count, before.revenue, before.loyalty.points, len(before.merged_profile_ids)) == (2, 100.0, 10, 1)
        timeline_rows = await db.fetchval("SELECT count(*) FROM profile.events")
    await suite.js.delete_consumer(suite.topology.stream("identity"), "profile-project")
    async with start_suite(CORE) as suite:
        await suite.settle()
        after = await profile(suite, "lin")
        assert without_scores(after) == without_scores(before)
        assert after.lifecycle.label == before.lifecycle.label == "active"
        assert await db.fetchval("SELECT count(*) FROM profile.events") == timeline_rows


async def test_segments_can_use_profile_scores(start_suite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_PROFILE_SCORES_INTERVAL_SECONDS", "0.5")
    async with start_suite((*CORE, SEGMENTATION)) as suite:
        await suite.segmentation.PutSegment(segmentation_pb2.Segment(id="win-back", conditions=[
            segmentation_pb2.Condition(field="lifecycle_stage", op="eq", value='"lapsed"'),
            segmentation_pb2.Condition(field="purchase_frequency_falling", op="eq", value="true"),
        ]))
        await load_story(suite)

        async def sized() -> bool:
            await suite.settle()
            listed = await suite.segmentation.ListSegments(segmentation_pb2.ListSegmentsRequest())
            return {s.id: s.size for s in listed.segments} == {"win-back": 1}

        await eventually(sized)
