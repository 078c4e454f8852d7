"""The ingest service's gRPC API against a real JetStream: what callers get back and what reaches the log."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import grpc
import pytest

from cdp.ingest.v1 import ingest_pb2
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_ingest import core
from cdp_ingest.main import DEFINITION as INGEST

pytestmark = pytest.mark.timeout(60)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def minutes_ago(minutes: float) -> Any:
    return eventlog.timestamp(eventlog.now() - timedelta(minutes=minutes))


def ids(**values: str) -> event_pb2.Identifiers:
    return event_pb2.Identifiers(**values)


def track(event_id: str, event: str = "Product Viewed", properties: dict[str, Any] | None = None,
          **identifiers: str) -> ingest_pb2.TrackRequest:
    return ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=ids(**(identifiers or {"user_id": "u1"})), event=event,
        properties=convert.dict_to_struct(properties or {}), timestamp=minutes_ago(1),
    )


def basic_auth(key: str) -> str:
    """The header Segment's libraries send: the write key as the basic auth user, no password."""
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


async def collected(suite: Any) -> list[tuple[str, event_pb2.Event]]:
    """(subject, event) for everything in the collected stream, in log order."""
    stream = suite.topology.stream("collected")
    state = (await suite.js.stream_info(stream)).state
    if not state.messages:
        return []
    out = []
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await suite.js.get_msg(stream, seq)
        out.append((msg.subject, eventlog.decode(msg.data)))
    return out


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_alias_page_screen_and_group_are_stored_with_their_shape(start_suite) -> None:
    async with start_suite((INGEST,)) as suite:
        alias = await suite.ingest.Alias(ingest_pb2.AliasRequest(
            event_id="al-1", identifiers=ids(user_id="u-ada"), previous_id="anon-1", timestamp=minutes_ago(5)))
        page = await suite.ingest.Page(ingest_pb2.PageRequest(
            event_id="pg-1", identifiers=ids(anonymous_id="anon-1"), name="Pricing", category="Docs",
            properties=convert.dict_to_struct({"url": "https://example.com/pricing"}), source="website"))
        screen = await suite.ingest.Screen(ingest_pb2.ScreenRequest(
            event_id="sc-1", identifiers=ids(user_id="u-ada", device_id="dev-9"), name="Home",
            properties=convert.dict_to_struct({"variant": "b"})))
        group = await suite.ingest.Group(ingest_pb2.GroupRequest(
            event_id="gr-1", identifiers=ids(user_id="u-ada"), group_id="acme",
            traits=convert.dict_to_struct({"name": "Acme Inc", "plan": "enterprise"})))
        assert [r.event_id for r in (alias, page, screen, group)] == ["al-1", "pg-1", "sc-1", "gr-1"]
        assert [r.stream_sequence for r in (alias, page, screen, group)] == [1, 2, 3, 4]
        assert not any(r.duplicate for r in (alias, page, screen, group))

        log = await collected(suite)
        root = suite.topology.root
        assert [(s, e.id, e.type, e.name) for s, e in log] == [
            (f"{root}.collected.alias", "al-1", "alias", ""),
            (f"{root}.collected.page", "pg-1", "page", "Pricing"),
            (f"{root}.collected.screen", "sc-1", "screen", "Home"),
            (f"{root}.collected.group", "gr-1", "group", ""),
        ]
        events = {e.id: e for _, e in log}
        assert convert.struct_to_dict(events["al-1"].properties) == {"previous_id": "anon-1"}
        assert (events["al-1"].identifiers.user_id, events["al-1"].identifiers.anonymous_id) == ("u-ada", "anon-1")
        assert convert.struct_to_dict(events["pg-1"].properties) == {"url": "https://example.com/pricing",
                                                                      "category": "Docs"}
        assert convert.struct_to_dict(events["sc-1"].properties) == {"variant": "b"}
        assert events["sc-1"].identifiers.device_id == "dev-9"
        assert convert.struct_to_dict(events["gr-1"].properties) == {
            "group_id": "acme", "group_traits": {"name": "Acme Inc", "plan": "enterprise"}}
        assert not events["gr-1"].HasField("traits") or not convert.struct_to_dict(events["gr-1"].traits)
        # Without write keys, the request's source is recorded (or "grpc").
        assert [e.source for _, e in log] == ["grpc", "website", "grpc", "grpc"]
        # The client's time is kept; the receive time is the server's.
        occurred = events["al-1"].occurred_at.ToDatetime()
        received = events["al-1"].received_at.ToDatetime()
        assert timedelta(minutes=4) < received - occurred < timedelta(minutes=6)

        for call, field in [
            (suite.ingest.Alias(ingest_pb2.AliasRequest(identifiers=ids(user_id="u1"))), "previous_id"),
            (suite.ingest.Alias(ingest_pb2.AliasRequest(identifiers=ids(anonymous_id="a1"), previous_id="a0")),
             "identifiers.user_id"),
            (suite.ingest.Group(ingest_pb2.GroupRequest(identifiers=ids(user_id="u1"))), "group_id"),
            (suite.ingest.Screen(ingest_pb2.ScreenRequest(name="Home")), "identifiers"),
        ]:
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith(field + ": "), error.details()
        assert len(await collected(suite)) == 4


