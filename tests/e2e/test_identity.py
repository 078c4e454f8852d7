"""Identity resolution end to end: rules, the graph, operators' merge and split, rebuild by replay."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from cdp.identity.v1 import identity_pb2
from cdp.ingest.v1 import ingest_pb2
from cdp.profile.v1 import profile_pb2
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_identity.main import DEFINITION as IDENTITY
from cdp_ingest.main import DEFINITION as INGEST
from cdp_profile.main import DEFINITION as PROFILE

pytestmark = pytest.mark.timeout(120)

CORE = (INGEST, IDENTITY, PROFILE)


def ident(type_: str, value: str) -> event_pb2.Identifier:
    return event_pb2.Identifier(type=type_, value=value)


def when(minutes_ago: int) -> object:
    return eventlog.timestamp(eventlog.now() - timedelta(minutes=minutes_ago))


async def identify(suite, event_id: str, minutes_ago: int, traits: dict[str, object] | None = None, **ids: str) -> None:
    await suite.ingest.Identify(ingest_pb2.IdentifyRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(**ids), traits=convert.dict_to_struct(traits or {}),
        timestamp=when(minutes_ago)))


async def order(suite, event_id: str, minutes_ago: int, revenue: float, **ids: str) -> None:
    await suite.ingest.Track(ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(**ids), event="Order Completed",
        properties=convert.dict_to_struct({"order_id": event_id, "revenue": revenue}), timestamp=when(minutes_ago)))


async def graph_of(suite, type_: str, value: str) -> identity_pb2.Graph:
    return await suite.identity.GetGraph(identity_pb2.GetGraphRequest(identifier=ident(type_, value)))


async def profile_of(suite, type_: str, value: str) -> event_pb2.ProfileSnapshot:
    return await suite.profile.GetProfile(profile_pb2.GetProfileRequest(identifier=ident(type_, value)))


async def track(suite, event_id: str, minutes_ago: int, name: str, **properties: object) -> None:
    anonymous = str(properties.pop("anonymous_id", ""))
    user = str(properties.pop("user_id", ""))
    await suite.ingest.Track(ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(user_id=user, anonymous_id=anonymous), event=name,
        properties=convert.dict_to_struct(properties), timestamp=when(minutes_ago)))


def view(p: event_pb2.ProfileSnapshot) -> dict[str, object]:
    """What a person would compare: every aggregate, trait, consent, ticket and score with its reasons
    (not the profile's id, its merge history or the moment it was read)."""
    copy = event_pb2.ProfileSnapshot.FromString(p.SerializeToString())
    for name in ("profile_id", "merged_profile_ids", "updated_at"):
        copy.ClearField(name)
    for score in (copy.lifecycle, copy.churn_risk, copy.next_best_offer):
        score.value = round(score.value, 2)
    return json_format.MessageToDict(copy)


async def test_the_graph_shows_identifiers_and_why_profiles_merged(start_suite) -> None:
    async with start_suite(CORE) as suite:
        await identify(suite, "g1", 60, {"first_name": "Ada"}, anonymous_id="laptop", user_id="u-ada",
                       email="Ada@Example.com", phone="(415) 555-2671")
        await identify(suite, "g2", 50, anonymous_id="phone-app")
        await order(suite, "g3", 40, 20.0, anonymous_id="phone-app", user_id="u-ada")
        await suite.settle()
        graph = await graph_of(suite, "phone", "+1 415 555 2671")
        held = {(i.type, i.value) for i in graph.identifiers}
        assert {("user_id", "u-ada"), ("email", "ada@example.com"), ("phone", "+14155552671"),
                ("anonymous_id", "laptop"), ("anonymous_id", "phone-app")} <= held
        assert all(i.first_seen.seconds and i.last_seen.seconds >= i.first_seen.seconds for i in graph.identifiers)
        [merge] = graph.merges
        assert merge.survivor_id == graph.profile_id and merge.event_id == "g3"
        assert "anonymous_id=phone-app" in merge.reason and "user_id=u-ada" in merge.reason
        # The merged-away profile id still finds the survivor's graph.
        again = await suite.identity.GetGraph(identity_pb2.GetGraphRequest(profile_id=merge.merged_id))
        assert again.profile_id == graph.profile_id


async def test_two_user_ids_are_never_merged(start_suite) -> None:
    async with start_suite(CORE) as suite:
        await identify(suite, "u1", 30, anonymous_id="shared-tablet", user_id="u-ann")
        # Bob logs in on the same tablet: linking the tablet would put two user_ids on one profile.
        await order(suite, "u2", 20, 10.0, anonymous_id="shared-tablet", user_id="u-bob")
        await suite.settle()
        ann, bob = await graph_of(suite, "user_id", "u-ann"), await graph_of(suite, "user_id", "u-bob")
        assert ann.profile_id != bob.profile_id
        assert ("anonymous_id", "shared-tablet") in {(i.type, i.value) for i in ann.identifiers}
        assert {(i.type, i.value) for i in bob.identifiers} == {("user_id", "u-bob")}
        assert (await profile_of(suite, "user_id", "u-bob")).order_count == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.identity.Merge(identity_pb2.MergeRequest(survivor_id=ann.profile_id, profile_ids=[bob.profile_id]))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "user_id" in caught.value.details()


async def test_rules_come_from_a_file(start_suite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"types": {"email": {"priority": 2, "limit": 1}}, "blocked": ["^test.*$"]}))
    monkeypatch.setenv("CDP_IDENTITY_RULES", str(rules))
    async with start_suite(CORE) as suite:
        await identify(suite, "r1", 30, user_id="u-1", email="one@example.com")
        await identify(suite, "r2", 20, anonymous_id="a-2", email="two@example.com")
        await identify(suite, "r3", 10, anonymous_id="test-visitor", email="three@example.com")
        # One email per profile: this event would join them; its weaker identifiers are dropped.
        await identify(suite, "r4", 5, user_id="u-1", email="two@example.com")
        await suite.settle()
        one = await graph_of(suite, "user_id", "u-1")
        assert [(i.type, i.value) for i in one.identifiers if i.type == "email"] == [("email", "one@example.com")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await graph_of(suite, "anonymous_id", "test-visitor")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # blocked by the file's pattern


async def test_a_merge_undone_by_a_split_leaves_both_customers_as_before(start_suite, no_scoring_rounds) -> None:
    async with start_suite(CORE) as suite:
        await identify(suite, "m1", 90, {"first_name": "Lin", "tier": "gold"}, user_id="u-lin", email="lin@example.com")
        await order(suite, "m2", 80, 100.0, user_id="u-lin")
        await order(suite, "m3", 70, 50.0, user_id="u-lin")
        await track(suite, "m3a", 69, "Consent Updated", user_id="u-lin", channel="email", purpose="marketing",
                    granted=True)
        await track(suite, "m3b", 68, "Loyalty Tier Changed", user_id="u-lin", tier="gold")
        await track(suite, "m3c", 67, "Email Delivered", user_id="u-lin")
        await track(suite, "m3d", 66, "Email Opened", user_id="u-lin")
        await track(suite, "m3e", 65, "Order Refunded", user_id="u-lin", order_id="m3", total=10.0)
        await identify(suite, "m4", 60, {"first_name": "Kim", "tier": "bronze"}, anonymous_id="a-kim",
                       email="kim@example.com")
        await order(suite, "m5", 50, 30.0, anonymous_id="a-kim")
        await track(suite, "m5a", 49, "Consent Updated", anonymous_id="a-kim", channel="email", purpose="marketing",
                    granted=False)
        await track(suite, "m5b", 48, "Ticket Opened", anonymous_id="a-kim", ticket_id="k-1")
        await track(suite, "m5c", 47, "Loyalty Points Earned", anonymous_id="a-kim", points=40)
        await suite.settle()
        lin_before, kim_before = await profile_of(suite, "user_id", "u-lin"), await profile_of(suite, "email", "kim@example.com")
        assert (lin_before.email.opens, lin_before.refund_count, kim_before.open_tickets) == (1, 1, 1)
        assert lin_before.lifecycle.label and kim_before.rfm.cell and kim_before.consents

        # An operator merges them by mistake...
        merged = await suite.identity.Merge(identity_pb2.MergeRequest(
            survivor_id=lin_before.profile_id, profile_ids=[kim_before.profile_id], reason="ticket 42"))
        assert [m.reason for m in merged.merges] == ["operator merge: ticket 42"]
        await suite.settle()
        blob = await profile_of(suite, "email", "kim@example.com")
        assert blob.profile_id == lin_before.profile_id and blob.order_count == 3
        assert (blob.open_tickets, blob.loyalty.tier, blob.loyalty.points) == (1, "gold", 40)

        # ...and splits Kim's identifiers off again: her events go with them.
        kim_ids = [ident("email", "kim@example.com"), ident("anonymous_id", "a-kim"),
                   ident("email_sha256", next(i.value for i in kim_before.identifiers if i.type == "email_sha256"))]
        split = await suite.identity.Split(identity_pb2.SplitRequest(
            profile_id=lin_before.profile_id, identifiers=kim_ids, reason="ticket 43"))
        assert {(i.type, i.value) for i in split.split_off.identifiers} == {(i.type, i.value) for i in kim_ids}
        assert split.split_off.splits[0].reason == "operator split: ticket 43"
        await suite.settle()
        lin_after, kim_after = await profile_of(suite, "user_id", "u-lin"), await profile_of(suite, "email", "kim@example.com")
        assert kim_after.profile_id == split.split_off.profile_id
        assert view(lin_after) == view(lin_before)
        assert view(kim_after) == view(kim_before)
        # New events through a split-off identifier reach the new profile.
        await order(suite, "m6", 1, 5.0, anonymous_id="a-kim")
        await suite.settle()
        assert (await profile_of(suite, "email", "kim@example.com")).order_count == 2

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.identity.Split(identity_pb2.SplitRequest(
                profile_id=lin_before.profile_id, identifiers=[ident("email", "nobody@example.com")]))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_dropping_the_graph_and_replaying_the_log_rebuilds_it(start_suite, db) -> None:
    async def partition() -> set[frozenset[tuple[str, str]]]:
        rows = await db.fetch("SELECT profile_id, id_type, id_value FROM identity.identifiers")
        groups: dict[str, set[tuple[str, str]]] = {}
        for r in rows:
            groups.setdefault(r["profile_id"], set()).add((r["id_type"], r["id_value"]))
        return {frozenset(g) for g in groups.values()}

    async with start_suite(CORE) as suite:
        await identify(suite, "p1", 60, anonymous_id="v1")
        await identify(suite, "p2", 50, user_id="u-1", email="x@example.com", anonymous_id="v1")
        await identify(suite, "p3", 40, anonymous_id="v2", email="y@example.com")
        await order(suite, "p4", 30, 9.0, anonymous_id="v2", user_id="u-1")
        await identify(suite, "p5", 20, user_id="u-2", email="z@example.com")
        await suite.settle()
        survivor = (await graph_of(suite, "user_id", "u-1")).profile_id
        await suite.identity.Split(identity_pb2.SplitRequest(profile_id=survivor, identifiers=[ident("anonymous_id", "v2")]))
        await suite.settle()
        before = await partition()
        ids_before = {r["profile_id"] for r in await db.fetch("SELECT profile_id FROM identity.profiles")}
        merges_before = await db.fetch("SELECT merged_id, survivor_id, reason FROM identity.merges ORDER BY merged_id")
    await db.execute("DROP SCHEMA identity CASCADE")
    await suite.js.delete_consumer(suite.topology.stream("collected"), "identity-resolve")
    async with start_suite(CORE) as suite:
        await suite.settle()
        assert await partition() == before
        assert {r["profile_id"] for r in await db.fetch("SELECT profile_id FROM identity.profiles")} == ids_before
        assert await db.fetch("SELECT merged_id, survivor_id, reason FROM identity.merges ORDER BY merged_id") == merges_before
