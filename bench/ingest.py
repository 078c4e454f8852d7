#!/usr/bin/env python
"""Ingest throughput and latency, measured against raw JetStream publishing on the same machine.

    .venv/bin/python bench/ingest.py [--events N] [--runs R] [--json OUT] [--profile]

One fresh nats-server (JetStream, temp dir). Each run measures, in this order:

  publish_async      the ceiling: plain nats-py pipelined JetStream publishing (js.publish_async,
                     then wait for the acks) of N serialized cdp.v1.Event envelopes, exactly what
                     ingest stores for an "Order Completed" track event (built with
                     cdp_ingest.ingestor.build_event), each with its own Nats-Msg-Id; windows of
                     --batch messages, --concurrency windows in flight (the shape of the ingest load)
  publish_async_all  the same, all N published at once, then every ack awaited
  publisher          the same envelopes through cdp_common.eventlog.Publisher, the (leaner)
                     publisher the ingest service itself uses
  grpc_batch         the ingest service as its own process (`python -m cdp_ingest`, as `cdp up` runs
                     it), N events as pre-serialized BatchRequests of --batch, --concurrency in flight
  http_batch         the same service, N events as Segment-spec JSON bodies POSTed to /v1/batch with
                     basic auth (the write key set in CDP_WRITE_KEYS), --concurrency in flight
  track              single-event Track calls at a fixed --rate per second for --duration seconds,
                     open loop (sends follow a timetable and never wait for earlier replies)

Every measurement gets its own namespace (so its own, empty streams), a warm-up that is purged
before timing starts, and a check afterwards that the COLLECTED stream holds exactly the events
sent. Medians over --runs go to a table; raw numbers and medians to JSON. With each number
comes the CPU each process used and the CPU that other processes on the machine took meanwhile.

--profile instead prints per-step CPU of the ingest path (in-process, no I/O), the CPU a bare
unary gRPC call costs the service, and cProfile reports of the service process under gRPC batch,
HTTP batch and Track load.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil
import grpc
import nats
import nats.js.errors
from google.protobuf import struct_pb2
from google.protobuf.internal import api_implementation

from cdp.ingest.v1 import ingest_pb2
from cdp.v1 import event_pb2
from cdp_cli.infra import NatsServer, free_port, nats_server_binary, start_nats
from cdp_cli.suite import healthy
from cdp_common import eventlog
from cdp_common.service import GC_THRESHOLDS, collect_on_a_clock
from cdp_ingest import core
from cdp_ingest.ingestor import build_event

T = TypeVar("T")
BENCH_DIR = Path(__file__).resolve().parent
WRITE_KEY = "bench-write-key"
SOURCE = "bench"
GRPC_BATCH = "/cdp.ingest.v1.IngestService/Batch"
GRPC_TRACK = "/cdp.ingest.v1.IngestService/Track"
METADATA = (("x-write-key", WRITE_KEY),)
# Ingest worker processes (CDP_WORKERS), set from --workers.
WORKERS = 1
TARGET_BATCH_RATIO = 0.7
TARGET_TRACK_P99_MS = 5.0
# Below this many busy cores (nothing of ours running) the machine counts as quiet.
QUIET_CORES = 0.25

# `python -m cdp_ingest` under cProfile (main thread, wall clock: the event loop's idle waits show up
# as epoll.poll and are subtracted in the report); the stats are written when the service exits.
PROFILED_MAIN = """
import cProfile, runpy, sys
profiler = cProfile.Profile()
profiler.enable()
try:
    runpy.run_module("cdp_ingest", run_name="__main__", alter_sys=True)
finally:
    profiler.disable()
    profiler.dump_stats(sys.argv[1])
