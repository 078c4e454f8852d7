"""cdp_common.tracing and the envelope's trace context: when tracing is on, what a caller's
context becomes, and how derived facts and NATS headers carry it (no server)."""

from __future__ import annotations

import pytest

from cdp_common import eventlog, tracing
from cdp_common.settings import SettingsError

GIVEN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
    # An exporter named without an endpoint: nothing to send to, so off.
    ({"OTEL_TRACES_EXPORTER": "otlp"}, False),
])
def test_tracing_is_on_only_where_the_environment_names_an_otlp_endpoint(env: dict[str, str], on: bool) -> None:
    assert tracing.configured(env) is on


@pytest.mark.parametrize(("name", "value"), [
    ("OTEL_TRACES_EXPORTER", "zipkin"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
])
def test_an_exporter_or_protocol_not_shipped_stops_the_service_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", name: value})


def test_a_service_without_tracing_has_no_interceptor_and_no_middleware() -> None:
    off = tracing.Tracing("ingest", {})
    assert not off.enabled and off.interceptors == [] and off.http_middlewares == []


def test_without_a_span_the_callers_own_well_formed_context_is_passed_on() -> None:
    assert tracing.request_trace({"traceparent": GIVEN, "tracestate": "shop=1,vendor=x"}) == (GIVEN, "shop=1,vendor=x")
    assert tracing.request_trace({"traceparent": f" {GIVEN} "}) == (GIVEN, "")
    assert tracing.request_trace({}) == tracing.NO_TRACE


@pytest.mark.parametrize("bad", [
    "garbage",
    GIVEN.upper(),
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    GIVEN + "\r\nNats-Msg-Id: forged",
])
def test_a_malformed_traceparent_goes_nowhere(bad: str) -> None:
    assert tracing.request_trace({"traceparent": bad, "tracestate": "shop=1"}) == tracing.NO_TRACE


def test_a_tracestate_that_could_break_a_header_is_dropped() -> None:
    assert tracing.request_trace({"traceparent": GIVEN, "tracestate": "a=1\r\nb=2"}) == (GIVEN, "")
    assert tracing.request_trace({"traceparent": GIVEN, "tracestate": "a=" + "x" * 600}) == (GIVEN, "")


def test_derived_facts_and_their_nats_headers_carry_the_context_of_their_cause() -> None:
    cause = eventlog.new_event("track", event_id="e-1", source="web")
    tracing.stamp(cause, tracing.Trace(GIVEN, "shop=1"))
    fact = eventlog.new_event("profile_changed", event_id="e-2", source="profile", cause=cause)
    assert (fact.traceparent, fact.tracestate) == (GIVEN, "shop=1")
    headers = eventlog.Outgoing("cdp.v1.profile.3.changed", fact).headers()
    assert headers["traceparent"] == GIVEN and headers["tracestate"] == "shop=1"


def test_an_event_without_a_context_has_no_trace_headers() -> None:
    event = eventlog.new_event("track", event_id="e-1", source="web")
    tracing.stamp(event, tracing.NO_TRACE)
    fact = eventlog.new_event("profile_changed", event_id="e-2", source="profile", cause=event)
    assert fact.traceparent == ""
    assert not {"traceparent", "tracestate"} & eventlog.Outgoing("s", fact).headers().keys()