async def test_batch_stores_the_good_events_and_reports_each_bad_one_by_index(start_suite) -> None:
    async with start_suite((INGEST,)) as suite:
        items = [
            ingest_pb2.BatchItem(track=track("b-0")),
            ingest_pb2.BatchItem(track=ingest_pb2.TrackRequest(event_id="b-1", event="Product Viewed")),
            ingest_pb2.BatchItem(identify=ingest_pb2.IdentifyRequest(
                event_id="b-2", identifiers=ids(user_id="u1"),
                traits=convert.dict_to_struct({"email": "ada@example.com"}))),
            ingest_pb2.BatchItem(),
            ingest_pb2.BatchItem(track=track("b-4", "Order Completed", {"revenue": 10})),
            ingest_pb2.BatchItem(page=ingest_pb2.PageRequest(event_id="b-5", identifiers=ids(anonymous_id="a1"),
                                                             name="Home")),
            ingest_pb2.BatchItem(track=track("b-6", "Loyalty Points Earned", {"points": 2.5})),
        ]
        reply = await suite.ingest.Batch(ingest_pb2.BatchRequest(items=items))
        assert (reply.stored, reply.rejected) == (3, 4)
        assert [r.index for r in reply.results] == list(range(7))
        assert [r.code for r in reply.results] == [0, INVALID_ARGUMENT, 0, INVALID_ARGUMENT, INVALID_ARGUMENT, 0,
                                                  INVALID_ARGUMENT]
        errors = {r.index: r.error for r in reply.results if r.code}
        assert errors[1].startswith("identifiers: ")
        assert errors[3].startswith("kind: ")
        assert errors[4].startswith("properties.order_id: ")
        assert errors[6].startswith("properties.points: ")
        assert [r.event_id for r in reply.results if r.code == 0] == ["b-0", "b-2", "b-5"]
        assert reply.results[4].event_id == "b-4"

        log = await collected(suite)
        assert [(e.id, e.type) for _, e in log] == [("b-0", "track"), ("b-2", "identify"), ("b-5", "page")]
        assert [r.stream_sequence for r in reply.results if r.code == 0] == [1, 2, 3]
        assert log[1][1].identifiers.email == "ada@example.com"

        too_many = [ingest_pb2.BatchItem(track=track(f"big-{i}")) for i in range(core.MAX_BATCH_EVENTS + 1)]
        error = await rpc_error(suite.ingest.Batch(ingest_pb2.BatchRequest(items=too_many)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("items: ") and str(core.MAX_BATCH_EVENTS) in error.details()
        assert len(await collected(suite)) == 3


async def _items(count: int, bad: int | None = None) -> AsyncIterator[ingest_pb2.BatchItem]:
    for i in range(count):
        if i == bad:
            yield ingest_pb2.BatchItem(track=ingest_pb2.TrackRequest(event_id=f"imp-{i:04}", event="Imported"))
        elif i % 3 == 0:
            yield ingest_pb2.BatchItem(identify=ingest_pb2.IdentifyRequest(
                event_id=f"imp-{i:04}", identifiers=ids(user_id=f"u{i}"),
                traits=convert.dict_to_struct({"n": i}), timestamp=minutes_ago(60)))
        else:
            yield ingest_pb2.BatchItem(track=track(f"imp-{i:04}", "Imported", {"n": i}, user_id=f"u{i}"))


async def test_import_streams_results_in_order_and_a_reimport_is_flagged_duplicate(start_suite) -> None:
    count, bad = 1200, 700
    async with start_suite((INGEST,)) as suite:
        first = [r async for r in suite.ingest.Import(_items(count, bad))]
        assert [r.index for r in first] == list(range(count))
        assert [r.event_id for r in first] == [f"imp-{i:04}" for i in range(count)]
        assert [r.index for r in first if r.code != 0] == [bad]
        assert first[bad].code == INVALID_ARGUMENT and first[bad].error.startswith("identifiers: ")
        assert not any(r.duplicate for r in first)
        sequences = [r.stream_sequence for r in first if r.code == 0]
        assert sequences == list(range(1, count))

        again = [r async for r in suite.ingest.Import(_items(count, bad))]
        assert [r.index for r in again] == list(range(count))
        assert [r.duplicate for r in again if r.code == 0] == [True] * (count - 1)
        assert [r.stream_sequence for r in again if r.code == 0] == sequences

        log = await collected(suite)
        assert len(log) == count - 1
        assert [e.id for _, e in log] == [f"imp-{i:04}" for i in range(count) if i != bad]
        assert convert.struct_to_dict(log[1][1].properties) == {"n": 1}
        assert convert.struct_to_dict(log[0][1].traits) == {"n": 0}

        # An empty import is fine and stores nothing.
        assert [r async for r in suite.ingest.Import(_items(0))] == []


async def test_the_same_id_over_http_and_grpc_is_stored_once(start_suite) -> None:
    async with start_suite((INGEST,)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        async with http.post("/v1/track", json={"messageId": "both-1", "userId": "u1", "event": "Clicked"}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"success": True, "messageId": "both-1", "duplicate": False}
        again = await suite.ingest.Track(track("both-1", "Clicked"))
        assert again.duplicate and again.stream_sequence == 1

        first = await suite.ingest.Track(track("both-2", "Clicked"))
        assert not first.duplicate
        async with http.post("/v1/batch", json={"batch": [
            {"type": "track", "messageId": "both-2", "userId": "u1", "event": "Clicked"}]}) as resp:
            assert resp.status == 200
        async with http.post("/v1/track", json={"messageId": "both-2", "userId": "u1", "event": "Clicked"}) as resp:
            assert (await resp.json())["duplicate"] is True

        log = await collected(suite)
        assert [(e.id, e.source) for _, e in log] == [("both-1", "http"), ("both-2", "grpc")]


async def test_write_keys_are_required_and_name_the_source(start_suite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_WRITE_KEYS", "wk-web=web,wk-crm=crm")
    basic = basic_auth("wk-crm")
    async with start_suite((INGEST,)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        for metadata in [None, (("x-write-key", "wk-nope"),), (("authorization", basic_auth("nope")),)]:
            error = await rpc_error(suite.ingest.Track(track("k-bad"), metadata=metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "write key" in error.details()
        error = await rpc_error(suite.ingest.Batch(ingest_pb2.BatchRequest(items=[ingest_pb2.BatchItem(
            track=track("k-bad"))])))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        # No items: with items in flight grpcio's asyncio client may report its own failed write
        # (INTERNAL "Internal error from Core", grpc/grpc#36066) instead of the server's status.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in suite.ingest.Import(_items(0))]
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        body = {"messageId": "k-bad", "userId": "u1", "event": "Clicked"}
        for headers, payload in [({}, body), ({"Authorization": basic_auth("nope")}, body),
                                 ({}, {**body, "writeKey": "nope"})]:
            async with http.post("/v1/track", json=payload, headers=headers) as resp:
                assert resp.status == 401
                assert "write key" in (await resp.json())["error"]
        assert await collected(suite) == []

        # A good key names the source, whatever the request claims.
        request = track("k-1")
        request.source = "spoofed"
        await suite.ingest.Track(request, metadata=(("x-write-key", "wk-web"),))
        await suite.ingest.Track(track("k-2"), metadata=(("authorization", basic),))
        batch = await suite.ingest.Batch(ingest_pb2.BatchRequest(items=[ingest_pb2.BatchItem(track=track("k-3"))]),
                                         metadata=(("x-write-key", "wk-web"),))
        assert batch.stored == 1
        imported = [r async for r in suite.ingest.Import(_items(2), metadata=(("x-write-key", "wk-crm"),))]
        assert [r.code for r in imported] == [0, 0]
        async with http.post("/v1/track", json={**body, "messageId": "k-4"},
                             headers={"Authorization": basic_auth("wk-web")}) as resp:
            assert resp.status == 200
        async with http.post("/v1/track", json={**body, "messageId": "k-5", "writeKey": "wk-crm"}) as resp:
            assert resp.status == 200

        log = await collected(suite)
        assert [(e.id, e.source) for _, e in log] == [
            ("k-1", "web"), ("k-2", "crm"), ("k-3", "web"), ("imp-0000", "crm"), ("imp-0001", "crm"),
            ("k-4", "web"), ("k-5", "crm"),
        ]


async def test_oversized_and_badly_timed_events_are_refused(start_suite) -> None:
    async with start_suite((INGEST,)) as suite:
        error = await rpc_error(suite.ingest.Track(track("big", "Clicked", {"blob": "x" * (33 * 1024)})))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("event: ") and "32 KiB" in error.details()
        # Just under the limit is fine.
        fits = await suite.ingest.Track(track("fits", "Clicked", {"blob": "x" * (30 * 1024)}))
        assert fits.stream_sequence == 1

        for offset in (timedelta(hours=25), -timedelta(days=6 * 365)):
            request = track("late", "Clicked")
            request.timestamp.CopyFrom(eventlog.timestamp(eventlog.now() + offset))
            error = await rpc_error(suite.ingest.Track(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith("timestamp: "), error.details()
        # A client clock a day fast is forgiven when sent_at shows the skew.
        skewed = track("skewed", "Clicked")
        skewed.timestamp.CopyFrom(eventlog.timestamp(eventlog.now() + timedelta(hours=30)))
        skewed.sent_at.CopyFrom(eventlog.timestamp(eventlog.now() + timedelta(hours=30, minutes=2)))
        assert (await suite.ingest.Track(skewed)).stream_sequence == 2

        # In a batch the oversized event is reported by index and the rest stored.
        reply = await suite.ingest.Batch(ingest_pb2.BatchRequest(items=[
            ingest_pb2.BatchItem(track=track("big", "Clicked", {"blob": "x" * (33 * 1024)})),
            ingest_pb2.BatchItem(track=track("small", "Clicked")),
        ]))
        assert [(r.code, r.error.split(":")[0]) for r in reply.results] == [(INVALID_ARGUMENT, "event"), (0, "")]

        log = await collected(suite)
        assert [e.id for _, e in log] == ["fits", "skewed", "small"]
        skewed_event = log[1][1]
        lag = skewed_event.received_at.ToDatetime() - skewed_event.occurred_at.ToDatetime()
        assert timedelta(minutes=1) < lag < timedelta(minutes=3)


async def test_one_item_with_an_absurd_clock_does_not_sink_the_batch(start_suite) -> None:
    async with start_suite((INGEST,)) as suite:
        absurd = track("absurd")
        absurd.timestamp.CopyFrom(eventlog.timestamp(datetime(1, 1, 1, tzinfo=UTC)))
        absurd.sent_at.CopyFrom(eventlog.timestamp(datetime(9999, 12, 31, tzinfo=UTC)))
        try:
            reply = await suite.ingest.Batch(ingest_pb2.BatchRequest(items=[
                ingest_pb2.BatchItem(track=track("good")), ingest_pb2.BatchItem(track=absurd)]))
        except grpc.aio.AioRpcError as error:
            raise AssertionError(f"{error.code()}: {error.details()}") from None
        assert [(r.code, r.error.split(":")[0]) for r in reply.results] == [(0, ""), (INVALID_ARGUMENT, "timestamp")]
        assert [e.id for _, e in await collected(suite)] == ["good"]