"""

# Everything this script started, stopped in `finally` whatever happens (error, Ctrl-C, SIGTERM).
_children: list[subprocess.Popen[bytes]] = []


# --- the event ----------------------------------------------------------------------------------

PRODUCTS = [
    {"product_id": "p-1001", "sku": "SKU-1001", "name": "Linen shirt", "category": "Apparel",
     "price": 59.95, "quantity": 1},
    {"product_id": "p-2040", "sku": "SKU-2040", "name": "Canvas sneakers", "category": "Footwear",
     "price": 74.5, "quantity": 1},
    {"product_id": "p-3307", "sku": "SKU-3307", "name": "Wool socks (3-pack)", "category": "Apparel",
     "price": 14.9, "quantity": 2},
]
CONTEXT = {
    "ip": "203.0.113.7",
    "locale": "de-DE",
    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "library": {"name": "analytics.js", "version": "5.2.0"},
    "page": {"path": "/checkout/complete", "url": "https://shop.example.com/checkout/complete"},
}
CONSENT = {"analytics": True, "marketing": False}


def segment_message(tag: str, i: int, when: datetime) -> dict[str, Any]:
    """One realistic 'Order Completed' track call, as a Segment-spec JSON message."""
    return {
        "type": "track",
        "messageId": f"{tag}-{i}",
        "userId": f"u-{i % 5000:05d}",
        "anonymousId": f"anon-{i % 7919:05d}",
        "event": "Order Completed",
        "properties": {
            "order_id": f"o-{tag}-{i}",
            "revenue": 164.2,
            "total": 179.2,
            "currency": "EUR",
            "coupon": "SPRING10",
            "products": PRODUCTS,
        },
        "context": CONTEXT,
        "consent": CONSENT,
        "timestamp": when.isoformat().replace("+00:00", "Z"),
    }


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def track_request(message: dict[str, Any]) -> ingest_pb2.TrackRequest:
    """The same event as a gRPC TrackRequest."""
    request = ingest_pb2.TrackRequest(
        event_id=message["messageId"],
        identifiers=event_pb2.Identifiers(user_id=message["userId"], anonymous_id=message["anonymousId"]),
        event=message["event"],
        properties=_struct(message["properties"]),
        context=_struct(message["context"]),
        consent=message["consent"],
    )
    request.timestamp.FromDatetime(datetime.fromisoformat(message["timestamp"].replace("Z", "+00:00")))
    return request


Envelope = tuple[bytes, dict[str, str]]


def envelopes(tag: str, n: int) -> list[Envelope]:
    """(payload, headers) exactly as ingest publishes them (see Ingestor.ingest): the same
    cdp.v1.Event bytes, Nats-Msg-Id = the event id, type and correlation headers."""
    now = eventlog.now()
    out = []
    for i in range(n):
        item = core.from_segment(segment_message(tag, i, now - timedelta(seconds=1)))
        event = build_event(item, received_at=now, source=SOURCE, correlation_id=str(uuid.uuid4()))
        out.append((eventlog.encode(event), eventlog.Outgoing("", event).headers()))
    return out


def addressed(topology: eventlog.Topology, items: Sequence[Envelope]) -> list[tuple[str, bytes, dict[str, str]]]:
    subject = topology.collected("track")
    return [(subject, payload, headers) for payload, headers in items]


def grpc_batches(tag: str, n: int, batch: int) -> list[bytes]:
    now = eventlog.now() - timedelta(seconds=1)
    requests = []
    for start in range(0, n, batch):
        items = [ingest_pb2.BatchItem(track=track_request(segment_message(tag, i, now)))
                 for i in range(start, min(n, start + batch))]
        requests.append(ingest_pb2.BatchRequest(items=items).SerializeToString())
    return requests


def http_batches(tag: str, n: int, batch: int) -> list[bytes]:
    now = eventlog.now() - timedelta(seconds=1)
    sent_at = eventlog.now().isoformat().replace("+00:00", "Z")
    return [
        json.dumps({"batch": [segment_message(tag, i, now) for i in range(start, min(n, start + batch))],
                    "sentAt": sent_at}).encode()
        for start in range(0, n, batch)
    ]


def track_requests(tag: str, n: int) -> list[bytes]:
    now = eventlog.now() - timedelta(seconds=1)
    return [track_request(segment_message(tag, i, now)).SerializeToString() for i in range(n)]


# --- infrastructure -----------------------------------------------------------------------------


def _stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with contextlib.suppress(ValueError):
        _children.remove(process)


@dataclass
class Service:
    """`python -m cdp_ingest` in its own process, the way `cdp up` runs it."""

    nats_url: str
    nats_pid: int
    namespace: str
    log_file: Path
    profile_out: Path | None = None
    grpc_address: str = ""
    http_url: str = ""
    process: subprocess.Popen[bytes] | None = None
    started_in: float = 0.0

    async def start(self, timeout: float = 60.0) -> None:
        grpc_port, http_port = free_port(), free_port()
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.http_url = f"http://127.0.0.1:{http_port}"
        env = {
            **os.environ,
            "CDP_NATS_URL": self.nats_url,
            "CDP_GRPC_LISTEN": self.grpc_address,
            "CDP_HTTP_LISTEN": f"127.0.0.1:{http_port}",
            "CDP_NAMESPACE": self.namespace,
            "CDP_WRITE_KEYS": f"{WRITE_KEY}={SOURCE}",
            "CDP_WORKERS": str(WORKERS),
        }
        command = [sys.executable, "-m", "cdp_ingest"]
        if self.profile_out:
            command = [sys.executable, "-c", PROFILED_MAIN, str(self.profile_out)]
        began = time.perf_counter()
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
        _children.append(self.process)
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(healthy, self.grpc_address, 1.0):
            if self.process.poll() is not None:
                raise RuntimeError(f"ingest exited with code {self.process.returncode}; see {self.log_file}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest not healthy within {timeout:.0f}s; see {self.log_file}")
            await asyncio.sleep(0.05)
        self.started_in = time.perf_counter() - began

    @property
    def pids(self) -> list[int]:
        """client, nats-server, ingest: for Timed."""
        assert self.process is not None
        # With CDP_WORKERS > 1 the service's worker processes are its children.
        workers = [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]
        return [os.getpid(), self.nats_pid, self.process.pid, *workers]

    async def stop(self) -> None:
        if self.process is not None:
            await asyncio.to_thread(_stop_process, self.process)


class Log:
    """Admin access to the JetStream server: namespaces, purges, counts."""

    def __init__(self, url: str, server_pid: int) -> None:
        self.url = url
        self.server_pid = server_pid
        self.nc: Any = None
        self.js: Any = None

    async def __aenter__(self) -> Log:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def fresh(self, label: str) -> eventlog.Topology:
        topology = eventlog.Topology(f"b{label}{uuid.uuid4().hex[:10]}")
        await eventlog.provision_streams(self.js, topology)
        return topology

    async def purge(self, topology: eventlog.Topology) -> None:
        await self.js.purge_stream(topology.stream("collected"))
        if (count := await self.count(topology)) != 0:
            raise RuntimeError(f"stream not empty after purge: {count}")

    async def count(self, topology: eventlog.Topology, area: str = "collected") -> int:
        info = await self.js.stream_info(topology.stream(area))
        return int(info.state.messages)

    async def drop(self, topology: eventlog.Topology) -> None:
        for area in eventlog.AREAS:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_stream(topology.stream(area))


# --- measurements -------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _others(exclude: Sequence[int]) -> dict[tuple[int, str], float]:
    """CPU seconds of every other process, by (pid, start time): utime + stime, plus cutime +
    cstime so that children which exited (and were reaped) in between still count."""
    cpu: dict[tuple[int, str], float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu[(int(entry.name), fields[19])] = sum(int(v) for v in fields[11:15]) / _TICKS
    return cpu


def _others_delta(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]) -> float:
    return sum(total - before.get(key, 0.0) for key, total in after.items())


_TICKS = os.sysconf("SC_CLK_TCK")


class ServiceCollector:
    """The client's cyclic collector set as the services set theirs (cdp_common.service: what
    exists on entry frozen, GC_THRESHOLDS, and within an event loop the collector's clock) for the
    block, each collection's pause timed (`pauses`, ms); Python's settings come back on exit. With
    Python's defaults a full collection of an open loop's tasks stopped the client for about 20 ms,
    and the requests due meanwhile counted as slow."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started: list[float] = []
        self._clock: asyncio.Task[None] | None = None

    def _collector(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started.append(time.perf_counter())
        elif self._started:
            self.pauses.append((time.perf_counter() - self._started.pop()) * 1000)

    def __enter__(self) -> ServiceCollector:
        gc.collect()
        gc.freeze()
        self._thresholds = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        gc.callbacks.append(self._collector)
        with contextlib.suppress(RuntimeError):  # outside an event loop: the thresholds only
            self._clock = asyncio.get_running_loop().create_task(collect_on_a_clock())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._clock is not None:
            self._clock.cancel()
        gc.callbacks.remove(self._collector)
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()


class Timed:
    """Wall time of the measured part, with the client's collector as in the services
    (`ServiceCollector`), and where CPU went meanwhile: this bench's processes (client,
    nats-server, ingest) and, summed over /proc, every other process on the machine."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.collector = ServiceCollector()

    def __enter__(self) -> Timed:
        self.collector.__enter__()
        self._others = _others(self.pids)
        self._ours = [_cpu_seconds(p) for p in self.pids]
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._began
        ours = [_cpu_seconds(p) - before for p, before in zip(self.pids, self._ours, strict=True)]
        others = _others_delta(self._others, _others(self.pids))
        self.collector.__exit__()
        self.cpu = {
            "client_s": ours[0], "nats_server_s": ours[1], "ingest_s": ours[2] if len(ours) > 2 else 0.0,
            "others_s": others,
            # CPU used by processes that are not part of this bench, in cores. A long-lived child
            # reaped meanwhile brings its whole life's CPU along (cutime), so cap at what the
            # cores could have run besides ours: an overestimate at worst, never a missed load.
            "foreign_cores": max(0.0, min(others, (os.cpu_count() or 1) * self.seconds - sum(ours))) / self.seconds,
        }

    def result(self, events: int) -> dict[str, Any]:
        return {"events": events, "seconds": self.seconds, "events_per_s": events / self.seconds, "cpu": self.cpu,
                "cpu_us_per_event": self.per_event(events)}

    def per_event(self, events: int) -> dict[str, float]:
        return {k[:-2]: 1e6 * v / events for k, v in self.cpu.items() if k in ("client_s", "nats_server_s", "ingest_s")}


def machine_load(seconds: float = 1.0) -> float:
    """Cores busy with other processes over `seconds` (nothing of ours runs between measurements)."""
    before = _others([os.getpid()])
    time.sleep(seconds)
    return min(_others_delta(before, _others([os.getpid()])) / seconds, float(os.cpu_count() or 1))


async def publish_windows(js: Any, payloads: Sequence[tuple[str, bytes, dict[str, str]]], window: int,
                          in_flight: int) -> list[Any]:
    """Plain nats-py pipelining: `in_flight` workers, each publish_async-ing `window` messages and
    then waiting for their acks (window = all messages and in_flight = 1: everything at once)."""
    chunks = iter([payloads[i:i + window] for i in range(0, len(payloads), window)])
    acks: list[Any] = []

    async def worker() -> None:
        for chunk in chunks:
            futures = [await js.publish_async(s, p, headers=h, wait_stall=eventlog.PUBLISH_TIMEOUT_SECONDS)
                       for s, p, h in chunk]
            acks.extend(await asyncio.wait_for(asyncio.gather(*futures), 60))

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return acks


async def publisher_windows(publisher: eventlog.Publisher, payloads: Sequence[tuple[str, bytes, dict[str, str]]],
                            window: int, in_flight: int) -> list[Any]:
    """The same with the service's own eventlog.Publisher (what ingest publishes with)."""
    chunks = iter([payloads[i:i + window] for i in range(0, len(payloads), window)])
    acks: list[Any] = []

    async def worker() -> None:
        for chunk in chunks:
            acks.extend(await publisher.publish(chunk))

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return acks


RAW_MODES = ("publish_async", "publish_async_all", "publisher")


async def measure_raw(log: Log, mode: str, items: Sequence[Envelope], warm: Sequence[Envelope], window: int,
                      in_flight: int) -> dict[str, Any]:
    """Raw JetStream publishing of ready envelopes, no ingest service:
    publish_async      nats-py js.publish_async, `window` messages per worker, `in_flight` workers
    publish_async_all  nats-py js.publish_async, all messages at once, then wait for every ack
    publisher          cdp_common.eventlog.Publisher (the service's publisher), windows as above
    """
    events = len(items)
    topology = await log.fresh("r")
    payloads, warm_payloads = addressed(topology, items), addressed(topology, warm)
    if mode == "publish_async_all":
        window, in_flight = events, 1
    nc = await nats.connect(log.url)
    publisher = eventlog.Publisher(nc)
    try:
        js = nc.jetstream()
        if mode == "publisher":
            await publisher_windows(publisher, warm_payloads, window, 1)
        else:
            await publish_windows(js, warm_payloads, window, 1)
        await log.purge(topology)
        with Timed([os.getpid(), log.server_pid]) as timed:
            if mode == "publisher":
                acks = await publisher_windows(publisher, payloads, window, in_flight)
            else:
                acks = await publish_windows(js, payloads, window, in_flight)
    finally:
        await publisher.close()
        await nc.close()
    stored = await log.count(topology)
    duplicates = sum(1 for a in acks if a.duplicate)
    await log.drop(topology)
    _expect(stored == events and duplicates == 0, f"raw {mode}: {stored} stored, {duplicates} duplicates")
    return {**timed.result(events), "mode": mode, "window": window, "in_flight": in_flight, "stored": stored,
            "event_bytes": len(items[0][0])}


async def _with_service(
    log: Log, label: str, logs: Path, profile_out: Path | None,
    body: Callable[[Service, Callable[[], Awaitable[None]]], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    topology = await log.fresh(label)
    service = Service(log.url, log.server_pid, topology.namespace, logs / f"ingest-{topology.namespace}.log", profile_out)
    try:
        await service.start()
        result = await body(service, lambda: log.purge(topology))
        result["stored"] = await log.count(topology)
        result["service_start_s"] = service.started_in
    finally:
        await service.stop()
        await log.drop(topology)
    return result


async def measure_grpc_batch(log: Log, events: int, batch: int, concurrency: int, tag: str, logs: Path,
                             profile_out: Path | None = None) -> dict[str, Any]:
    warm = grpc_batches(f"{tag}w", batch, batch)
    requests = grpc_batches(tag, events, batch)

    async def body(service: Service, purge: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        # One connection per caller (a local subchannel pool), so that with CDP_WORKERS > 1 the
        # kernel spreads them over the worker processes sharing the port, as for HTTP clients.
        channels = [grpc.aio.insecure_channel(service.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(concurrency * 2)]
        try:
            calls = [channel.unary_unary(GRPC_BATCH, request_serializer=None,
                                         response_deserializer=ingest_pb2.BatchResponse.FromString)
                     for channel in channels]
            for call in calls:
                for r in warm:
                    await call(r, metadata=METADATA, timeout=60)
            await purge()
            pending = iter(requests)
            totals = {"stored": 0, "rejected": 0}

            async def worker(mine: list[Any]) -> None:
                # Two connections per caller, used in turn, so that the load spreads evenly over
                # worker processes even when the kernel hashes connections unevenly.
                for turn, request in enumerate(pending):
                    reply = await mine[turn % len(mine)](request, metadata=METADATA, timeout=60)
                    totals["stored"] += reply.stored
                    totals["rejected"] += reply.rejected

            with Timed(service.pids) as timed:
                await asyncio.gather(*(worker(calls[i::concurrency]) for i in range(concurrency)))
        finally:
            for channel in channels:
                await channel.close()
        _expect(totals["stored"] == events, f"grpc batch: {totals}")
        return {**timed.result(events), "acknowledged": totals["stored"], "rejected": totals["rejected"],
                "request_bytes": len(requests[0])}

    result = await _with_service(log, "g", logs, profile_out, body)
    _expect(result["stored"] == events, f"grpc batch: stream holds {result['stored']}")
    return result


async def measure_http_batch(log: Log, events: int, batch: int, concurrency: int, tag: str, logs: Path,
                             profile_out: Path | None = None) -> dict[str, Any]:
    warm = http_batches(f"{tag}w", batch, batch)
    bodies = http_batches(tag, events, batch)
    basic = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Basic {basic}"}

    async def body(service: Service, purge: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        url = f"{service.http_url}/v1/batch"
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def post(data: bytes) -> dict[str, Any]:
                async with session.post(url, data=data) as response:
                    reply = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {reply}")
                    return reply  # type: ignore[no-any-return]

            for b in warm:
                await post(b)
            await purge()
            pending = iter(bodies)
            totals = {"stored": 0, "rejected": 0}

            async def worker() -> None:
                for data in pending:
                    reply = await post(data)
                    totals["stored"] += reply["stored"]
                    totals["rejected"] += len(reply["rejected"])

            with Timed(service.pids) as timed:
                await asyncio.gather(*(worker() for _ in range(concurrency)))
        _expect(totals["stored"] == events, f"http batch: {totals}")
        return {**timed.result(events), "acknowledged": totals["stored"], "rejected": totals["rejected"],
                "body_bytes": len(bodies[0])}

    result = await _with_service(log, "h", logs, profile_out, body)
    _expect(result["stored"] == events, f"http batch: stream holds {result['stored']}")
    return result


async def open_loop(call: Any, requests: Sequence[Any], rate: float, pids: Sequence[int],
                    metadata: Sequence[tuple[str, str]] | None = METADATA) -> dict[str, Any]:
    """Sends request i at start + i/rate whatever happened to the earlier ones (open loop), and
    times each from its scheduled send (so a late send counts against latency) and from its
    actual send."""
    from_schedule: list[float] = []
    from_send: list[float] = []
    send_lag: list[float] = []
    errors: list[str] = []
    last_done = 0.0

    async def one(request: Any, due: float) -> None:
        nonlocal last_done
        sent = time.perf_counter()
        try:
            if metadata is None:  # not a gRPC call
                await call(request)
            else:
                await call(request, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            errors.append(f"{error.code().name}: {error.details()}")
            return
        except Exception as error:  # noqa: BLE001 - counted and shown, the run goes on
            errors.append(repr(error))
            return
        done = time.perf_counter()
        last_done = max(last_done, done)
        from_schedule.append(done - due)
        from_send.append(done - sent)
        send_lag.append(sent - due)

    tasks = []
    with Timed(pids) as timed:
        start = time.perf_counter() + 0.05
        for i, request in enumerate(requests):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request, due)))
        await asyncio.gather(*tasks)
    ms = [v * 1000 for v in from_schedule]
    ms_send = [v * 1000 for v in from_send]
    if not ms:
        raise RuntimeError(f"every request failed: {errors[:3]}")
    return {
        "requests": len(requests), "ok": len(ms), "errors": len(errors), "error_samples": errors[:5],
        "target_rate": rate, "duration_s": len(requests) / rate,
        "achieved_rate": len(ms) / (last_done - start),
        "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "p99_ms": pct(ms, 99), "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "from_send_p50_ms": pct(ms_send, 50), "from_send_p99_ms": pct(ms_send, 99),
        "from_send_max_ms": max(ms_send),
        "send_lag_p99_ms": pct(send_lag, 99) * 1000, "send_lag_max_ms": max(send_lag) * 1000,
        "client_gc": {"collections": len(timed.collector.pauses), "longest_ms": max(timed.collector.pauses, default=0.0)},
        "cpu": timed.cpu, "cpu_us_per_event": timed.per_event(len(ms)),
    }


async def measure_track(log: Log, rate: float, duration: float, tag: str, logs: Path,
                        profile_out: Path | None = None) -> dict[str, Any]:
    warm = track_requests(f"{tag}w", 300)
    requests = track_requests(tag, int(rate * duration))

    async def body(service: Service, purge: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            call = channel.unary_unary(GRPC_TRACK, request_serializer=None,
                                       response_deserializer=ingest_pb2.IngestResponse.FromString)
            for r in warm:
                await call(r, metadata=METADATA, timeout=10)
            await purge()
            return await open_loop(call, requests, rate, service.pids)

    result = await _with_service(log, "t", logs, profile_out, body)
    _expect(result["stored"] == result["ok"], f"track: stream holds {result['stored']}, {result['ok']} ok")
    return result


async def measure_single_publish(log: Log, rate: float, duration: float, tag: str) -> dict[str, Any]:
    """One envelope per JetStream publish (eventlog.Publisher, as a Track call does), open loop at
    the Track rate, no service: the latency floor under a single Track."""
    topology = await log.fresh("s")
    items = addressed(topology, envelopes(tag, int(rate * duration)))
    warm = addressed(topology, envelopes(f"{tag}w", 300))
    nc = await nats.connect(log.url)
    publisher = eventlog.Publisher(nc)
    try:
        for message in warm:
            await publisher.publish([message])
        await log.purge(topology)
        result = await open_loop(lambda m: publisher.publish([m]), items, rate, [os.getpid(), log.server_pid],
                                 None)
    finally:
        await publisher.close()
        await nc.close()
    result["stored"] = await log.count(topology)
    await log.drop(topology)
    return result


async def measure_unary_floor(log: Log, rate: float, duration: float, tag: str, logs: Path) -> dict[str, Any]:
    """What a unary call costs the ingest process with no ingest work at all: grpc.health.v1
    Health/Check (served by the same process) at the Track rate, then Track, alternating twice."""
    from grpc_health.v1 import health_pb2

    count = int(rate * duration)
    check = health_pb2.HealthCheckRequest().SerializeToString()

    async def body(service: Service, purge: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        out: dict[str, Any] = {"health": [], "track": []}
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            track = channel.unary_unary(GRPC_TRACK, request_serializer=None,
                                        response_deserializer=ingest_pb2.IngestResponse.FromString)
            health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                         response_deserializer=health_pb2.HealthCheckResponse.FromString)
            for r in track_requests(f"{tag}w", 300):
                await track(r, metadata=METADATA, timeout=10)
                await health(check, timeout=10)
            for round_ in range(2):
                out["health"].append(await open_loop(health, [check] * count, rate, service.pids, []))
                out["track"].append(await open_loop(track, track_requests(f"{tag}{round_}", count), rate,
                                                    service.pids))
        return out

    return await _with_service(log, "u", logs, None, body)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"check failed: {message}")


# --- the machine and the report -----------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    nats_version = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True,
                                  check=False).stdout.strip()
    versions = {name: importlib.metadata.version(name) for name in ("grpcio", "nats-py", "protobuf", "aiohttp")}

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=BENCH_DIR.parent, capture_output=True, text=True,
                              check=False).stdout.strip()

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib,
        "python": platform.python_version(), "nats_server": nats_version,
        "protobuf_backend": api_implementation.Type(), "os": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "packages": versions,
        "commit": git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes to the code under test, if any.
        "modified": git("status", "--porcelain", "--", "services/ingest", "libs/common").splitlines(),
    }


SERVICE_KINDS = ("grpc_batch", "http_batch", "track")


def summarize(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in raw[kind])

    medians: dict[str, Any] = {f"{mode}_events_per_s": med(mode, "events_per_s") for mode in RAW_MODES}
    ceiling = medians["publish_async_events_per_s"]
    lean = medians["publisher_events_per_s"]
    for kind in ("grpc_batch", "http_batch"):
        rate = med(kind, "events_per_s")
        medians[f"{kind}_events_per_s"] = rate
        medians[f"{kind}_ratio"] = rate / ceiling
        # Paired: each run's rate over the same run's ceiling.
        medians[f"{kind}_paired_ratio"] = statistics.median(
            r["events_per_s"] / c["events_per_s"] for r, c in zip(raw[kind], raw["publish_async"], strict=True))
        medians[f"{kind}_ratio_to_publisher"] = rate / lean
    for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "achieved_rate", "from_send_p99_ms", "send_lag_p99_ms"):
        medians[f"track_{key}"] = med("track", key)
    medians["foreign_cores"] = {kind: statistics.median(r["cpu"]["foreign_cores"] for r in raw[kind]) for kind in raw}
    medians["cpu_us_per_event"] = {
        kind: {part: statistics.median(r["cpu_us_per_event"][part] for r in raw[kind])
               for part in ("client", "nats_server", "ingest")}
        for kind in raw}
    medians["targets"] = {
        "grpc_batch_ratio_at_least_0.7": medians["grpc_batch_ratio"] >= TARGET_BATCH_RATIO,
        "http_batch_ratio_at_least_0.7": medians["http_batch_ratio"] >= TARGET_BATCH_RATIO,
        "track_p99_under_5ms_at_500rps": medians["track_p99_ms"] < TARGET_TRACK_P99_MS,
    }
    return medians


