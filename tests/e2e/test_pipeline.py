"""The thin slice end to end: gRPC in, through the log and every service, email and files out."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import grpc
import pytest

from cdp.activation.v1 import activation_pb2
from cdp.dmp.v1 import dmp_pb2
from cdp.identity.v1 import identity_pb2
from cdp.ingest.v1 import ingest_pb2
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog, identifiers
from cdp_cli.settle import subject_count

pytestmark = pytest.mark.timeout(120)


def track(event_id: str, event: str, minutes_ago: int, **ids: str) -> ingest_pb2.TrackRequest:
    props = {"order_id": f"o-{event_id}", "revenue": 150.0} if event == "Order Completed" else {}
    return ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(**ids), event=event,
        properties=convert.dict_to_struct(props),
        timestamp=eventlog.timestamp(eventlog.now() - timedelta(minutes=minutes_ago)),
    )


def identify(event_id: str, traits: dict[str, object], minutes_ago: int, **ids: str) -> ingest_pb2.IdentifyRequest:
    return ingest_pb2.IdentifyRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(**ids), traits=convert.dict_to_struct(traits),
        timestamp=eventlog.timestamp(eventlog.now() - timedelta(minutes=minutes_ago)),
    )


def by_email(email: str) -> profile_pb2.GetProfileRequest:
    return profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="email", value=email))


REPEAT_BUYERS = segmentation_pb2.Segment(
    id="repeat-buyers", name="Repeat buyers",
    conditions=[segmentation_pb2.Condition(field="order_count", op="gte", value="2")],
)
THANKS = activation_pb2.Campaign(
    id="thanks", segment_id="repeat-buyers", from_address="shop@example.com",
    subject_template="Thanks {{ traits.first_name }}", body_template="You placed {{ profile.order_count }} orders.",
)


async def test_events_flow_from_ingest_to_email_export_and_back(start_suite, smtp, db) -> None:
    inbox, _ = smtp
    async with start_suite() as suite:
        await suite.segmentation.PutSegment(REPEAT_BUYERS)
        await suite.activation.PutCampaign(THANKS)

        # An anonymous visitor browses, then identifies: one profile, history kept.
        await suite.ingest.Track(track("e1", "Product Viewed", 60, anonymous_id="anon-1"))
        await suite.ingest.Identify(
            identify("e2", {"email": " Ada@Example.COM ", "first_name": "Ada"}, 55, anonymous_id="anon-1", user_id="u-ada")
        )
        # On a second device she is anonymous again, then orders while logged in: the two profiles merge.
        await suite.ingest.Track(track("e3", "Product Viewed", 50, anonymous_id="anon-2"))
        await suite.ingest.Track(track("e4", "Order Completed", 40, anonymous_id="anon-2", user_id="u-ada"))
        await suite.ingest.Track(track("e5", "Order Completed", 30, user_id="u-ada"))
        # Another customer with one order.
        await suite.ingest.Identify(identify("e6", {"email": "grace@example.org", "first_name": "Grace"}, 20, user_id="u-grace"))
        await suite.ingest.Track(track("e7", "Order Completed", 10, user_id="u-grace"))
        await suite.settle()

        stats = await suite.identity.GetStats(identity_pb2.GetStatsRequest())
        assert (stats.profiles, stats.merges) == (2, 1)
        ada = await suite.profile.GetProfile(by_email("ada@example.com"))
        assert ada.order_count == 2 and ada.revenue == 300.0
        assert ada.event_count == 5
        assert convert.struct_to_dict(ada.traits)["first_name"] == "Ada"
        ids = {(i.type, i.value) for i in ada.identifiers}
        assert {("user_id", "u-ada"), ("anonymous_id", "anon-1"), ("anonymous_id", "anon-2"),
                ("email", "ada@example.com")} <= ids
        assert ("email_sha256", identifiers.email_sha256("ada@example.com")) in ids
        # Any identifier, including one from the merged-away profile, finds the same profile.
        resolved = await suite.identity.Resolve(
            identity_pb2.ResolveRequest(identifier=event_pb2.Identifier(type="anonymous_id", value="anon-2"))
        )
        assert resolved.profile_id == ada.profile_id
        old = await suite.profile.GetProfile(profile_pb2.GetProfileRequest(profile_id=ada.merged_profile_ids[0]))
        assert old.profile_id == ada.profile_id

        sizes = {s.id: s.size for s in (await suite.segmentation.ListSegments(segmentation_pb2.ListSegmentsRequest())).segments}
        assert sizes == {"repeat-buyers": 1}
        assert [m["To"] for m in inbox.messages] == ["ada@example.com"]
        assert inbox.messages[0]["Subject"] == "Thanks Ada"
        assert "You placed 2 orders." in inbox.messages[0].get_payload()
        assert await subject_count(suite.js, suite.topology.stream("activation"), f"{suite.topology.root}.activation.>") == 1

        exported = await suite.dmp.ExportAudience(dmp_pb2.ExportAudienceRequest(segment_id="repeat-buyers"))
        rows = list(csv.reader(io.StringIO(exported.csv.decode())))
        assert rows == [["email_sha256"], [identifiers.email_sha256("ada@example.com")]]

        # The ad platform reports Grace (known, by hashed email) and a stranger converting.
        when = (eventlog.now() - timedelta(minutes=5)).isoformat()
        conversions = (
            "conversion_id,email_sha256,event,value,currency,occurred_at\n"
            f"c-1,{identifiers.email_sha256('grace@example.org')},Order Completed,80,EUR,{when}\n"
            f"c-2,{identifiers.email_sha256('stranger@example.net')},Order Completed,20,EUR,{when}\n"
        ).encode()
        imported = await suite.dmp.ImportConversions(dmp_pb2.ImportConversionsRequest(platform="meta", csv=conversions))
        assert (imported.received, imported.appended, imported.matched) == (2, 2, 1)
        again = await suite.dmp.ImportConversions(dmp_pb2.ImportConversionsRequest(platform="meta", csv=conversions))
        assert again.appended == 0
        await suite.settle()

        grace = await suite.profile.GetProfile(by_email("grace@example.org"))
        assert grace.order_count == 2 and grace.revenue == 230.0
        stats = await suite.identity.GetStats(identity_pb2.GetStatsRequest())
        assert stats.profiles == 3
        # Grace's conversion made her a repeat buyer: she gets the email too, exactly once.
        assert sorted(m["To"] for m in inbox.messages) == ["ada@example.com", "grace@example.org"]

        # A DBA looking at pg_stat_activity sees which service holds each connection.
        named = {r["application_name"] for r in await db.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()")}
        assert {"cdp-identity", "cdp-profile", "cdp-profile-reader", "cdp-segmentation", "cdp-activation",
                "cdp-dmp-bridge"} <= named


async def test_replayed_log_changes_nothing_twice(start_suite, smtp, db) -> None:
    """Deleting the durable consumers makes every service re-read the whole log from the start."""
    inbox, _ = smtp
    async with start_suite() as suite:
        await suite.segmentation.PutSegment(REPEAT_BUYERS)
        await suite.activation.PutCampaign(THANKS)
        await suite.ingest.Identify(identify("r1", {"email": "lin@example.com", "first_name": "Lin"}, 30, user_id="u-lin"))
        await suite.ingest.Track(track("r2", "Order Completed", 20, user_id="u-lin"))
        await suite.ingest.Track(track("r3", "Order Completed", 10, user_id="u-lin"))
        log_size = await suite.settle()
        before = await suite.profile.GetProfile(by_email("lin@example.com"))
        assert len(inbox.messages) == 1
    for area, durables in {
        "collected": ["identity-resolve"], "identity": ["profile-project"],
        "profile": ["segmentation-evaluate", "dmp-identities"], "segment": ["activation-trigger", "dmp-audiences"],
    }.items():
        for durable in durables:
            await suite.js.delete_consumer(suite.topology.stream(area), durable)
    async with start_suite() as suite:
        assert await suite.settle() == log_size
        after = await suite.profile.GetProfile(by_email("lin@example.com"))
        assert (after.order_count, after.revenue, after.event_count) == (before.order_count, before.revenue, before.event_count)
        stats = await suite.identity.GetStats(identity_pb2.GetStatsRequest())
        assert stats.profiles == 1
    assert len(inbox.messages) == 1
    assert await db.fetchval("SELECT count(*) FROM activation.sends") == 1


async def test_a_template_failing_for_one_profile_spares_the_other_campaigns(start_suite, smtp, db) -> None:
    """One profile's traits make one campaign's template fail: that send is recorded as skipped with
    the reason, the other campaign on the segment still sends, and nothing is dead-lettered."""
    inbox, _ = smtp
    repeat = activation_pb2.Campaign(
        id="repeat", segment_id="repeat-buyers", from_address="shop@example.com",
        subject_template="For you", body_template="{{ 'x' * (traits.times | int) }}",
    )
    async with start_suite() as suite:
        await suite.segmentation.PutSegment(REPEAT_BUYERS)
        await suite.activation.PutCampaign(THANKS)
        await suite.activation.PutCampaign(repeat)
        await suite.ingest.Identify(identify("t1", {"email": "max@example.com", "first_name": "Max", "times": 10**9},
                                             30, user_id="u-max"))
        await suite.ingest.Identify(identify("t2", {"email": "ida@example.com", "first_name": "Ida", "times": 3},
                                             30, user_id="u-ida"))
        for n, user in enumerate(["u-max", "u-max", "u-ida", "u-ida"]):
            await suite.ingest.Track(track(f"t{n + 3}", "Order Completed", 20 - n, user_id=user))
        await suite.settle()

        got = sorted((m["To"], m["Subject"]) for m in inbox.messages)
        assert got == [("ida@example.com", "For you"), ("ida@example.com", "Thanks Ida"),
                       ("max@example.com", "Thanks Max")]
        assert "xxx" in next(m for m in inbox.messages if m["Subject"] == "For you").get_payload()
        skipped = await db.fetch("SELECT campaign_id, status, last_error FROM activation.sends WHERE status <> 'sent'")
        assert [(r["campaign_id"], r["status"]) for r in skipped] == [("repeat", "skipped_render_failed")]
        assert "body_template" in skipped[0]["last_error"] and "1000000000" in skipped[0]["last_error"]
        assert await subject_count(suite.js, suite.topology.stream("deadletter"), f"{suite.topology.root}.deadletter.>") == 0


async def test_bad_input_is_rejected_by_field_and_nothing_is_appended(start_suite) -> None:
    async with start_suite() as suite:
        cases = [
            (ingest_pb2.TrackRequest(event="Viewed"), "identifiers"),
            (ingest_pb2.TrackRequest(identifiers=event_pb2.Identifiers(user_id="u1")), "event"),
            (ingest_pb2.TrackRequest(event_id="has space", identifiers=event_pb2.Identifiers(user_id="u1"), event="x"),
             "event_id"),
            (track("f1", "Viewed", -3 * 24 * 60, user_id="u1"), "timestamp"),
            (ingest_pb2.TrackRequest(identifiers=event_pb2.Identifiers(user_id="u1", email="not-an-email"), event="x"),
             "identifiers.email"),
        ]
        for request, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await suite.ingest.Track(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith(field + ":"), caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.segmentation.PutSegment(
                segmentation_pb2.Segment(id="x", conditions=[segmentation_pb2.Condition(field="order_count", op="between", value="1")])
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "conditions[0].op" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.dmp.ImportConversions(
                dmp_pb2.ImportConversionsRequest(platform="meta", csv=b"conversion_id,email_sha256,event,value,currency,occurred_at\nc1,nothex,x,1,EUR,2026-01-01\n")
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "line 2, column email_sha256" in caught.value.details()
        info = await suite.js.stream_info(suite.topology.stream("collected"))
        assert info.state.messages == 0
