"""Hostile input against every public gRPC method and HTTP collector endpoint.

Requests are generated from the protos themselves (every field of every request message, nested
messages, maps, repeated fields, Struct and Timestamp) with values that mix random data with known
trouble: empty, junk and injection strings, strings of 100 KiB to 5 MiB, deeply nested JSON,
extreme numbers and timestamps, and values near each service's real ones (known profile ids,
operators, field names), so that the deeper paths are reached too: random requests (hypothesis), a
sweep that spoils one field of a valid request at a time with each hostile value of its kind, and
bytes that are no request at all. The HTTP collector gets garbage and wrong-typed JSON, deep
nesting, broken and bomb gzip, odd content types and bad credentials.

Only clean outcomes are accepted: a gRPC status a client can act on (never UNKNOWN or INTERNAL),
HTTP 2xx/4xx with a JSON body (never 5xx), the service still SERVING afterwards, and nothing
half-written: a refused write leaves the collected log, the segments and the campaigns as they were,
and what was accepted is applied downstream (the last test reads the dead letters).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import io
import json
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.activation.v1 import activation_pb2
from cdp.dmp.v1 import dmp_pb2
from cdp.identity.v1 import identity_pb2
from cdp.ingest.v1 import ingest_pb2
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog, identifiers

pytestmark = pytest.mark.timeout(300)

WRITE_KEY = "wk_fuzz"
AUTH = (("x-write-key", WRITE_KEY),)
CALL_TIMEOUT = 20.0

S = grpc.StatusCode
CLEAN = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED,
         S.UNAUTHENTICATED, S.OUT_OF_RANGE}
# Documented outcomes of an operator's merge or split racing the resolver.
RACES = {S.ABORTED, S.DEADLINE_EXCEEDED}

SERVICES: dict[str, pbd.ServiceDescriptor] = {
    "ingest": ingest_pb2.DESCRIPTOR.services_by_name["IngestService"],
    "identity": identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
    "profile": profile_pb2.DESCRIPTOR.services_by_name["ProfileService"],
    "segmentation": segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"],
    "activation": activation_pb2.DESCRIPTOR.services_by_name["ActivationService"],
    "dmp-bridge": dmp_pb2.DESCRIPTOR.services_by_name["DmpBridgeService"],
}
# Every public method but profile's Rebuild (an operator's whole-read-model job, no input).
METHODS = [(service, method.name) for service, descriptor in SERVICES.items() for method in descriptor.methods
           if method.name != "Rebuild"]
WRITES = {"Track", "Identify", "Alias", "Page", "Screen", "Group", "Batch", "Import", "Merge", "Split",
          "ImportConversions"}

# Built once: generating megabytes per example would spend the time budget on the generator.
HUGE = {size: "x" * size for size in (257, 5_000, 100 * 1024, 1024 * 1024, 5 * 1024 * 1024)}
DEEP_JSON = "[" * 50_000 + "]" * 50_000
DEEP_OBJECT = '{"a":' * 20_000 + "1" + "}" * 20_000
DEEP_TEMPLATE = "{{ " + "(" * 5_000 + "1" + ")" * 5_000 + " }}"
HOSTILE_TEXT = [
    "", " ", "\t\n", "\x00", "\x00abc", "null", "None", "undefined", "-1", "0", "0000", "anonymous", "NaN",
    "' OR '1'='1", "'; DROP TABLE profiles; --", "%s%s%n", "{{7*7}}", "${jndi:ldap://x/a}", "../../../etc/passwd",
    "\u202eevil", "\r\nX-Injected: 1", "é" * 300, "😀" * 300, "\ufeff", "a.b.c", "*", ">", "cdp.v1.collected.>",
    DEEP_JSON, DEEP_OBJECT, DEEP_TEMPLATE, HUGE[257], HUGE[5_000], HUGE[100 * 1024],
]
TEMPLATES = [
    "Hi {{ traits.first_name }}", "{{", "{% for %}", "{% endfor %}", DEEP_TEMPLATE,
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% include '/etc/passwd' %}", "{{ range(10**6)|list }}",
    "{% macro x() %}{{ x() }}{% endmacro %}{{ x() }}", "{{ " + "[" * 3_000 + "]" * 3_000 + " }}",
]
JSON_LITERALS = [
    '"gold"', "1", "1.5", "-0", "1e400", "-1e400", "NaN", "Infinity", "null", "true", "[1, 2]", '{"a": 1}',
    '"2024-01-01T00:00:00Z"', '"not a date"', "1" * 5_000, '"' + "x" * 10_000 + '"', DEEP_JSON, DEEP_OBJECT,
    "[" * 500 + "]" * 500, "", " ", "'single'", '"a\\u0000b"',
]
FIELDS = [
    "traits.plan", "traits", "traits.", "traits..x", "traits.a.b.c.d.e.f", "order_count", "revenue", "aov",
    "last_order_at", "days_since_last_order", "consents.email.marketing", "consents.", "consents.email",
    "lifecycle_stage", "rfm_cell", "churn_risk", "next_best_offer", "nope", "traits.' OR 1=1 --",
    "traits.$.x", "traits.{x}", "traits.\x00", "traits." + "x" * 5_000, "traits." + ".".join("a" * 300),
]
ID_TYPES = [*identifiers.TYPES, "email_sha256", "loyalty_id", "crm_id", "", "User_Id", "bad type", "x" * 300]


def sha(text: str) -> str:
    return identifiers.email_sha256(text)


def conversions(*rows: str, header: str = "conversion_id,email_sha256,event,value,currency,occurred_at") -> bytes:
    return "\n".join([header, *rows]).encode()


NOW = eventlog.now().isoformat()
CSVS = [
    b"", b"\xff\xfe\x00", b"\x00" * 100, b"a,b,c\n1,2,3", conversions(),
    conversions(f"c-1,{sha('ada@example.com')},Order Completed,10,EUR,{NOW}"),
    conversions(f"c-2,{sha('x@example.com')},Order Completed,-5,EUR,{NOW}"),
    conversions(f"c-3,{sha('x@example.com')},Order Completed,1e400,EUR,{NOW}"),
    conversions(f"c-4,{sha('x@example.com')},Order Completed,NaN,EUR,{NOW}"),
    conversions(f"c-5,nothex,Order Completed,1,EUR,{NOW}"),
    conversions(f"c-6,{sha('x@example.com')},Order Completed,1,EURO,{NOW}"),
    conversions(f"c-7,{sha('x@example.com')},Order Completed,1,EUR,not a time"),
    conversions(f"c-8,{sha('x@example.com')},Order Completed,1,EUR,9999-12-31T23:59:59Z"),
    conversions(f"c-9,{sha('x@example.com')},Order Completed,1,EUR,0001-01-01T00:00:00Z"),
    conversions(f"c-10,{sha('x@example.com')},{'E' * 100_000},1,EUR,{NOW}"),
    conversions(f'"c-11,{sha("x@example.com")},Order Completed,1,EUR,{NOW}'),
    conversions(f"{'c' * 101},{sha('x@example.com')},Order Completed,1,EUR,{NOW}"),
    conversions(f"c-12,{sha('x@example.com')},Order Completed,1,EUR,{NOW},extra,columns"),
    conversions(f"c-13,{sha('x@example.com')}"),
    conversions(f"c-14,{sha('x@example.com')},Order Completed,1,EUR,{NOW}", f"c-15,bad,x,1,EUR,{NOW}"),
    conversions(*[f"c-r{i},{sha(f'r{i}@example.com')},Order Completed,1,EUR,{NOW}" for i in range(500)]),
    ("conversion_id,email_sha256,event,value,currency,occurred_at\n" + "x" * (3 * 1024 * 1024)).encode(),
    b"\xef\xbb\xbf" + conversions(f"c-16,{sha('x@example.com')},Order Completed,1,EUR,{NOW}"),
    conversions(f"c-17,{sha('x@example.com')},Order Completed,1,EUR,{NOW}").replace(b"\n", b"\r"),
]


def page_token(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


# Values near the real ones, by field name: they get past the first checks to the deeper paths.
# Filled in with the suite's real ids once it has data (see `known`).
NEAR: dict[str, list[Any]] = {
    "event_id": ["e-1", "dup-1", "a" * 128, "a" * 129, "bad id!", "ev:1.2-3_4"],
    "user_id": ["u-1", "u-2", "null", "-1", "0000"], "anonymous_id": ["anon-1", "anonymous", "a-2"],
    "email": ["ada@example.com", "ADA@Example.com ", "not-an-email", "@", "a@b"],
    "phone": ["+14155550100", "+1", "0000000", "phone", "+" + "9" * 40], "device_id": ["d-1", "-1"],
    "type": ID_TYPES + ["track", "identify", "Track"], "value": JSON_LITERALS + ["u-1", "ada@example.com"],
    "field": FIELDS, "op": ["eq", "neq", "gt", "gte", "lt", "lte", "exists", "contains", "EQ", "like", "= "],
    "id": ["seg-a", "camp-a", "UPPER", "a" * 63, "a" * 64, "bad id", "-x"], "name": ["VIP", "Order Completed"],
    "event": ["Order Completed", "Product Viewed", "Order Refunded", "Email Opened"],
    "segment_id": ["known-segment", "nope", "seg-a"], "channel": ["email", "sms", "EMAIL", "push"],
    "from_address": ["shop@example.com", "not-an-email", "a@b", "a b@c d"],
    "subject_template": TEMPLATES, "body_template": TEMPLATES, "csv": CSVS,
    "platform": ["meta", "google", "tradedesk", "Meta", "a" * 42, "x/y"],
    "page_token": [page_token(p) for p in (["not a time", "e"], ["2024-01-01T00:00:00", 1], [1, 2, 3], {"a": 1},
                                           "x", None, ["9999-12-31T23:59:59+00:00", "e"], [[], {}])]
    + ["!!!", "e30=", base64.urlsafe_b64encode(b"\xff\xfe").decode(), "a" * 10_000],
    "profile_id": ["nope", "00000000-0000-0000-0000-000000000000"], "survivor_id": ["nope"],
    "profile_ids": ["nope"], "previous_id": ["u-1", "anon-1"], "group_id": ["g-1"], "reason": ["test"],
    "source": ["web", "crm"], "category": ["Docs"],
}
# Extremes of each integer width, and of Timestamp's own fields (valid range 0001-9999, nanos < 1e9).
INT_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10**9, 253402300800, -62135596801]


def _int_range(field: pbd.FieldDescriptor) -> tuple[int, int]:
    fd = pbd.FieldDescriptor
    if field.type in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32, fd.TYPE_ENUM):
        return -(2**31), 2**31 - 1
    if field.type in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        return 0, 2**32 - 1
    if field.type in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
        return 0, 2**64 - 1
    return -(2**63), 2**63 - 1


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), st.sampled_from(HOSTILE_TEXT[:30]),
    )
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["", "a", "revenue", "order_id", "x" * 300,
                                                                      "\x00", "$where", "a.b"]), inner, max_size=4),
    ), max_leaves=12)


def deep_struct(levels: int) -> Struct:
    """A Struct nested `levels` deep, past what JSON or protobuf parsers recurse into by default."""
    inner = Value(string_value="bottom")
    for _ in range(levels):
        outer = Value()
        outer.struct_value.fields["a"].CopyFrom(inner)
        inner = outer
    result = Struct()
    result.fields["deep"].CopyFrom(inner)
    return result


def struct_values() -> st.SearchStrategy[Struct]:
    plain = json_values().map(lambda v: convert.dict_to_struct(v if isinstance(v, dict) else {"v": v}))
    special = st.sampled_from([
        deep_struct(20), deep_struct(30),
        convert.dict_to_struct({"revenue": 1e308, "order_id": "o-1", "currency": "EUR"}),
        convert.dict_to_struct({"revenue": "lots", "order_id": 5, "products": "none"}),
        convert.dict_to_struct({"big": HUGE[100 * 1024]}),
        convert.dict_to_struct({f"k{i}": i for i in range(600)}),
    ])
    nan = st.just(None).map(lambda _: _struct_with_float(float("nan")))
    return st.one_of(plain, special, nan, st.just(None).map(lambda _: _struct_with_float(float("inf"))))


def _struct_with_float(number: float) -> Struct:
    result = Struct()
    result.fields["revenue"].number_value = number
    return result


def timestamps() -> st.SearchStrategy[Timestamp]:
    seconds = st.one_of(st.sampled_from(INT_EDGES), st.integers(-(2**63), 2**63 - 1),
                        st.integers(0, 2_000_000_000))
    nanos = st.one_of(st.sampled_from([0, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31)]),
                      st.integers(0, 999_999_999))
    return st.builds(lambda s, n: Timestamp(seconds=s, nanos=n), seconds, nanos)


def texts(name: str) -> st.SearchStrategy[str]:
    parts = [st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), st.sampled_from(HOSTILE_TEXT)]
    if name in NEAR and all(isinstance(v, str) for v in NEAR[name]):
        parts.append(st.sampled_from(NEAR[name]))
        parts.append(st.sampled_from(NEAR[name]))
    return st.one_of(*parts)


def scalar(field: pbd.FieldDescriptor) -> st.SearchStrategy[Any]:
    fd = pbd.FieldDescriptor
    if field.type == fd.TYPE_STRING:
        return texts(field.name)
    if field.type == fd.TYPE_BYTES:
        near = [v for v in NEAR.get(field.name, []) if isinstance(v, bytes)]
        return st.one_of(st.binary(max_size=200), st.sampled_from(near)) if near else st.binary(max_size=200)
    if field.type == fd.TYPE_BOOL:
        return st.booleans()
    if field.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return st.floats(width=32 if field.type == fd.TYPE_FLOAT else 64)
    low, high = _int_range(field)
    return st.one_of(st.integers(low, high), st.sampled_from([v for v in INT_EDGES if low <= v <= high]))


def messages(descriptor: pbd.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Struct":
        return struct_values()
    if descriptor.full_name == "google.protobuf.Timestamp":
        return timestamps()

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
        message = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            value_type = field.message_type
            if value_type is not None and value_type.GetOptions().map_entry:
                key, value = value_type.fields_by_name["key"], value_type.fields_by_name["value"]
                entries = draw(st.dictionaries(scalar(key), _value(value, depth), max_size=4))
                target = getattr(message, field.name)
                for k, v in entries.items():
                    if isinstance(v, Message):
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif field.is_repeated:
                if value_type is not None and depth >= 3:
                    continue
                items = draw(st.lists(_value(field, depth), max_size=4))
                target = getattr(message, field.name)
                for item in items:
                    if isinstance(item, Message):
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
            elif value_type is not None:
                if depth < 3:
                    getattr(message, field.name).CopyFrom(draw(messages(value_type, depth + 1)))
            else:
                setattr(message, field.name, draw(scalar(field)))
        return message

    return build()


def _value(field: pbd.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    return messages(field.message_type, depth + 1) if field.message_type is not None else scalar(field)


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def stub(channel: Any, service: str, method: str) -> Any:
    """A generic stub (async or sync channel) that also sends raw bytes as they are."""
    descriptor = SERVICES[service].methods_by_name[method]
    path = f"/{SERVICES[service].full_name}/{method}"
    response = message_factory.GetMessageClass(descriptor.output_type)
    if descriptor.client_streaming:
        return channel.stream_stream(path, request_serializer=_serialize, response_deserializer=response.FromString)
    return channel.unary_unary(path, request_serializer=_serialize, response_deserializer=response.FromString)


async def serving(suite: Any, service: str) -> bool:
    health = health_pb2_grpc.HealthStub(suite.channels[service])
    answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICES[service].full_name), timeout=10)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def collected_count(suite: Any) -> int:
    return int((await suite.js.stream_info(suite.topology.stream("collected"))).state.messages)


async def segments(suite: Any) -> list[bytes]:
    call = stub(suite.channels["segmentation"], "segmentation", "ListSegments")
    listed = await call(segmentation_pb2.ListSegmentsRequest(), timeout=CALL_TIMEOUT)
    return sorted(s.SerializeToString(deterministic=True) for s in listed.segments)


async def campaigns(suite: Any) -> list[tuple[str, ...]]:
    call = stub(suite.channels["activation"], "activation", "ListCampaigns")
    listed = await call(activation_pb2.ListCampaignsRequest(), timeout=CALL_TIMEOUT)
    return sorted((c.id, c.segment_id, c.channel, c.from_address, c.subject_template, c.body_template)
                  for c in listed.campaigns)


def track(event_id: str, **ids: str) -> ingest_pb2.TrackRequest:
    return ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(**ids), event="Order Completed",
        properties=convert.dict_to_struct({"order_id": f"o-{event_id}", "revenue": 20.0, "currency": "EUR"}),
    )


@pytest.fixture(scope="module")
async def known(suite: Any) -> list[str]:
    """Real data for the hostile values to hit: two customers, an anonymous visitor, a segment."""
    ingest = stub(suite.channels["ingest"], "ingest", "Track")
    await ingest(track("seed-1", user_id="u-1", email="ada@example.com"), metadata=AUTH, timeout=CALL_TIMEOUT)
    await ingest(track("seed-2", user_id="u-2"), metadata=AUTH, timeout=CALL_TIMEOUT)
    await ingest(track("seed-3", anonymous_id="anon-1"), metadata=AUTH, timeout=CALL_TIMEOUT)
    put = stub(suite.channels["segmentation"], "segmentation", "PutSegment")
    await put(segmentation_pb2.Segment(id="known-segment", name="Buyers", conditions=[
        segmentation_pb2.Condition(field="order_count", op="gte", value="1")]), timeout=CALL_TIMEOUT)
    await suite.settle()
    resolve = stub(suite.channels["identity"], "identity", "Resolve")
    ids = []
    for id_type, value in (("user_id", "u-1"), ("user_id", "u-2"), ("anonymous_id", "anon-1")):
        answer = await resolve(identity_pb2.ResolveRequest(identifier=event_pb2.Identifier(type=id_type, value=value)),
                               timeout=CALL_TIMEOUT)
        ids.append(answer.profile_id)
    for name in ("profile_id", "survivor_id", "profile_ids"):
        NEAR[name] = [*ids, *NEAR[name]]
    return ids


@pytest.fixture(scope="module")
def sync_ingest(suite: Any) -> Any:
    """Import is called from a thread with the sync client: the asyncio client replaces the status of
    a stream the server ended early (e.g. UNAUTHENTICATED) with INTERNAL (grpc/grpc#36066)."""
    channel = grpc.insecure_channel(suite.addresses["ingest"])
    yield channel
    channel.close()


def _results_stored(method: str, answer: Any) -> int:
    """How many new events an OK answer says were appended to the collected log."""
    if method == "Batch":
        return sum(1 for r in answer.results if r.code == 0 and not r.duplicate)
    if method == "Import":
        return sum(1 for r in answer if r.code == 0 and not r.duplicate)
    if method == "ImportConversions":
        return int(answer.appended)
    if method in ("Merge", "Split"):
        return 1
    if method in WRITES:
        return 0 if answer.duplicate else 1
    return 0


async def _call(suite: Any, sync: Any, service: str, method: str, request: Any,
                metadata: Any) -> tuple[grpc.StatusCode, Any]:
    if method == "Import":
        call = stub(sync, service, method)

        def streamed() -> tuple[grpc.StatusCode, Any]:
            try:
                return S.OK, list(call(iter(request), metadata=metadata, timeout=CALL_TIMEOUT))
            except grpc.RpcError as error:
                return error.code(), error.details()

        return await asyncio.to_thread(streamed)
    try:
        return S.OK, await stub(suite.channels[service], service, method)(request, metadata=metadata,
                                                                           timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()


async def check_call(suite: Any, sync: Any, service: str, method: str, request: Any, metadata: Any = AUTH) -> None:
    """Calls, and checks the answer is clean, the service still serves, and nothing was half-written."""
    before_log = await collected_count(suite)
    before = await segments(suite) if method == "PutSegment" else await campaigns(suite) if method == "PutCampaign" else None
    code, answer = await _call(suite, sync, service, method, request, metadata)
    allowed = CLEAN | (RACES if method in ("Merge", "Split") else set())
    assert code in allowed, f"{service}.{method} answered {code.name}: {str(answer)[:500]}"
    assert await serving(suite, service), f"{service} is not serving after {method}"
    if method in WRITES and code not in RACES:
        appended = await collected_count(suite) - before_log
        expected = _results_stored(method, answer) if code == S.OK else 0
        assert appended == expected, f"{method} answered {code.name}; {appended} event(s) appended, not {expected}"
    if method == "PutSegment" and code != S.OK:
        assert await segments(suite) == before, "a refused PutSegment changed the segments"
    if method == "PutCampaign" and code != S.OK:
        assert await campaigns(suite) == before, "a refused PutCampaign changed the campaigns"


def request_strategy(service: str, method: str) -> st.SearchStrategy[Any]:
    descriptor = SERVICES[service].methods_by_name[method].input_type
    if method == "Import":
        return st.lists(messages(descriptor), max_size=6)
    return messages(descriptor)


METADATA = st.one_of(
    st.just(AUTH), st.just(AUTH), st.just(AUTH),
    st.sampled_from([(), (("x-write-key", "wrong"),), (("authorization", "Basic !!!"),),
                     (("authorization", "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()),),
                     (("authorization", "Bearer " + WRITE_KEY),), (*AUTH, ("x-correlation-id", "c" * 4000)),
                     (*AUTH, ("x-correlation-id", "a b:c;d\\e")), (("x-write-key", WRITE_KEY + " "),)]),
)
RANDOM_SETTINGS = settings(
    max_examples=12, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)
METHOD_IDS = [f"{s}.{m}" for s, m in METHODS]


@pytest.mark.parametrize(("service", "method"), METHODS, ids=METHOD_IDS)
@RANDOM_SETTINGS
@given(data=st.data())
async def test_every_grpc_method_answers_random_hostile_requests_cleanly(
    suite: Any, known: list[str], sync_ingest: Any, service: str, method: str, data: st.DataObject
) -> None:
    request = data.draw(request_strategy(service, method), label="request")
    await check_call(suite, sync_ingest, service, method, request, data.draw(METADATA, label="metadata"))


# One field at a time: a valid request with one field replaced by each hostile value of its kind,
# so every field meets every known trouble, whatever the random draws above happened to pick.

SWEEP_TEXT = ["", "\x00", "null", "'; DROP TABLE profiles; --", DEEP_JSON, DEEP_OBJECT, DEEP_TEMPLATE,
              "😀" * 300, HUGE[100 * 1024]]
SWEEP_TIMES = [(-(2**63), 0), (0, 10**9), (253402300800, 0), (-62135596801, 0), (1, -1)]
SWEEP_STRUCTS = [deep_struct(30), deep_struct(31), _struct_with_float(float("nan")), _struct_with_float(float("inf")),
                 convert.dict_to_struct({f"k{i}": "v" for i in range(600)}),
                 convert.dict_to_struct({"order_id": ["o"], "revenue": "lots", "currency": 5, "products": "x"}),
                 convert.dict_to_struct({"order_id": "o-\x00", "note": "a\x00b", "nested": {"k\x00": ["\x00"]}})]
SWEEP_INTS = [-1, -(2**31), 2**31 - 1]
# Fields whose near-real values are worth a case each, too.
SWEEP_NEAR = ("page_token", "value", "field", "op", "platform", "subject_template", "body_template")


# Found here and fixed: U+0000 reached PostgreSQL (which refuses it in text), and a filter value
# nested deeper than Python's recursion limit reached json.loads; both answered UNKNOWN.
ONCE_UNKNOWN = [
    ("identity", "GetGraph", identity_pb2.GetGraphRequest(profile_id="\x00")),
    ("identity", "Merge", identity_pb2.MergeRequest(survivor_id="\x00", profile_ids=["p"])),
    ("identity", "Merge", identity_pb2.MergeRequest(survivor_id="p", profile_ids=["\x00"])),
    ("identity", "Split", identity_pb2.SplitRequest(profile_id="\x00")),
    ("profile", "GetProfile", profile_pb2.GetProfileRequest(profile_id="\x00")),
    ("profile", "GetTimeline", profile_pb2.GetTimelineRequest(profile_id="\x00")),
    ("profile", "GetTimeline", profile_pb2.GetTimelineRequest(
        identifier=event_pb2.Identifier(type="user_id", value="u-1"), type="\x00")),
    ("profile", "GetTimeline", profile_pb2.GetTimelineRequest(
        identifier=event_pb2.Identifier(type="user_id", value="u-1"), name="\x00")),
    ("profile", "SearchProfiles", profile_pb2.SearchProfilesRequest(filters=[
        profile_pb2.Filter(field="traits.plan", op="eq", value=DEEP_JSON)])),
]


@pytest.mark.parametrize(("service", "method", "request_"), ONCE_UNKNOWN,
                         ids=[f"{s}.{m}-{i}" for i, (s, m, _) in enumerate(ONCE_UNKNOWN)])
async def test_nul_and_deep_json_in_identity_and_profile_are_refused(
    suite: Any, known: list[str], sync_ingest: Any, service: str, method: str, request_: Message
) -> None:
    await check_call(suite, sync_ingest, service, method, request_)


def base_request(method: str, known: list[str]) -> Any:
    """A valid request of each method, for the sweep to spoil one field of."""
    when = eventlog.timestamp(eventlog.now())
    ids = event_pb2.Identifiers(user_id="u-1", email="ada@example.com")
    props = convert.dict_to_struct({"order_id": "o-sweep", "revenue": 5.0, "currency": "EUR"})
    traits = convert.dict_to_struct({"first_name": "Ada", "plan": "gold"})
    ident = event_pb2.Identifier(type="user_id", value="u-1")
    ingest_requests = {
        "Track": ingest_pb2.TrackRequest(event_id="sweep", identifiers=ids, event="Order Completed",
                                         properties=props, timestamp=when, sent_at=when, consent={"email": True}),
        "Identify": ingest_pb2.IdentifyRequest(event_id="sweep", identifiers=ids, traits=traits, timestamp=when),
        "Alias": ingest_pb2.AliasRequest(event_id="sweep", identifiers=ids, previous_id="anon-1", timestamp=when),
        "Page": ingest_pb2.PageRequest(event_id="sweep", identifiers=ids, name="Home", category="Docs",
                                       properties=props, timestamp=when),
        "Screen": ingest_pb2.ScreenRequest(event_id="sweep", identifiers=ids, name="Home", properties=props),
        "Group": ingest_pb2.GroupRequest(event_id="sweep", identifiers=ids, group_id="g-1", traits=traits),
    }
    if method in ingest_requests:
        return ingest_requests[method]
    item = ingest_pb2.BatchItem(track=ingest_requests["Track"])
    return {
        "Batch": ingest_pb2.BatchRequest(items=[item]),
        "Import": item,
        "Resolve": identity_pb2.ResolveRequest(identifier=ident),
        "GetGraph": identity_pb2.GetGraphRequest(identifier=ident),
        "GetStats": identity_pb2.GetStatsRequest(),
        "Merge": identity_pb2.MergeRequest(survivor_id=known[1], profile_ids=[known[2]], reason="sweep"),
        "Split": identity_pb2.SplitRequest(profile_id=known[0], reason="sweep", identifiers=[
            event_pb2.Identifier(type="email", value="ada@example.com")]),
        "GetProfile": profile_pb2.GetProfileRequest(identifier=ident),
        "GetTimeline": profile_pb2.GetTimelineRequest(identifier=ident, page_size=5, type="track",
                                                      name="Order Completed"),
        "SearchProfiles": profile_pb2.SearchProfilesRequest(page_size=5, filters=[
            profile_pb2.Filter(field="order_count", op="gte", value="1")]),
        "PutSegment": segmentation_pb2.Segment(id="sweep", name="Sweep", conditions=[
            segmentation_pb2.Condition(field="traits.plan", op="eq", value='"gold"')]),
        "ListSegments": segmentation_pb2.ListSegmentsRequest(),
        "PutCampaign": activation_pb2.Campaign(id="sweep", segment_id="known-segment", channel="email",
                                               from_address="shop@example.com", subject_template="Hi",
                                               body_template="Thanks {{ traits.first_name }}"),
        "ListCampaigns": activation_pb2.ListCampaignsRequest(),
        "ExportAudience": dmp_pb2.ExportAudienceRequest(segment_id="known-segment"),
        "ImportConversions": dmp_pb2.ImportConversionsRequest(platform="meta", csv=CSVS[5]),
    }[method]


Change = Callable[[Message], None]


def _changes(field: pbd.FieldDescriptor) -> list[tuple[Any, Change]]:
    """(hostile value, what sets it on the message holding `field`) for the field's kind."""
    fd, name = pbd.FieldDescriptor, field.name
    kind = field.message_type.full_name if field.message_type else ""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_type = field.message_type.fields_by_name["value"].type
        value: Any = True if value_type == fd.TYPE_BOOL else "v" if value_type == fd.TYPE_STRING else None
        return [] if value is None else [
            (key, lambda m, k=key: getattr(m, name).__setitem__(k, value)) for key in SWEEP_TEXT[:7]]
    if kind == "google.protobuf.Struct":
        return [(struct, lambda m, v=struct: getattr(m, name).CopyFrom(v)) for struct in SWEEP_STRUCTS]
    if kind == "google.protobuf.Timestamp":
        def at(m: Message, seconds: int, nanos: int) -> None:
            getattr(m, name).seconds, getattr(m, name).nanos = seconds, nanos
        return [(f"{s}s {n}ns", lambda m, s=s, n=n: at(m, s, n)) for s, n in SWEEP_TIMES]
    if field.message_type is not None:
        return []
    if field.type == fd.TYPE_STRING:
        texts = SWEEP_TEXT + [v for v in NEAR.get(name, []) if name in SWEEP_NEAR and isinstance(v, str)]
        if field.is_repeated:
            return [(text, lambda m, v=text: getattr(m, name).append(v)) for text in texts]
        return [(text, lambda m, v=text: setattr(m, name, v)) for text in texts]
    if field.type == fd.TYPE_BYTES:
        return [(data, lambda m, v=data: setattr(m, name, v)) for data in CSVS]
    if field.type in (fd.TYPE_INT32, fd.TYPE_INT64):
        return [(number, lambda m, v=number: setattr(m, name, v)) for number in SWEEP_INTS]
    return []


def _inside(message: Message, path: tuple[tuple[str, int | None], ...]) -> Message:
    for name, index in path:
        message = getattr(message, name) if index is None else getattr(message, name)[index]
    return message


def spoiled(base: Message) -> list[tuple[str, str, Any, Message]]:
    """(what was spoiled, request) for every field of `base` and of the messages it holds, and
    every hostile value of that field's kind: one field spoiled per request, the rest valid."""
    cases: list[tuple[str, str, Any, tuple[tuple[str, int | None], ...], Change]] = []

    def walk(message: Message, path: tuple[tuple[str, int | None], ...]) -> None:
        where = "".join(f".{n}" if i is None else f".{n}[{i}]" for n, i in path)
        for field in message.DESCRIPTOR.fields:
            for value, change in _changes(field):
                cases.append((f"{where}.{field.name} = {str(value)[:40]!r}", field.name, value, path, change))
            kinds = ("google.protobuf.Struct", "google.protobuf.Timestamp")
            if field.message_type is None or field.message_type.full_name in kinds:
                continue
            if field.message_type.GetOptions().map_entry:
                continue
            held = getattr(message, field.name)
            if field.is_repeated and len(held):
                walk(held[0], (*path, (field.name, 0)))
            elif not field.is_repeated and message.HasField(field.name):
                walk(held, (*path, (field.name, None)))

    walk(base, ())
    # Oversized: 1 MiB (within gRPC's 4 MiB, over every field limit) and 5 MiB (over gRPC's) once each.
    first = next((f for f in base.DESCRIPTOR.fields if f.type == pbd.FieldDescriptor.TYPE_STRING
                  and not f.is_repeated), None)
    if first is not None:
        for size in (1024 * 1024, 5 * 1024 * 1024):
            cases.append((f".{first.name} = {size} bytes", first.name, HUGE[size], (),
                          lambda m, n=first.name, v=HUGE[size]: setattr(m, n, v)))
    out = []
    for label, name, value, path, change in cases:
        copy = type(base)()
        copy.CopyFrom(base)
        change(_inside(copy, path))
        out.append((label, name, value, copy))
    return out


@pytest.mark.parametrize(("service", "method"), METHODS, ids=METHOD_IDS)
async def test_every_field_of_every_grpc_method_survives_every_hostile_value(
    suite: Any, known: list[str], sync_ingest: Any, service: str, method: str
) -> None:
    base = base_request(method, known)
    cases = spoiled(base)
    assert cases or not base.DESCRIPTOR.fields
    failures = []
    for n, (where, name, value, request) in enumerate([("nothing", "", None, base), *cases]):
        if name != "event_id":
            # A new event each time, so what is accepted is stored (and applied) rather than deduplicated.
            _rename_events(request, f"sweep-{method}-{n}")
        try:
            await check_call(suite, sync_ingest, service, method, [request] if method == "Import" else request)
        except AssertionError as error:
            failures.append(f"{where}: {str(error).splitlines()[0][:300]}")
    assert not failures, f"{len(failures)} of {len(cases) + 1} cases failed:\n" + "\n".join(failures)


def _rename_events(message: Message, event_id: str) -> None:
    for field, value in message.ListFields():
        if field.name == "event_id" and value == "sweep":
            setattr(message, field.name, event_id)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for held in value if field.is_repeated else [value]:
                _rename_events(held, event_id)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def too_deep(field_number: int, levels: int = 200) -> bytes:
    """Field `field_number` holding a message that holds itself `levels` deep: a message no
    client library would build, past protobuf's parsing depth (100)."""
    payload = b""
    for _ in range(levels):
        payload = _delimited(field_number, payload)
    return payload


def raw_requests(service: str, method: str) -> list[bytes]:
    descriptor = SERVICES[service].methods_by_name[method].input_type
    out = [b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11, b"\x0a\x05ab"]
    for field in descriptor.fields:
        if field.type == pbd.FieldDescriptor.TYPE_STRING:
            out.append(_delimited(field.number, b"\xff\xfe invalid utf-8"))
        if field.message_type is not None:
            out.append(too_deep(field.number))
    return out


@pytest.mark.parametrize(("service", "method"), METHODS, ids=METHOD_IDS)
@RANDOM_SETTINGS
@given(data=st.data())
async def test_every_grpc_method_answers_bytes_that_are_no_request_cleanly(
    suite: Any, known: list[str], sync_ingest: Any, service: str, method: str, data: st.DataObject
) -> None:
    raw = data.draw(st.one_of(st.binary(max_size=300), st.sampled_from(raw_requests(service, method))), label="raw")
    await check_call(suite, sync_ingest, service, method, [raw] if method == "Import" else raw)


# The HTTP collector.

PATHS = ["/v1/track", "/v1/identify", "/v1/alias", "/v1/page", "/v1/screen", "/v1/group", "/v1/batch", "/v1/import"]
GOOD = {"messageId": "h-1", "userId": "u-1", "event": "Order Completed", "type": "track",
        "properties": {"order_id": "o-h", "revenue": 1.0, "currency": "EUR"}}
BOMB = gzip.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", compresslevel=9)
SEGMENT_FIELDS = ["messageId", "userId", "anonymousId", "event", "name", "type", "timestamp", "sentAt",
                  "originalTimestamp", "properties", "traits", "context", "integrations", "previousId", "groupId",
                  "category", "writeKey", "batch", "consent"]
TIMES = ["not a date", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "+275760-09-13T00:00:00Z", "2024-13-45",
         "2024-01-01T00:00:00+99:00", 1e20, -1, 0, "", None, [], {}]


def segment_messages() -> st.SearchStrategy[dict[str, Any]]:
    value = st.one_of(json_values(), st.sampled_from(TIMES), st.sampled_from(HOSTILE_TEXT))
    return st.builds(lambda base, extra: {**base, **extra}, st.sampled_from([GOOD, {}, {"userId": "u-1"}]),
                     st.dictionaries(st.sampled_from(SEGMENT_FIELDS), value, max_size=5))


def nested(levels: int) -> Any:
    value: Any = "bottom"
    for level in range(levels):
        value = {"a": value} if level % 2 else [value]
    return value


def json_body(message: Any) -> bytes:
    return json.dumps(message, allow_nan=True).encode()


CRAFTED = [
    b"", b"{", b"[1,", b"nul", b"\xff\xfe{}", b"{}", b"[]", b"1", b'"x"', b"null", b"true", b'{"batch": 1}',
    b'{"batch": [1, "x", null, []]}', b'{"batch": {}}', DEEP_JSON.encode(),
    ('{"userId": "u", "properties": ' + DEEP_OBJECT + "}").encode(),
    json_body({"batch": [GOOD] * 2_600}), json_body({"batch": [{"userId": HUGE[5_000]}] * 900}),
    json_body({**GOOD, "properties": {"big": HUGE[1024 * 1024]}}),
    b'{"userId": "u-1", "event": "x", "properties": {"revenue": NaN}}',
    b'{"userId": "u-1", "event": "x", "properties": {"n": 1e999999}}',
    b'{"userId": "u-1", "event": "x", "properties": {"n": ' + b"9" * 5_000 + b"}}",
    b'{"userId": "u-1", "userId": "u-2", "event": "x"}', b"\xef\xbb\xbf" + json_body(GOOD),
    json_body({**GOOD, "timestamp": "+275760-09-13T00:00:00Z"}), json_body({**GOOD, "sentAt": 1e300}),
    json_body({"batch": [GOOD], "sentAt": "9999-12-31T23:59:59Z", "context": [1]}),
    json_body({**GOOD, "properties": {**GOOD["properties"], "deep": nested(40)}}),
    json_body({**GOOD, "context": {"deep": nested(12)}}),
    json_body({"type": "group", "userId": "u-1", "groupId": "g-1", "traits": nested(25)}),
    json_body({**GOOD, "properties": {"note": "a\u0000b"}}), json_body({**GOOD, "event": "\u0000"}),
    json_body({"batch": [GOOD, {**GOOD, "messageId": "h-nul", "userId": "u\u0000"}]}),
]
BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(CRAFTED),
    segment_messages().map(json_body),
    st.lists(segment_messages(), max_size=4).map(lambda items: json_body({"batch": items})),
)
KEY_BASIC = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
AUTHS = st.one_of(st.just(KEY_BASIC), st.just(KEY_BASIC), st.sampled_from([
    None, "Basic !!!", "Basic " + base64.b64encode(b"wrong:").decode(), "Bearer " + WRITE_KEY, "Basic",
    "Basic " + base64.b64encode(b"\xff\xfe:").decode(), "Basic " + "A" * 6_000, "Digest x",
]))
CONTENT_TYPES = st.sampled_from(["application/json", "application/json", "text/plain", None,
                                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                 "application/json; charset=latin-1", "application/json; charset=nope", "*/*"])
ENCODINGS = st.sampled_from(["gzip", None, None, "gzip-bad", "gzip-bomb", "deflate", "br", "identity", "x-nope",
                             "gzip, gzip"])


@functools.lru_cache(maxsize=64)
def encode_body(body: bytes, encoding: str | None) -> tuple[bytes, str | None]:
    if encoding == "gzip":
        return gzip.compress(body), "gzip"
    if encoding == "gzip-bad":
        return b"\x1f\x8b\x08\x00" + body, "gzip"
    if encoding == "gzip-bomb":
        return BOMB, "gzip"
    if encoding == "deflate":
        return zlib.compress(body), "deflate"
    return body, encoding


@pytest.fixture(scope="module")
async def http(suite: Any) -> Any:
    async with aiohttp.ClientSession(suite.http, auto_decompress=False) as session:
        yield session


# Content encodings aiohttp's HTTP parser itself refuses (brotli is not installed), with a plain-text
# 400 before any handler of ours runs.
PARSER_REFUSES = ("br",)


async def check_post(suite: Any, http: Any, path: str, data: bytes, headers: dict[str, str]) -> None:
    """POSTs, and checks the answer is 2xx/4xx JSON, nothing was half-written, ingest still serves."""
    before = await collected_count(suite)
    # A file-like body: aiohttp warns (an error here) about large raw bytes.
    async with http.post(path, data=io.BytesIO(data), headers=headers) as response:
        status, text = response.status, await response.text(errors="replace")
    assert status < 500, f"{path} answered {status}: {text[:500]}"
    if headers.get("Content-Encoding") in PARSER_REFUSES:
        assert status == 400, f"{path} answered {status} to Content-Encoding {headers['Content-Encoding']}"
        return
    try:
        answer = json.loads(text)
    except ValueError:
        raise AssertionError(f"{path} answered {status} with a body that is not JSON: {text[:300]!r}") from None
    appended = await collected_count(suite) - before
    if status >= 400:
        assert appended == 0, f"{path} answered {status} and {appended} event(s) were appended"
    else:
        assert appended <= answer.get("stored", 1), f"{path}: {appended} appended, answer {answer}"
    async with http.get("/health") as response:
        assert response.status == 200
    assert await serving(suite, "ingest")


async def test_every_http_endpoint_answers_crafted_bodies_with_json_and_no_5xx(
    suite: Any, known: list[str], http: Any
) -> None:
    for path in PATHS:
        for body in CRAFTED:
            for encoding in (None, "gzip"):
                data, content_encoding = encode_body(body, encoding)
                headers = {"Authorization": KEY_BASIC, "Content-Type": "application/json"}
                if content_encoding:
                    headers["Content-Encoding"] = content_encoding
                try:
                    await check_post(suite, http, path, data, headers)
                except AssertionError as error:
                    raise AssertionError(f"body {body[:60]!r} ({encoding or 'plain'}): {error}") from None
        for encoding in ("gzip-bad", "gzip-bomb", "deflate", "br", "x-nope", "gzip, gzip"):
            data, content_encoding = encode_body(json_body(GOOD), encoding)
            headers = {"Authorization": KEY_BASIC, "Content-Type": "application/json",
                       "Content-Encoding": content_encoding or ""}
            try:
                await check_post(suite, http, path, data, headers)
            except AssertionError as error:
                raise AssertionError(f"Content-Encoding {encoding}: {error}") from None


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(path=st.sampled_from(PATHS), body=BODIES, auth=AUTHS, content_type=CONTENT_TYPES, encoding=ENCODINGS,
       correlation=st.sampled_from([None, "c-1", "x" * 2_000, "é", "a;b=c", "ü" * 100]))
async def test_every_http_endpoint_answers_random_hostile_requests_with_json_and_no_5xx(
    suite: Any, known: list[str], http: Any, path: str, body: bytes, auth: str | None, content_type: str | None,
    encoding: str | None, correlation: str | None,
) -> None:
    data, content_encoding = encode_body(body, encoding)
    headers = {k: v for k, v in (("Authorization", auth), ("Content-Type", content_type),
                                 ("Content-Encoding", content_encoding), ("X-Correlation-Id", correlation)) if v}
    await check_post(suite, http, path, data, headers)


async def test_what_ingest_accepted_above_the_pipeline_applied(suite: Any, known: list[str]) -> None:
    """Last in the module: nothing accepted above was dead-lettered downstream, but for the
    documented refusals: an event whose identifiers are all blocked or empty, and a send whose
    template the sandbox stops (PutCampaign takes it; tests/unit/test_activation_rules.py)."""
    await suite.settle()
    stream = suite.topology.stream("deadletter")
    state = (await suite.js.stream_info(stream)).state
    unexpected = []
    for sequence in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        letter = eventlog.decode((await suite.js.get_msg(stream, sequence)).data).dead_lettered
        if "carries no usable identifier" not in letter.error and "SecurityError" not in letter.error:
            unexpected.append(f"{letter.consumer}: {letter.error[:300]}")
    assert not unexpected, f"{len(unexpected)} accepted event(s) dead-lettered: {unexpected[:5]}"
