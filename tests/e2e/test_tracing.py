"""One ingested event followed through every service: OpenTelemetry spans to an OTLP/HTTP receiver,
and the W3C trace context in the envelope and the NATS headers (with tracing off too)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from cdp.activation.v1 import activation_pb2
from cdp.ingest.v1 import ingest_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog
from cdp_identity.main import DEFINITION as IDENTITY
from cdp_ingest.main import DEFINITION as INGEST

pytestmark = pytest.mark.timeout(90)

OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER",
                  "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                  "OTEL_TRACES_SAMPLER")
CALLER_SPAN = "00f067aa0ba902b7"
SERVER, CONSUMER = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CONSUMER


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{CALLER_SPAN}-01"


@dataclass(frozen=True)
class Received:
    service: str
    span: trace_pb2.Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    def attribute(self, name: str) -> Any:
        for kv in self.span.attributes:
            if kv.key == name:
                return getattr(kv.value, kv.value.WhichOneof("value"))
        return None


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint (what a collector listens on at :4318), keeping what it gets."""

    url: str = ""
    spans: list[Received] = field(default_factory=list)

    async def export(self, request: web.Request) -> web.Response:
        exported = trace_service_pb2.ExportTraceServiceRequest()
        exported.ParseFromString(await request.read())
        for resource_spans in exported.resource_spans:
            service = next(
                (kv.value.string_value for kv in resource_spans.resource.attributes if kv.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(Received(service, span) for span in scope_spans.spans)
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def of(self, trace_id: str) -> list[Received]:
        return [r for r in self.spans if r.trace_id == trace_id]

    async def wait_for(self, trace_id: str, names: set[str], timeout: float = 20.0) -> dict[str, Received]:
        """The spans of one trace by name, once all the named ones have arrived."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            got = {r.span.name: r for r in self.of(trace_id)}
            if names <= got.keys() or asyncio.get_running_loop().time() > deadline:
                assert names <= got.keys(), f"missing spans {names - got.keys()}; got {sorted(got)}"
                return got
            await asyncio.sleep(0.1)


@pytest.fixture
async def otlp() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}"
    yield receiver
    await runner.cleanup()


@pytest.fixture
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def order(event_id: str, user_id: str) -> ingest_pb2.TrackRequest:
    return ingest_pb2.TrackRequest(
        event_id=event_id, event="Order Completed",
        identifiers=event_pb2.Identifiers(user_id=user_id, email=f"{user_id}@example.com"),
        properties=convert.dict_to_struct({"order_id": f"o-{event_id}", "revenue": 20.0}),
    )


async def stream_messages(suite: Any, area: str) -> list[Any]:
    stream = suite.topology.stream(area)
    state = (await suite.js.stream_info(stream)).state
    if not state.messages:
        return []
    return [await suite.js.get_msg(stream, seq) for seq in range(state.first_seq, state.last_seq + 1)]


async def test_one_event_is_followed_from_the_call_through_every_service(
    start_suite: Any, monkeypatch: pytest.MonkeyPatch, no_otel_environment: None, otlp: Receiver, smtp: Any
) -> None:
    inbox, _ = smtp
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    grpc_trace, http_trace, import_trace = "4bf92f3577b34da6a3ce929d0e0e4736", "a" * 32, "b" * 32
    async with start_suite() as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        await suite.segmentation.PutSegment(segmentation_pb2.Segment(
            id="buyers", name="Buyers", conditions=[segmentation_pb2.Condition(field="order_count", op="gte", value="1")],
        ))
        await suite.activation.PutCampaign(activation_pb2.Campaign(
            id="thanks", segment_id="buyers", from_address="shop@example.com",
            subject_template="Thanks", body_template="Thank you for your order.",
        ))
        stored = await suite.ingest.Track(
            order("e-grpc", "u-1"), metadata=(("traceparent", traceparent(grpc_trace)), ("tracestate", "shop=1")),
        )
        async with http.post("/v1/track", json={"messageId": "e-http", "userId": "u-2", "event": "Product Viewed"},
                             headers={"traceparent": traceparent(http_trace)}) as answer:
            assert answer.status == 200
        results = [r async for r in suite.ingest.Import(
            iter([ingest_pb2.BatchItem(track=order("e-import", "u-3"))]),
            metadata=(("traceparent", traceparent(import_trace)),),
        )]
        assert [r.code for r in results] == [0]
        await suite.settle()

        spans = await otlp.wait_for(grpc_trace, {
            "cdp.ingest.v1.IngestService/Track", "identity-resolve track", "profile-project track",
            "segmentation-evaluate profile_changed", "activation-trigger segment_entered",
            "dmp-identities profile_changed", "dmp-audiences segment_entered",
        })
        rpc = spans["cdp.ingest.v1.IngestService/Track"]
        assert (rpc.service, rpc.span.kind, rpc.parent_id) == ("cdp-ingest", SERVER, CALLER_SPAN)
        assert rpc.attribute("rpc.grpc.status_code") == 0
        services = {name: (r.service, r.span.kind) for name, r in spans.items() if r.span.kind == CONSUMER}
        assert services == {
            "identity-resolve track": ("cdp-identity", CONSUMER),
            "profile-project track": ("cdp-profile", CONSUMER),
            "segmentation-evaluate profile_changed": ("cdp-segmentation", CONSUMER),
            "activation-trigger segment_entered": ("cdp-activation", CONSUMER),
            "dmp-identities profile_changed": ("cdp-dmp-bridge", CONSUMER),
            "dmp-audiences segment_entered": ("cdp-dmp-bridge", CONSUMER),
        }
        # Every fact derived from the event carries the context ingest stamped on it: the consumers'
        # spans are children of the ingest call's span, each timed over the batch that applied it.
        for name in services:
            assert spans[name].parent_id == rpc.span_id, name
            assert spans[name].span.start_time_unix_nano <= spans[name].span.end_time_unix_nano
        identity = spans["identity-resolve track"]
        assert identity.attribute("messaging.message.id") == "e-grpc"
        assert identity.attribute("cdp.stream.sequence") == stored.stream_sequence
        profile = spans["profile-project track"]
        assert profile.attribute("cdp.profile_id") and profile.attribute("cdp.event.type") == "track"
        assert "u-1@example.com" in [m["To"] for m in inbox.messages]

        # The HTTP collector and a streamed Import do the same with their callers' contexts.
        http_spans = await otlp.wait_for(http_trace, {"POST /v1/track", "identity-resolve track"})
        assert http_spans["POST /v1/track"].parent_id == CALLER_SPAN
        assert http_spans["identity-resolve track"].parent_id == http_spans["POST /v1/track"].span_id
        import_spans = await otlp.wait_for(import_trace, {"cdp.ingest.v1.IngestService/Import", "identity-resolve track"})
        assert import_spans["identity-resolve track"].parent_id == import_spans[
            "cdp.ingest.v1.IngestService/Import"].span_id

        # Any system reading the log follows the same trace from the NATS headers alone.
        for area in ("collected", "identity", "profile", "segment"):
            ours = [m for m in await stream_messages(suite, area) if grpc_trace in (m.headers or {}).get("traceparent", "")]
            assert ours, area
            for message in ours:
                assert message.headers["traceparent"] == f"00-{grpc_trace}-{rpc.span_id}-01"
                assert message.headers["tracestate"] == "shop=1"
                assert eventlog.decode(message.data).traceparent == message.headers["traceparent"]
    # The calls that came without a trace context began their own; health checks make no spans.
    others = {r.span.name for r in otlp.spans if r.trace_id not in (grpc_trace, http_trace, import_trace)}
    assert others == {"cdp.segmentation.v1.SegmentationService/PutSegment",
                      "cdp.activation.v1.ActivationService/PutCampaign"}


async def test_without_tracing_the_callers_trace_context_reaches_the_log_unchanged(
    start_suite: Any, no_otel_environment: None
) -> None:
    given = traceparent("4bf92f3577b34da6a3ce929d0e0e4736")
    async with start_suite((INGEST, IDENTITY)) as suite, aiohttp.ClientSession(suite.endpoints["http"]) as http:
        await suite.ingest.Track(order("e-1", "u-1"), metadata=(("traceparent", given), ("tracestate", "shop=1")))
        async with http.post("/v1/track", json={"messageId": "e-2", "userId": "u-2", "event": "Product Viewed"},
                             headers={"traceparent": given}) as answer:
            assert answer.status == 200
        # Not a W3C traceparent: nothing of it goes into the log or the NATS headers.
        await suite.ingest.Track(order("e-3", "u-3"), metadata=(("traceparent", "00-not-a-trace-context-01"),))
        await suite.ingest.Track(order("e-4", "u-4"))
        await suite.settle()

        collected = {m.headers["Nats-Msg-Id"]: m for m in await stream_messages(suite, "collected")}
        assert collected["e-1"].headers["traceparent"] == given
        assert collected["e-1"].headers["tracestate"] == "shop=1"
        assert collected["e-2"].headers["traceparent"] == given
        assert "tracestate" not in collected["e-2"].headers
        for unstamped in ("e-3", "e-4"):
            assert "traceparent" not in collected[unstamped].headers
            assert eventlog.decode(collected[unstamped].data).traceparent == ""
        resolved = {eventlog.decode(m.data).id: m for m in await stream_messages(suite, "identity")}
        assert resolved["e-1"].headers["traceparent"] == given
        assert eventlog.decode(resolved["e-1"].data).tracestate == "shop=1"