def render(info: dict[str, Any], args: argparse.Namespace, raw: dict[str, list[dict[str, Any]]],
           medians: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def runs(kind: str, key: str, fmt: str) -> str:
        return "  ".join(format(r[key], fmt) for r in raw[kind])

    def verdict(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]MISSED[/]"

    def busy(kind: str) -> str:
        return f"{medians['foreign_cores'][kind]:.2f}"

    def cost(kind: str) -> str:
        per = medians["cpu_us_per_event"][kind]
        return f"{per['client']:.0f} / {per['nats_server']:.0f} / {per['ingest']:.0f}"

    def ratio(kind: str) -> str:
        return f"{medians[f'{kind}_ratio']:.2f}x ({medians[f'{kind}_ratio_to_publisher']:.2f}x)"

    ceiling = medians["publish_async_events_per_s"]
    console = Console(width=170)
    console.print(
        f"[bold]Machine[/] {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM; "
        f"Python {info['python']} (protobuf {info['protobuf_backend']}), {info['nats_server']}")
    console.print(f"[bold]OS[/] {info['os']}; [bold]date[/] {info['date']}; [bold]commit[/] {info['commit']}"
                  + (f" + uncommitted changes to {len(info['modified'])} file(s)" if info["modified"] else ""))
    console.print(
        f"[bold]Workload[/] {args.events} 'Order Completed' events per throughput measurement "
        f"({raw['publish_async'][0]['event_bytes']} B envelope); batches (windows) of {args.batch}, "
        f"{args.concurrency} in flight ({args.batch} x {args.concurrency}); Track at {args.rate:g}/s for "
        f"{args.duration:g} s; {args.runs} runs, medians")
    table = Table()
    for column in ("measurement", "median", "runs", "vs ceiling (vs Publisher)", "target", "other load",
                   "CPU us/event c/n/i"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    targets = medians["targets"]
    shape = f"{args.batch} x {args.concurrency}"
    table.add_row(f"ceiling: publish_async {shape}", f"{ceiling:,.0f} ev/s",
                  runs("publish_async", "events_per_s", ",.0f"), "1.00x", "", busy("publish_async"),
                  cost("publish_async"))
    table.add_row("publish_async, all at once",
                  f"{medians['publish_async_all_events_per_s']:,.0f} ev/s",
                  runs("publish_async_all", "events_per_s", ",.0f"),
                  f"{medians['publish_async_all_events_per_s'] / ceiling:.2f}x", "", busy("publish_async_all"),
                  cost("publish_async_all"))
    table.add_row(f"eventlog.Publisher {shape}", f"{medians['publisher_events_per_s']:,.0f} ev/s",
                  runs("publisher", "events_per_s", ",.0f"),
                  f"{medians['publisher_events_per_s'] / ceiling:.2f}x (1.00x)", "", busy("publisher"),
                  cost("publisher"))
    table.add_row(f"gRPC Batch {shape}",
                  f"{medians['grpc_batch_events_per_s']:,.0f} ev/s", runs("grpc_batch", "events_per_s", ",.0f"),
                  ratio("grpc_batch"), f">= 0.70x {verdict(targets['grpc_batch_ratio_at_least_0.7'])}",
                  busy("grpc_batch"), cost("grpc_batch"))
    table.add_row(f"HTTP /v1/batch {shape}",
                  f"{medians['http_batch_events_per_s']:,.0f} ev/s", runs("http_batch", "events_per_s", ",.0f"),
                  ratio("http_batch"), f">= 0.70x {verdict(targets['http_batch_ratio_at_least_0.7'])}",
                  busy("http_batch"), cost("http_batch"))
    table.add_row(f"Track {args.rate:g}/s: achieved rate", f"{medians['track_achieved_rate']:,.1f} req/s",
                  runs("track", "achieved_rate", ",.1f"), "", "", busy("track"), cost("track"))
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"), ("max_ms", "max")):
        target = f"< 5 ms {verdict(targets['track_p99_under_5ms_at_500rps'])}" if key == "p99_ms" else ""
        table.add_row(f"Track latency {label}", f"{medians[f'track_{key}']:.2f} ms", runs("track", key, ".2f"),
                      "", target, "", "")
    table.add_row("Track p99 from actual send", f"{medians['track_from_send_p99_ms']:.2f} ms",
                  runs("track", "from_send_p99_ms", ".2f"), "", "", "", "")
    table.add_row("Track client send lag p99", f"{medians['track_send_lag_p99_ms']:.2f} ms",
                  runs("track", "send_lag_p99_ms", ".2f"), "", "", "", "")
    console.print(table)
    console.print(
        "vs ceiling = median rate / median publish_async rate (the issue's 0.7x target); in brackets the same over "
        "the service's own eventlog.Publisher. other load = CPU cores busy with processes outside this bench "
        f"while measuring (0 = quiet machine, at most {info['cores']}). CPU us/event = CPU time per event (per "
        "request for Track) of the client / nats-server / ingest process.")


def print_profile(path: Path, label: str, events: int, top: int = 30) -> dict[str, Any]:
    """The service's main thread under cProfile: the ingest path's stages, then the hot functions."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    idle = sum(v[2] for k, v in entries.items() if k[2] == "<method 'poll' of 'select.epoll' objects>")
    # Every event the service handled, warm-up included (the profile covers the whole process).
    events = sum(v[1] for k, v in entries.items() if Path(k[0]).name == "ingestor.py" and k[2] == "envelope") or events
    total = stats.total_tt - idle  # type: ignore[attr-defined]
    # Stages by (file, function); cumulative time, so a stage includes the stages it calls.
    stages = [
        ("_server.py", "_handle_unary_unary_rpc"),
        ("api.py", "Batch"), ("api.py", "Track"), ("http.py", "batch"), ("web_protocol.py", "_handle_request"),
        ("api.py", "_store"), ("api.py", "to_incoming"), ("core.py", "from_segment"), ("__init__.py", "loads"),
        ("ingestor.py", "ingest"), ("ingestor.py", "build_event"), ("core.py", "accept"),
        ("core.py", "check_semantic"), ("ingestor.py", "envelope"), ("convert.py", "set_struct"),
        ("eventlog.py", "publish_events"), ("eventlog.py", "publish"), ("eventlog.py", "encode"),
        ("eventlog.py", "headers"), ("client.py", "publish"), ("eventlog.py", "_on_ack"),
        ("api.py", "_item_result"), ("api.py", "_single"), ("service.py", "wrapped"),
        ("_base.py", "info"), ("_output.py", "msg"),
    ]
    print(f"\n== {label}: ingest main thread under cProfile ({events} events handled, warm-up included; "
          f"{total:.2f} s busy in all, start-up included; {idle:.2f} s idle in epoll left out) ==")
    print(f"{'stage (cumulative, includes callees)':52} {'s':>7} {'% total':>8} {'us/event':>9}")
    breakdown = {}
    for file, name in stages:
        hits = [v for k, v in entries.items() if Path(k[0]).name == file and k[2] == name]
        if not hits:
            continue
        cumulative = sum(v[3] for v in hits)
        breakdown[f"{file}:{name}"] = cumulative
        print(f"{file + ':' + name:52} {cumulative:7.2f} {100 * cumulative / total:7.1f}% "
              f"{1e6 * cumulative / events:9.1f}")
    print(f"\ntop {top} functions by own time:")
    print(f"{'own s':>7} {'cum s':>7} {'calls':>9}  function")
    hot = []
    busy_entries = ((k, v) for k, v in entries.items() if "epoll" not in k[2])
    for (file, line, name), (_cc, calls, own, cumulative, _callers) in sorted(
            busy_entries, key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"{own:7.2f} {cumulative:7.2f} {calls:9d}  {where}")
        hot.append({"function": where, "own_s": own, "cumulative_s": cumulative, "calls": calls})
    return {"busy_s": total, "idle_s": idle, "stages_cumulative_s": breakdown, "hot": hot}


def stage_costs(n: int = 2000, repeat: int = 5) -> dict[str, dict[str, float]]:
    """Per-event CPU of each step of the ingest path, in this process and without I/O (best of
    `repeat`, in microseconds), using the service's own functions on the benchmark event."""
    from cdp_ingest import api

    now = eventlog.now()
    received_ts = eventlog.timestamp(now)
    grpc_body = grpc_batches("s", n, n)[0]
    http_body = http_batches("s", n, n)[0]
    batch = ingest_pb2.BatchRequest.FromString(grpc_body)
    items = [getattr(item, item.WhichOneof("kind")) for item in batch.items]
    grpc_incoming = [api.to_incoming("track", r) for r in items]
    messages = json.loads(http_body)["batch"]
    http_incoming = [core.from_segment(m) for m in messages]
    accepted = [core.accept(i, now) for i in grpc_incoming]
    http_accepted = [core.accept(i, now) for i in http_incoming]
    events = [build_event(i, received_at=now, source=SOURCE, correlation_id="c", received_ts=received_ts)
              for i in grpc_incoming]
    topology = eventlog.Topology("bench")
    results = [ingest_pb2.ItemResult(index=i, event_id=e.id, stream_sequence=i + 1) for i, e in enumerate(events)]

    def envelope(a: core.Accepted) -> Any:
        from cdp_ingest.ingestor import envelope as build
        return build(a, received_at=received_ts, source=SOURCE, correlation_id="c")

    steps: dict[str, dict[str, Callable[[], object]]] = {
        "grpc": {
            "BatchRequest.FromString": lambda: ingest_pb2.BatchRequest.FromString(grpc_body),
            "api.to_incoming": lambda: [api.to_incoming("track", r) for r in items],
            "core.accept": lambda: [core.accept(i, now) for i in grpc_incoming],
            "ingestor.envelope": lambda: [envelope(a) for a in accepted],
            "Event.ByteSize": lambda: [e.ByteSize() for e in events],
            "Outgoing + headers + encode": lambda: [
                (eventlog.Outgoing(topology.collected(e.type), e).headers(), eventlog.encode(e)) for e in events],
            "BatchResponse (results + serialize)": lambda: ingest_pb2.BatchResponse(
                results=results, stored=n).SerializeToString(),
        },
        "http": {
            "json.loads": lambda: json.loads(http_body),
            "core.from_segment": lambda: [core.from_segment(m) for m in messages],
            "core.accept": lambda: [core.accept(i, now) for i in http_incoming],
            "ingestor.envelope": lambda: [envelope(a) for a in http_accepted],
            "Event.ByteSize": lambda: [e.ByteSize() for e in events],
            "Outgoing + headers + encode": lambda: [
                (eventlog.Outgoing(topology.collected(e.type), e).headers(), eventlog.encode(e)) for e in events],
        },
    }
    costs: dict[str, dict[str, float]] = {}
    for path, funcs in steps.items():
        costs[path] = {}
        for name, func in funcs.items():
            best = math.inf
            for _ in range(repeat):
                began = time.perf_counter()
                func()
                best = min(best, time.perf_counter() - began)
            costs[path][name] = 1e6 * best / n
        costs[path]["total (no I/O)"] = sum(costs[path].values())
    return costs


def print_stage_costs(costs: dict[str, dict[str, float]]) -> None:
    for path, steps in costs.items():
        print(f"\n{path} path, CPU per event in-process (us, best of 5, no I/O):")
        for name, us in steps.items():
            print(f"  {name:40} {us:7.1f}")


# --- main ---------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, url: str, server_pid: int, logs: Path) -> dict[str, list[dict[str, Any]]]:
    raw: dict[str, list[dict[str, Any]]] = {kind: [] for kind in (*RAW_MODES, *SERVICE_KINDS)}
    async with Log(url, server_pid) as log:
        for run in range(args.runs):
            tag = f"r{run}-{uuid.uuid4().hex[:8]}"
            deadline = time.monotonic() + args.wait_quiet
            while (load := await asyncio.to_thread(machine_load)) > QUIET_CORES and time.monotonic() < deadline:
                pass
            if load > QUIET_CORES:
                print(f"note: {load:.2f} cores busy with other processes before run {run + 1}", flush=True)
            began = time.perf_counter()
            # Each measurement has its own streams, so the same event ids can be used in each.
            items, warm = envelopes(tag, args.events), envelopes(f"{tag}w", args.batch)
            for mode in RAW_MODES:
                raw[mode].append(await measure_raw(log, mode, items, warm, args.batch, args.concurrency))
            raw["grpc_batch"].append(await measure_grpc_batch(
                log, args.events, args.batch, args.concurrency, tag, logs))
            raw["http_batch"].append(await measure_http_batch(
                log, args.events, args.batch, args.concurrency, tag, logs))
            raw["track"].append(await measure_track(log, args.rate, args.duration, tag, logs))
            t = raw["track"][-1]
            print(f"run {run + 1}/{args.runs} ({time.perf_counter() - began:.0f} s): "
                  f"publish_async {raw['publish_async'][-1]['events_per_s']:,.0f} ev/s "
                  f"(all at once {raw['publish_async_all'][-1]['events_per_s']:,.0f}), "
                  f"Publisher {raw['publisher'][-1]['events_per_s']:,.0f}, "
                  f"grpc {raw['grpc_batch'][-1]['events_per_s']:,.0f}, "
                  f"http {raw['http_batch'][-1]['events_per_s']:,.0f}; "
                  f"track p50/p99 {t['p50_ms']:.2f}/{t['p99_ms']:.2f} ms at {t['achieved_rate']:.0f}/s; "
                  f"other load up to {max(r[-1]['cpu']['foreign_cores'] for r in raw.values()):.2f} cores",
                  flush=True)
    return raw


async def profile(args: argparse.Namespace, url: str, server_pid: int, logs: Path, out_dir: Path,
                  stamp: str) -> dict[str, Any]:
    report: dict[str, Any] = {}
    tag = f"p-{uuid.uuid4().hex[:8]}"
    report["stage_costs_us"] = costs = stage_costs()
    print_stage_costs(costs)
    async with Log(url, server_pid) as log:
        floor = report["unary_floor"] = await measure_unary_floor(log, args.rate, 5.0, tag, logs)
        floor["jetstream_single"] = [await measure_single_publish(log, args.rate, 5.0, tag)]
        print(f"\nopen loop at {args.rate:g}/s, no profiler: CPU per request of client / nats-server / ingest (us), "
              "p50 / p99 (ms), other load (cores)")
        for name in ("jetstream_single", "health", "track"):
            for r in floor[name]:
                per = r["cpu_us_per_event"]
                print(f"  {name:16} {per['client']:5.0f} / {per['nats_server']:4.0f} / {per['ingest']:5.0f}    "
                      f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}    {r['cpu']['foreign_cores']:.2f}")
        items, warm = envelopes(tag, args.events), envelopes(f"{tag}w", args.batch)
        for mode in ("publish_async", "publisher"):
            report[mode] = await measure_raw(log, mode, items, warm, args.batch, args.concurrency)
            print(f"{mode} {report[mode]['events_per_s']:,.0f} ev/s")
        for label, measure in (("grpc_batch", measure_grpc_batch), ("http_batch", measure_http_batch)):
            path = out_dir / f"ingest-{label}-{stamp}.prof"
            result = await measure(log, args.events, args.batch, args.concurrency, tag, logs, path)
            print(f"{label} under cProfile: {result['events_per_s']:,.0f} ev/s (profiler overhead included)")
            report[label] = {**result, "profile": str(path), **print_profile(path, label, args.events)}
        path = out_dir / f"ingest-track-{stamp}.prof"
        # A fifth of the rate: the profiler must not saturate the service, or queueing dominates.
        result = await measure_track(log, args.rate / 5, 10.0, tag, logs, path)
        print(f"track under cProfile: p50/p99 {result['p50_ms']:.2f}/{result['p99_ms']:.2f} ms")
        report["track"] = {**result, "profile": str(path), **print_profile(path, "track", result["ok"])}
    return report


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_async(coroutine: Awaitable[T]) -> T:
    """asyncio.run, with SIGTERM cancelling the work cleanly like Ctrl-C does (so every `finally`
    that stops a service or drops streams runs) and ending as KeyboardInterrupt."""

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coroutine

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per throughput measurement")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the table shows medians")
    parser.add_argument("--batch", type=int, default=500, help="events per Batch call / HTTP body")
    parser.add_argument("--concurrency", type=int, default=4, help="batch calls in flight")
    parser.add_argument("--workers", type=int, default=1,
                        help="ingest worker processes (CDP_WORKERS); one per core is how to deploy it")
    parser.add_argument("--rate", type=float, default=500.0, help="Track requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of Track load")
    parser.add_argument("--json", type=Path, help="where to write raw numbers and medians "
                        "(default bench/results/ingest-<date>.json)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the service (cProfile) under batch and Track load instead of benchmarking")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to leave the CPU idle")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (nats store, service logs)")
    args = parser.parse_args(argv)
    if args.events < args.batch or args.runs < 1 or args.workers < 1:
        parser.error("--events must be at least --batch, --runs and --workers at least 1")
    global WORKERS
    WORKERS = args.workers

    # Ctrl-C even when started in the background (where SIGINT may be ignored); SIGTERM likewise.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    results_dir = BENCH_DIR / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cdp-bench-"))
    logs = tmp / "logs"
    logs.mkdir()
    server: NatsServer | None = None
    began = time.perf_counter()
    try:
        info = machine()
        server = start_nats(tmp / "nats", log_file=logs / "nats-server.log")
        _children.append(server.process)
        print(f"nats-server {server.url} (store {tmp / 'nats'}); {info['cpu']}, {info['cores']} cores", flush=True)
        if args.profile:
            report = run_async(profile(args, server.url, server.process.pid, logs, results_dir, stamp))
            out = args.json or results_dir / f"ingest-profile-{stamp}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"machine": info, "settings": vars(args) | {"json": str(out)},
                                       "profile": report}, indent=2, default=str))
            print(f"\nJSON: {out}")
            return 0
        raw = run_async(bench(args, server.url, server.process.pid, logs))
        medians = summarize(raw)
        render(info, args, raw, medians)
        out = args.json or results_dir / f"ingest-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        document = {"machine": info, "settings": vars(args) | {"json": str(out)},
                    "wall_seconds": time.perf_counter() - began, "medians": medians, "raw": raw}
        out.write_text(json.dumps(document, indent=2, default=str))
        print(f"JSON: {out}  (wall time {time.perf_counter() - began:.0f} s)")
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans behind
        for process in reversed(list(_children)):
            with contextlib.suppress(Exception):
                _stop_process(process)
        if server is not None:
            server.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
