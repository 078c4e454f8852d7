"""The Segment-compatible HTTP collector over real HTTP, with raw requests and the real SDKs."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import rudderstack.analytics.request as rudder_request
import segment.analytics.request as segment_request
from rudderstack.analytics.client import Client as RudderClient
from rudderstack.analytics.request import APIError as RudderAPIError
from segment.analytics.client import Client as SegmentClient
from segment.analytics.request import APIError as SegmentAPIError

from cdp.v1 import event_pb2
from cdp_cli import infra
from cdp_common import convert, eventlog
from cdp_ingest import core
from cdp_ingest.main import DEFINITION as INGEST

pytestmark = pytest.mark.timeout(60)


def iso(minutes_from_now: float = 0) -> str:
    return (eventlog.now() + timedelta(minutes=minutes_from_now)).isoformat().replace("+00:00", "Z")


def basic_auth(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


async def post(http: aiohttp.ClientSession, path: str, body: Any, *, gzipped: bool = False,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POSTs a JSON body (or raw bytes) and returns (status, JSON answer or {"body": text})."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    if gzipped:
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    # A file-like body: aiohttp warns (an error here) about large raw bytes.
    async with http.post(path, data=io.BytesIO(data), headers=headers) as resp:
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, {"body": text}


async def collected(suite: Any) -> list[event_pb2.Event]:
    stream = suite.topology.stream("collected")
    state = (await suite.js.stream_info(stream)).state
    if not state.messages:
        return []
    return [eventlog.decode((await suite.js.get_msg(stream, seq)).data)
            for seq in range(state.first_seq, state.last_seq + 1)]


def props(event: event_pb2.Event) -> dict[str, Any]:
    return convert.struct_to_dict(event.properties)


def traits(event: event_pb2.Event) -> dict[str, Any]:
    return convert.struct_to_dict(event.traits)


def context(event: event_pb2.Event) -> dict[str, Any]:
    return convert.struct_to_dict(event.context)


MESSAGES: dict[str, dict[str, Any]] = {
    "track": {"userId": "u1", "event": "Order Completed",
              "properties": {"order_id": "o-1", "revenue": 49.9, "currency": "EUR"}},
    "identify": {"userId": "u1", "traits": {"email": "ada@example.com", "first_name": "Ada"}},
    "alias": {"userId": "u1", "previousId": "anon-1"},
    "page": {"anonymousId": "anon-1", "name": "Pricing", "category": "Docs", "properties": {"path": "/pricing"}},
    "screen": {"userId": 42, "name": "Home", "properties": {"variant": "b"}},
    "group": {"userId": "u1", "groupId": "acme", "traits": {"name": "Acme Inc"}},
}


def check_shapes(events: dict[str, event_pb2.Event]) -> None:
    """The six MESSAGES as stored."""
    assert (events["track"].name, props(events["track"])) == (
        "Order Completed", {"order_id": "o-1", "revenue": 49.9, "currency": "EUR"})
    assert traits(events["identify"]) == {"email": "ada@example.com", "first_name": "Ada"}
    assert events["identify"].identifiers.email == "ada@example.com"
    assert props(events["alias"]) == {"previous_id": "anon-1"}
    assert events["alias"].identifiers.anonymous_id == "anon-1"
    assert (events["page"].name, props(events["page"])) == ("Pricing", {"path": "/pricing", "category": "Docs"})
    assert (events["screen"].name, props(events["screen"]), events["screen"].identifiers.user_id) == (
        "Home", {"variant": "b"}, "42")
    assert props(events["group"]) == {"group_id": "acme", "group_traits": {"name": "Acme Inc"}}
    assert not traits(events["group"])


@pytest.mark.parametrize("gzipped", [False, True], ids=["json", "gzip"])
async def test_every_endpoint_stores_its_call_type(start_suite, gzipped: bool) -> None:
    async with start_suite((INGEST,)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        for kind, message in MESSAGES.items():
            status, answer = await post(http, f"/v1/{kind}", {**message, "messageId": f"m-{kind}",
                                                               "timestamp": iso(-10)}, gzipped=gzipped)
            assert (status, answer) == (200, {"success": True, "messageId": f"m-{kind}", "duplicate": False})
        # A batch (and its alias /v1/import): every type at once, with a batch-level sentAt and context.
        # The client's clock is 2 hours fast; sentAt lets the collector remove the skew.
        batch = [{**message, "type": kind, "messageId": f"b-{kind}", "timestamp": iso(120 - 5),
                  "context": {"page": {"path": "/x"}}} for kind, message in MESSAGES.items()]
        status, answer = await post(http, "/v1/batch", {"batch": batch, "sentAt": iso(120),
                                                        "context": {"library": {"name": "raw"}}}, gzipped=gzipped)
        assert (status, answer) == (200, {"success": True, "stored": 6, "rejected": []})
        status, answer = await post(http, "/v1/import", {"batch": [{**MESSAGES["track"], "type": "track",
                                                                    "messageId": "i-1"}]}, gzipped=gzipped)
        assert (status, answer["stored"]) == (200, 1)

        log = await collected(suite)
        assert [e.id for e in log] == [f"m-{k}" for k in MESSAGES] + [f"b-{k}" for k in MESSAGES] + ["i-1"]
        assert [e.type for e in log] == [*MESSAGES, *MESSAGES, "track"]
        assert {e.source for e in log} == {"http"}
        check_shapes({e.type: e for e in log[:6]})
        check_shapes({e.type: e for e in log[6:12]})
        for event in log[:6]:
            lag = event.received_at.ToDatetime() - event.occurred_at.ToDatetime()
            assert timedelta(minutes=9) < lag < timedelta(minutes=11)
        for event in log[6:12]:
            lag = event.received_at.ToDatetime() - event.occurred_at.ToDatetime()
            assert timedelta(minutes=4) < lag < timedelta(minutes=6), lag
            assert context(event) == {"library": {"name": "raw"}, "page": {"path": "/x"}}


async def test_bad_input_is_refused_in_segments_words_and_nothing_is_stored(start_suite) -> None:
    async with start_suite((INGEST,)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        cases = [
            ("/v1/track", {"event": "Clicked"}, "userId or anonymousId: "),
            ("/v1/track", {"userId": "u1"}, "event: "),
            ("/v1/track", {"userId": True, "event": "x"}, "userId: "),
            ("/v1/track", {"userId": "u1", "event": "x", "messageId": "has space"}, "messageId: "),
            ("/v1/track", {"userId": "u1", "event": "x", "timestamp": "2024-06-01T10:00:00"}, "timestamp: "),
            ("/v1/track", {"userId": "u1", "event": "x", "timestamp": iso(26 * 60)}, "timestamp: "),
            ("/v1/track", {"userId": "u1", "event": "x", "sentAt": "tomorrow"}, "sentAt: "),
            ("/v1/track", {"userId": "u1", "event": "Order Completed", "properties": {"revenue": 5}},
             "properties.order_id: "),
            ("/v1/track", {"userId": "u1", "event": "x", "properties": {"blob": "x" * (33 * 1024)}}, "event: "),
            ("/v1/identify", {"userId": "u1", "traits": {"email": "nope"}}, "traits.email: "),
            ("/v1/alias", {"userId": "u1"}, "previousId: "),
            ("/v1/group", {"userId": "u1"}, "groupId: "),
            ("/v1/page", {"anonymousId": "a1", "properties": "home"}, "properties: "),
            ("/v1/batch", {"batch": {"type": "track"}}, "batch: "),
            ("/v1/batch", {"batch": [], "sentAt": "2024-06-01 10:00"}, "sentAt: "),
            ("/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "x"}] * (core.MAX_BATCH_EVENTS + 1)},
             "batch: "),
        ]
        for path, body, prefix in cases:
            status, answer = await post(http, path, body)
            assert status == 400, (path, body, answer)
            assert answer["success"] is False
            assert answer["error"].startswith(prefix), (prefix, answer)

        for raw, gzipped in [(b"{not json", False), (b"\xff\xfe", False), (b"{not json", True)]:
            status, answer = await post(http, "/v1/track", raw, gzipped=gzipped)
            assert (status, answer["success"]) == (400, False)
            assert "not JSON" in answer["error"]
        status, answer = await post(http, "/v1/track", [{"userId": "u1", "event": "x"}])
        assert (status, answer["error"]) == (400, "body must be a JSON object")

        big = {"batch": [{"type": "track", "userId": "u1", "event": "x", "properties": {"pad": "x" * 20_000}}] * 220}
        for gzipped in (False, True):
            status, answer = await post(http, "/v1/batch", big, gzipped=gzipped)
            assert status == 413 and "4 MiB" in answer["error"]

        assert await collected(suite) == []


async def test_a_batch_stores_the_good_messages_and_lists_the_rejected(start_suite) -> None:
    async with start_suite((INGEST,)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        batch = [
            {"type": "track", "messageId": "g-0", "userId": "u1", "event": "Clicked"},
            {"type": "track", "messageId": "x-1", "event": "Clicked"},
            {"type": "identify", "messageId": "g-2", "anonymousId": "a1", "traits": {"plan": "pro"}},
            {"type": "track", "messageId": "x-3", "userId": "u1", "event": "Loyalty Points Earned",
             "properties": {"points": "10"}},
            "not an object",
            {"type": "purchase", "messageId": "x-5", "userId": "u1"},
            {"type": "page", "messageId": "g-6", "anonymousId": "a1"},
        ]
        status, answer = await post(http, "/v1/batch", {"batch": batch}, gzipped=True)
        assert status == 200
        assert (answer["success"], answer["stored"]) == (True, 3)
        rejected = {r["index"]: r for r in answer["rejected"]}
        assert sorted(rejected) == [1, 3, 4, 5]
        assert rejected[1]["messageId"] == "x-1" and rejected[1]["error"].startswith("userId or anonymousId: ")
        assert rejected[3]["messageId"] == "x-3" and rejected[3]["error"].startswith("properties.points: ")
        assert rejected[4]["error"].startswith("event: ")
        assert rejected[5]["error"].startswith("type: ")

        status, answer = await post(http, "/v1/batch", {"batch": [batch[1], batch[3]]})
        assert status == 400
        assert answer["success"] is False and "no valid message" in answer["error"]
        assert [r["index"] for r in answer["rejected"]] == [0, 1]

        # Sending the same batch again (a retry) stores nothing new.
        status, answer = await post(http, "/v1/batch", {"batch": batch})
        assert (status, answer["stored"]) == (200, 3)

        log = await collected(suite)
        assert [(e.id, e.type) for e in log] == [("g-0", "track"), ("g-2", "identify"), ("g-6", "page")]
        assert traits(log[1]) == {"plan": "pro"}


async def test_write_keys_over_http(start_suite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_WRITE_KEYS", "wk-web=web,wk-crm=crm")
    track = {"type": "track", "userId": "u1", "event": "Clicked"}
    async with start_suite((INGEST,)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        for path, body, headers in [
            ("/v1/track", {**track, "messageId": "n-1"}, {}),
            ("/v1/batch", {"batch": [{**track, "messageId": "n-2"}]}, {}),
            ("/v1/batch", {"batch": [{**track, "messageId": "n-3"}]}, {"Authorization": basic_auth("wk-old")}),
            ("/v1/identify", {"userId": "u1", "messageId": "n-4", "writeKey": "wk-old"}, {}),
        ]:
            status, answer = await post(http, path, body, headers=headers)
            assert status == 401 and "write key" in answer["error"]

        status, _ = await post(http, "/v1/batch", {"batch": [{**track, "messageId": "y-1"}]},
                               headers={"Authorization": basic_auth("wk-crm")})
        assert status == 200
        status, _ = await post(http, "/v1/track", {**track, "messageId": "y-2", "writeKey": "wk-web"})
        assert status == 200
        async with http.get("/health") as resp:
            assert resp.status == 200

        assert [(e.id, e.source) for e in await collected(suite)] == [("y-1", "crm"), ("y-2", "web")]


async def test_one_message_with_an_absurd_clock_does_not_sink_the_batch(start_suite) -> None:
    async with start_suite((INGEST,)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        batch = [{"type": "track", "messageId": "ok-0", "userId": "u1", "event": "Clicked"},
                 {"type": "track", "messageId": "bad-1", "userId": "u1", "event": "Clicked",
                  "timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T00:00:00Z"}]
        status, answer = await post(http, "/v1/batch", {"batch": batch})
        assert status == 200, (status, answer)
        assert [r["index"] for r in answer["rejected"]] == [1]
        assert [e.id for e in await collected(suite)] == ["ok-0"]


async def test_a_message_with_a_non_object_context_is_rejected_not_fatal(start_suite) -> None:
    async with start_suite((INGEST,)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        batch = [{"type": "track", "messageId": "ok-0", "userId": "u1", "event": "Clicked"},
                 {"type": "track", "messageId": "bad-1", "userId": "u1", "event": "Clicked", "context": "web"}]
        status, answer = await post(http, "/v1/batch", {"batch": batch, "context": {"library": {"name": "x"}}})
        assert status == 200, (status, answer)
        assert [(r["index"], r["error"].split(":")[0]) for r in answer["rejected"]] == [(1, "context")]
        assert [e.id for e in await collected(suite)] == ["ok-0"]


# --- the real SDKs -------------------------------------------------------------------------------


def _send_all(client: Any) -> list[dict[str, Any]]:
    """The six calls through an SDK client; returns the messages it sent."""
    sent = [
        client.track("u-sdk", "Order Completed", {"order_id": "o-7", "revenue": 20.5,
                                                  "products": [{"product_id": "p1", "price": 20.5, "quantity": 1}]}),
        client.identify("u-sdk", {"email": "sdk@example.com", "plan": "pro"}),
        client.page("u-sdk", "Docs", "Install", {"path": "/install"}),
        client.screen("u-sdk", name="Settings", properties={"tab": "privacy"}),
        client.group("u-sdk", "acme", {"name": "Acme Inc"}),
        client.alias("anon-sdk", "u-sdk"),
    ]
    assert all(ok for ok, _ in sent)
    return [message for _, message in sent]


def _check_sdk_log(log: list[event_pb2.Event], sent: list[dict[str, Any]], source: str, library: str) -> None:
    assert [(e.id, e.type) for e in log] == [(m["messageId"], m["type"]) for m in sent]
    assert {e.source for e in log} == {source}
    assert all(e.identifiers.user_id == "u-sdk" for e in log)
    by_type = {e.type: e for e in log}
    assert (by_type["track"].name, props(by_type["track"])) == ("Order Completed", {
        "order_id": "o-7", "revenue": 20.5, "products": [{"product_id": "p1", "price": 20.5, "quantity": 1}]})
    assert context(by_type["track"])["library"]["name"] == library
    assert (by_type["page"].name, props(by_type["page"])) == ("Install", {"path": "/install", "category": "Docs"})
    assert (by_type["screen"].name, props(by_type["screen"])) == ("Settings", {"tab": "privacy"})
    assert props(by_type["group"]) == {"group_id": "acme", "group_traits": {"name": "Acme Inc"}}
    assert props(by_type["alias"]) == {"previous_id": "anon-sdk"}
    assert by_type["alias"].identifiers.anonymous_id == "anon-sdk"
    # The SDKs stamp each message with the client's time; the stored time is close to it.
    for event in log:
        assert abs(event.received_at.ToDatetime() - event.occurred_at.ToDatetime()) < timedelta(seconds=30)


async def test_the_segment_sdk_batches_into_the_log(start_suite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_WRITE_KEYS", "wk-web=web")
    async with start_suite((INGEST,)) as suite:
        host = suite.endpoints["http"]
        errors: list[Any] = []
        # The SDK's default mode: a consumer thread uploads gzipped batches to /v1/batch.
        client = SegmentClient(write_key="wk-web", host=host, gzip=True, upload_interval=0.05, max_retries=0,
                               on_error=lambda error, batch: errors.append((error, batch)))
        sync = SegmentClient(write_key="wk-web", host=host, gzip=True, sync_mode=True)
        wrong = SegmentClient(write_key="wk-nope", host=host, sync_mode=True)
        try:
            sent = await asyncio.to_thread(_send_all, client)
            await asyncio.to_thread(client.flush)
            assert errors == []
            _check_sdk_log(await collected(suite), sent, "web", "analytics-python")
            log = await collected(suite)
            assert traits(log[1]) == {"email": "sdk@example.com", "plan": "pro"}
            assert log[1].identifiers.email == "sdk@example.com"

            # Synchronous mode answers each call: a bad event is a 400 naming the field, a wrong key a 401.
            with pytest.raises(SegmentAPIError) as caught:
                await asyncio.to_thread(sync.track, "u-sdk", "Order Completed", {"revenue": 1})
            assert caught.value.status == 400
            assert "properties.order_id" in caught.value.message
            with pytest.raises(SegmentAPIError) as caught:
                await asyncio.to_thread(wrong.track, "u-sdk", "Clicked")
            assert caught.value.status == 401
            # A retry with the same messageId is stored once.
            ok, _ = await asyncio.to_thread(sync.track, "u-sdk", "Clicked", message_id=sent[0]["messageId"])
            assert ok
            assert len(await collected(suite)) == len(sent)
        finally:
            await asyncio.to_thread(client.shutdown)
            segment_request._session.close()


async def test_the_rudderstack_sdk_reaches_the_log(start_suite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_WRITE_KEYS", "wk-app=app")
    async with start_suite((INGEST,)) as suite:
        # RudderStack's host is the data plane URL; it gzips by default.
        client = RudderClient(write_key="wk-app", host=suite.endpoints["http"], sync_mode=True)
        try:
            sent = await asyncio.to_thread(_send_all, client)
            log = await collected(suite)
            _check_sdk_log(log, sent, "app", "analytics-python")
        finally:
            rudder_request._session.close()


async def test_the_rudderstack_sdk_reports_a_wrong_write_key(start_suite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_WRITE_KEYS", "wk-app=app")
    async with start_suite((INGEST,)) as suite:
        wrong = RudderClient(write_key="wk-nope", host=suite.endpoints["http"], sync_mode=True)
        try:
            with pytest.raises(RudderAPIError) as caught:
                await asyncio.to_thread(wrong.track, "u-sdk", "Clicked")
        finally:
            rudder_request._session.close()
        assert caught.value.status == 401
        assert await collected(suite) == []


async def test_rudderstack_identify_traits_become_user_traits(start_suite) -> None:
    async with start_suite((INGEST,)) as suite:
        client = RudderClient(write_key="any", host=suite.endpoints["http"], sync_mode=True)
        try:
            await asyncio.to_thread(client.identify, "u-r", {"email": "r@example.com", "plan": "pro"})
        finally:
            rudder_request._session.close()
        [event] = await collected(suite)
        assert traits(event) == {"email": "r@example.com", "plan": "pro"}
        assert event.identifiers.email == "r@example.com"


# --- the log unavailable -------------------------------------------------------------------------


async def test_http_answers_503_while_the_log_is_down_and_a_retry_is_stored_once(
    start_suite, tmp_path: Path, namespace: str
) -> None:
    server = infra.start_nats(tmp_path / "nats")
    message = {"messageId": "retry-me", "userId": "u1", "event": "Product Viewed"}
    try:
        async with start_suite((INGEST,), url=server.url) as suite, \
                aiohttp.ClientSession(suite.endpoints["http"]) as http:
            server.stop()

            async def refused(path: str, body: dict[str, Any]) -> str:
                async with http.post(path, json=body) as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"] == "1"
                    answer = await resp.json()
                    assert answer["success"] is False
                    return str(answer["error"])

            # Both wait out the publish timeout, together.
            errors = await asyncio.gather(refused("/v1/track", message),
                                          refused("/v1/batch", {"batch": [{**message, "type": "track"}]}))
            assert all("retry with the same event_id (messageId)" in error for error in errors)

            server = infra.start_nats(tmp_path / "nats", port=server.port)
            for _ in range(100):
                async with http.post("/v1/track", json=message) as resp:
                    if resp.status == 200:
                        break
                    assert resp.status == 503
                await asyncio.sleep(0.2)
            else:
                pytest.fail("the collector never recovered")
            # (The refused publishes may still have reached the log from the client's reconnect buffer,
            # so the first success can already be a duplicate; either way the event is there once.)
            async with http.post("/v1/track", json=message) as resp:
                assert (await resp.json())["duplicate"] is True
            nc = await nats.connect(server.url)
            try:
                info = await nc.jetstream().stream_info(eventlog.Topology(namespace).stream("collected"))
                assert info.state.messages == 1
            finally:
                await nc.close()
    finally:
        server.stop()
