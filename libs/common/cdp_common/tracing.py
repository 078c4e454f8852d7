"""OpenTelemetry tracing: one ingested event followed from the call that sent it to every consumer.

The W3C trace context travels in the envelope (`Event.traceparent`, `Event.tracestate`, carried on
by every fact derived from the event) and as the NATS headers of the same names. Tracing is on
only where the standard OpenTelemetry environment names an OTLP endpoint
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); then each service has its
own SDK tracer provider (service.name `cdp-<service>`, so services sharing a process, as in the
tests, stay apart) exporting over OTLP/HTTP, a server span per RPC and HTTP request, and a consumer
span per handled event. Otherwise the SDK is not even imported, and a caller's own `traceparent`
is still stamped on its events unchanged, for whatever else follows the log.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import structlog
from aiohttp import web
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cdp.v1 import event_pb2
from cdp_common import eventlog, rpc
from cdp_common.settings import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from cdp_common.consumer import Consumer

log = structlog.get_logger("cdp.tracing")

TRACEPARENT = eventlog.TRACEPARENT_HEADER
TRACESTATE = eventlog.TRACESTATE_HEADER

_PROPAGATOR = TraceContextTextMapPropagator()
# Version 00, lower-case hex, ids not all zero (as OpenTelemetry's own parser): with tracing off a
# caller's header is copied into the log and into NATS headers as it is, so only a well-formed one is.
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
# Printable ASCII (no line breaks) and bounded: the W3C limit is 32 list members.
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")
# Probes and tools, not work: a span per Kubernetes health check would bury the traces.
_UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# gRPC codes that are the server's failure (OpenTelemetry's semantic conventions for RPC spans).
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


class Trace(NamedTuple):
    """The W3C trace context stamped on events (empty strings: none)."""

    traceparent: str = ""
    tracestate: str = ""


NO_TRACE = Trace()
_KEYS = (TRACEPARENT, TRACESTATE)


def configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the OpenTelemetry environment asks for traces; raises SettingsError for an exporter
    or protocol this project does not ship (only OTLP over HTTP/protobuf)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter == "none":
        return False
    if not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return False
    if exporter != "otlp":
        raise SettingsError(f"environment variable OTEL_TRACES_EXPORTER: only otlp or none, not {exporter!r}")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise SettingsError(f"environment variable {name}: only http/protobuf, not {protocol!r}")
            break
    return True


def request_trace(carrier: Mapping[str, str]) -> Trace:
    """The trace context for the events a request produces: its span's while tracing is on, else
    the caller's own `traceparent`/`tracestate` (from gRPC metadata or HTTP headers) if well-formed."""
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        injected: dict[str, str] = {}
        _PROPAGATOR.inject(injected)
        return Trace(injected.get(TRACEPARENT, ""), injected.get(TRACESTATE, ""))
    traceparent = carrier.get(TRACEPARENT)
    if not traceparent:
        return NO_TRACE
    traceparent = traceparent.strip()
    if not _TRACEPARENT.fullmatch(traceparent):
        return NO_TRACE
    tracestate = (carrier.get(TRACESTATE) or "").strip()
    return Trace(traceparent, tracestate if _TRACESTATE.fullmatch(tracestate) else "")


def stamp(event: event_pb2.Event, context: Trace) -> None:
    """Puts a request's trace context on an event it produced."""
    if context.traceparent:
        event.traceparent = context.traceparent
        event.tracestate = context.tracestate


def grpc_trace(context: grpc.aio.ServicerContext[Any, Any]) -> Trace:
    """`request_trace` of a gRPC call."""
    # Only `-bin` keys carry bytes values: the trace keys are always text.
    metadata = context.invocation_metadata() or ()
    return request_trace({key: value for key, value in metadata if key in _KEYS and isinstance(value, str)})


class Tracing:
    """One service's tracing: its tracer provider (none when off), the gRPC interceptor, the HTTP
    middleware and the consumers' spans."""

    def __init__(self, service: str, env: Mapping[str, str] = os.environ) -> None:
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        if not configured(env):
            return
        # Imported here: a service without tracing never loads the SDK.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # The sampler (OTEL_TRACES_SAMPLER), the batching (OTEL_BSP_*) and the exporter's endpoint,
        # headers and timeout come from the standard environment; `running` shuts it down (flushes).
        provider = TracerProvider(
            resource=Resource.create({"service.name": f"cdp-{service}"}), shutdown_on_exit=False
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._provider = provider
        self._tracer = provider.get_tracer("cdp")
        log.info("tracing_on", service_name=f"cdp-{service}",
                 endpoint=env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """A server span per RPC; none when tracing is off (so it costs the calls nothing)."""
        if not self.enabled:
            return []
        tracer = self._tracer
        return [rpc.ObservingInterceptor(
            lambda method: None if method.startswith(_UNTRACED) else _RpcSpans(tracer, method)
        )]

    @property
    def http_middlewares(self) -> list[Any]:
        """A server span per HTTP request (ingest's collector); none when tracing is off."""
        return [_http_spans(self._tracer)] if self.enabled else []

    def watch(self, consumers: Sequence[Consumer]) -> None:
        """A consumer span per handled event that carries a trace context, made after its batch commits."""
        if not self.enabled:
            return
        for consumer in consumers:
            consumer.on_applied = _ConsumerSpans(self._tracer, consumer.spec.durable).record

    async def shutdown(self) -> None:
        """Exports what is still buffered (the exporter's HTTP is blocking: off the event loop)."""
        provider, self._provider = self._provider, None
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)


class _ConsumerSpans:
    """`<durable> <event type>` spans, children of each event's trace context, timed over its batch."""

    def __init__(self, tracer: trace.Tracer, durable: str) -> None:
        self._tracer = tracer
        self._durable = durable

    def record(self, msgs: Sequence[Msg], started: float) -> None:
        # Made after the commit with explicit times, so the transaction is not made any longer.
        end = time.time_ns()
        start = end - int((time.perf_counter() - started) * 1e9)
        try:
            for msg in msgs:
                headers = msg.headers
                if headers and headers.get(TRACEPARENT):
                    self._span(msg, headers, len(msgs), start, end)
        except Exception as error:  # noqa: BLE001 - tracing must never fail the consumer
            log.warning("consumer_spans_failed", consumer=self._durable, error=repr(error))

    def _span(self, msg: Msg, headers: dict[str, str], batch: int, start: int, end: int) -> None:
        event_type = headers.get(eventlog.TYPE_HEADER, "")
        span = self._tracer.start_span(
            f"{self._durable} {event_type}",
            context=_PROPAGATOR.extract(headers),
            kind=trace.SpanKind.CONSUMER,
            start_time=start,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.consumer.group.name": self._durable,
                "messaging.destination.name": msg.subject,
                "messaging.message.id": headers.get(eventlog.MSG_ID_HEADER, ""),
                "messaging.batch.message_count": batch,
                "cdp.event.type": event_type,
                "cdp.stream.sequence": msg.metadata.sequence.stream,
                "cdp.correlation_id": headers.get(eventlog.CORRELATION_HEADER, ""),
            },
        )
        if span.is_recording():
            try:
                profile_id = eventlog.decode(msg.data).profile_id
            except Exception:  # noqa: BLE001 - the consumer dead-lettered it; the span still tells
                profile_id = ""
            if profile_id:
                span.set_attribute("cdp.profile_id", profile_id)
        span.end(end_time=end)


class _RpcSpans:
    """A server span per call of one method, current while the servicer runs (so `request_trace`
    stamps its events with it), a child of the caller's `traceparent` metadata."""

    def __init__(self, tracer: trace.Tracer, method: str) -> None:
        self._tracer = tracer
        self._name = method.lstrip("/")
        service, _, name = self._name.rpartition("/")
        self._attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[trace.Span, Any]:
        carrier = {key: value for key, value in context.invocation_metadata() or () if key in _KEYS}
        span = self._tracer.start_span(
            self._name, context=_PROPAGATOR.extract(carrier), kind=trace.SpanKind.SERVER,
            attributes=self._attributes,
        )
        current = trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)
        current.__enter__()
        return span, current

    def end(self, started: tuple[trace.Span, Any], context: grpc.aio.ServicerContext[Any, Any],
            error: BaseException | None) -> None:
        span, current = started
        current.__exit__(None, None, None)
        code = rpc.call_status(context, error)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code.name in _SERVER_ERRORS:
            span.set_status(trace.StatusCode.ERROR, code.name)
        span.end()


def _http_spans(tracer: trace.Tracer) -> Any:
    @web.middleware
    async def spans(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        carrier = {key: request.headers[key] for key in _KEYS if key in request.headers}
        # The route, not the path, names the span: span names must not grow with what clients send.
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        span = tracer.start_span(
            f"{request.method} {route}".strip(), context=_PROPAGATOR.extract(carrier), kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route, "url.path": request.path},
        )
        status = 500
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as answered:
            status = answered.status
            raise
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(trace.StatusCode.ERROR)
            span.end()

    return spans
