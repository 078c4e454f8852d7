#!/usr/bin/env python
"""The whole platform in one benchmark, against the raw JetStream limit, in one run on one machine.

    .venv/bin/python bench/suite.py [--runs R] [--smoke] [--json OUT] ...    (or: cdp bench, make bench)

One nats-server (JetStream) and one embedded PostgreSQL are started in a temp dir for the whole
invocation. First the parts, each --runs times (medians), with the other benches' own functions:

  ceiling        plain nats-py on the suite's event mix (bench/identity.py's workload): pipelined
                 publish_async (bench/ingest.py's measure_raw) and a pull consumer (fetch 200, ack
                 each; bench/identity.py's measure_ceiling)
  ingest         gRPC Batch and HTTP /v1/batch into `python -m cdp_ingest` (bench/ingest.py)
  profile        live projection, `cdp replay profile` rebuild and GetProfile latency on preloaded
                 profiles (bench/profile.py's measure_live, measure_latency, build_preload)
  lean pipeline  the least the suite must do, as four lean stages in their own processes, on the
                 suite's event mix published as fast as the log takes it: an upper bound for the
                 suite (bench/pipeline.py's measure)

Then the whole suite: `cdp up` itself (six services and its SMTP sink, on the bench's nats-server
and PostgreSQL through CDP_NATS_URL / CDP_DATABASE_URL), with the demo's segments and campaign
plus a probe segment and campaign. An open-loop load (HTTP /v1/batch, 20 requests/s, the
identity bench's mix of events) runs at a rate for --step-seconds; every second the lag (pending +
unacknowledged) of every durable consumer is read from JetStream consumer info. A step is
sustained when ingest answered every request in time and no consumer's lag grew over the second
half of the step (see judge()). The pipeline drains between steps. Rates double from
--start-rate until a step fails, then the gap is bisected (--refine); --rates gives a fixed list.

Freshness: at a fixed rate below the sustained one (--freshness-rate, default half of it), probes
(an identify of a new customer, 4/s) enter a probe segment whose campaign emails them. Each
probe's stages are timed from the log: COLLECTED -> IDENTITY resolved -> PROFILE changed ->
SEGMENT entered (JetStream's stored times), and the email's arrival in the SMTP sink's Maildir
(file mtime). Last, peak memory (VmHWM) of every service process. A table with ratios to the
ceiling, and JSON with everything (default bench/results/suite-<date>.json). See bench/suite.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.parser
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats.errors
import nats.js.errors
import psutil
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cdp.activation.v1 import activation_pb2_grpc
from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2_grpc
from cdp.v1 import event_pb2
from cdp_cli import demo
from cdp_cli.infra import start_nats, start_postgres
from cdp_cli.settle import settle
from cdp_cli.suite import SERVICES
from cdp_common import convert, eventlog

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


# bench/ is not a package: bench/pipeline.py is imported as bench_pipeline, and it loads bench/profile.py,
# which loads bench/identity.py, which loads bench/ingest.py.
_spec = importlib.util.spec_from_file_location("bench_pipeline", BENCH_DIR / "pipeline.py")
assert _spec is not None and _spec.loader is not None
lean = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lean)
pb, idb, ib = lean.pb, lean.idb, lean.ib
_children: list[subprocess.Popen[bytes]] = ib._children

TARGET_SUSTAINED = 3000.0  # events/s through the whole suite on 2 cores (issue #6)
# The load: one HTTP batch per tick, so that the client costs little even at thousands of events/s.
TICKS_PER_SECOND = 20
# A consumer keeps up when, over the second half of a step, its lag grew by at most this share of
# the offered rate per second (least-squares slope), or it never was more than LAG_FLOOR_SECONDS of
# traffic (at least LAG_FLOOR_MIN messages) behind: fetched batches make a healthy consumer's lag
# saw-tooth, and on a short window the slope of a small saw-tooth is noise.
GROWTH_TOLERANCE = 0.05
LAG_FLOOR_SECONDS = 1.0
LAG_FLOOR_MIN = 50
# Ingest keeps up when every batch was answered, none later than this after its scheduled send.
INGEST_MAX_DELAY_MS = 2000.0
MIN_RATE = 10.0
DRAIN_TIMEOUT = 900.0
PROBE_RATE = 4.0
PROBE_SEGMENT = "bench-probe"
PROBE_TRAIT = "bench_probe"
EMAIL_WAIT = 120.0
SEGMENTS = [{"id": PROBE_SEGMENT, "name": "Freshness probes (bench)",
             "conditions": [{"field": f"traits.{PROBE_TRAIT}", "op": "eq", "value": "true"}]}]
CAMPAIGNS = [{"id": "bench-probe-email", "segment_id": PROBE_SEGMENT, "channel": "email",
              "from_address": "bench@shop.example", "subject_template": "Welcome, {{ traits.first_name }}",
              "body_template": "Hello {{ traits.first_name }}, this is a freshness probe.\n"}]
STAGES = ("resolved", "profile_changed", "segment_entered", "email_in_sink")

# Full run and --smoke; an option given on the command line wins over both.
FULL = {"runs": 3, "events": 20_000, "batch": 500, "concurrency": 4, "profiles": 100_000, "rate": 1000.0,
        "duration": 20.0, "step_seconds": 30.0, "start_rate": 250.0, "max_rate": 8000.0, "refine": 3,
        "rates": None, "warmup": 10.0, "freshness_rate": None, "freshness_seconds": 60.0}
SMOKE = {**FULL, "runs": 1, "events": 1000, "batch": 100, "concurrency": 2, "profiles": 100, "rate": 100.0,
         "duration": 1.0, "step_seconds": 3.0, "start_rate": 20.0, "max_rate": 40.0, "refine": 1, "warmup": 0.0,
         "freshness_rate": 20.0, "freshness_seconds": 3.0}


class Code(idb.Code):  # type: ignore[misc,name-defined]
    """Every service and library: others may edit them while the bench runs."""

    @property
    def dirs(self) -> list[Path]:
        return [self.root / "services", self.root / "libs"]


# --- the parts: ceiling, ingest, profile (the other benches' measurements) -------------------------


async def measure_parts(args: argparse.Namespace, servers: Any, log: Any, workloads: dict[str, Any],
                        preload: dict[str, Any], run: int, tmp: Path) -> dict[str, Any]:
    tag, began = f"r{run}-{uuid.uuid4().hex[:8]}", time.perf_counter()
    mix = [(payload, headers) for _, payload, headers in workloads["suite"].items]
    # The ceiling reads at least 20,000 messages (the stream several times over), but not in a smoke run.
    passes = 1 if args.smoke else idb.ceiling_passes(len(mix))
    out = {"publish": await ib.measure_raw(log, "publish_async", mix, ib.envelopes(f"{tag}w", args.batch),
                                           args.batch, args.concurrency),
           "consume": await idb.measure_ceiling(log, servers, workloads["suite"], passes),
           "grpc_batch": await ib.measure_grpc_batch(log, args.events, args.batch, args.concurrency, tag, servers.logs),
           "http_batch": await ib.measure_http_batch(log, args.events, args.batch, args.concurrency, tag, servers.logs),
           "profile": await pb.measure_live(log, servers, workloads["profile"], "p", rebuild=True),
           "lean": await lean.measure(log, servers, workloads["suite"], run)}
    out["latency"] = await pb.measure_latency(log, servers, preload, args, run, tmp)
    rebuild, latency = out["profile"]["rebuild"], out["latency"]["get_profile"]
    print(f"run {run + 1}/{args.runs} ({time.perf_counter() - began:.0f} s): ceiling publish "
          f"{out['publish']['events_per_s']:,.0f} ev/s, consume {out['consume']['events_per_s']:,.0f} ev/s; ingest "
          f"gRPC {out['grpc_batch']['events_per_s']:,.0f}, HTTP {out['http_batch']['events_per_s']:,.0f} ev/s; "
          f"profile live {out['profile']['events_per_s']:,.0f}, rebuild {rebuild['events_per_s'] if rebuild else 0:,.0f}"
          f" ev/s; lean pipeline {out['lean']['events_per_s']:,.0f} ev/s; GetProfile p50/p99 {latency['p50_ms']:.2f}/{latency['p99_ms']:.2f} ms", flush=True)
    return out


# --- the suite, as `cdp up` runs it -----------------------------------------------------------------


SERVICE_LINE = re.compile(r"\s+(\S+)\s+grpc (\S+)")
HTTP_LISTENER = re.compile(r"\shttp (\S+)")
SMTP_LINE = re.compile(r"\s+SMTP\s+\S+ -> (\S+)")


@dataclass
class Suite:
    """`cdp up` in its own process on the bench's servers; addresses from what it prints."""

    servers: Any
    data_dir: Path
    database: str
    workers: int
    process: subprocess.Popen[str] | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    http_url: str = ""
    maildir: Path = Path()
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return self.servers.logs / "cdp-up.log"

    async def start(self) -> float:
        began = time.perf_counter()
        await self.servers.create_database(self.database)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")} | {
            "CDP_NATS_URL": self.servers.nats_url, "CDP_INGEST_WORKERS": str(self.workers),
            "CDP_DATABASE_URL": idb._with_database(self.servers.pg_url, self.database)}
        with open(self.log_file, "ab") as err:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "cdp"), "up", "--data-dir", str(self.data_dir)], env=env,
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        _children.append(self.process)  # type: ignore[arg-type]
        assert self.process.stdout is not None
        while not (line := await asyncio.to_thread(self.process.stdout.readline)).startswith("Press Ctrl-C"):
            if not line:
                raise RuntimeError(f"cdp up exited with {self.process.wait()}:\n{idb._tail(self.log_file)}")
            if found := SERVICE_LINE.match(line):
                self.addresses[found.group(1)] = found.group(2)
                if found.group(1) == "ingest" and (http := HTTP_LISTENER.search(line)):
                    self.http_url = http.group(1)
            elif found := SMTP_LINE.match(line):
                self.maildir = Path(found.group(1))
        modules = {module: name for name, module, _ in SERVICES}
        for child in psutil.Process(self.process.pid).children():
            command = child.cmdline()
            if "-m" in command and command[command.index("-m") + 1] in modules:
                self.pids[modules[command[command.index("-m") + 1]]] = child.pid
        idb._expect(set(self.pids) == set(modules.values()) and bool(self.http_url) and self.maildir != Path(),
                    f"cdp up: services {sorted(self.pids)}, ingest HTTP {self.http_url!r}, Maildir {self.maildir}")
        return time.perf_counter() - began

    def tree(self, name: str) -> list[int]:
        """A service's processes: with CDP_INGEST_WORKERS > 1 ingest's workers are its children."""
        with contextlib.suppress(psutil.Error):
            return [self.pids[name], *(c.pid for c in psutil.Process(self.pids[name]).children(recursive=True))]
        return []

    def usage(self) -> Any:
        assert self.process is not None
        up = self.process.pid
        groups: dict[str, Callable[[], list[int]]] = {
            "client": lambda: [os.getpid()], "nats_server": lambda: [self.servers.nats_pid],
            "postgres": self.servers.postgres_pids, "cdp_up": lambda: [up]}
        for name in self.pids:
            groups[name] = lambda name=name: self.tree(name)  # type: ignore[misc]
        return idb.Usage(groups, reaper={"postgres": lambda: self.servers.postmaster_pid})

    def memory(self) -> dict[str, dict[str, Any]]:
        """Peak resident memory (VmHWM) of each service (all its processes), nats-server, and the
        largest PostgreSQL process (its shared buffers count in every backend that touched them)."""
        out = {name: {"peak_mib": sum(_vm_hwm(p) for p in self.tree(name)), "processes": len(self.tree(name))}
               for name in self.pids}
        out["nats-server"] = {"peak_mib": _vm_hwm(self.servers.nats_pid), "processes": 1}
        pg = self.servers.postgres_pids()
        out["postgres"] = {"peak_mib": max((_vm_hwm(p) for p in pg), default=0.0), "processes": len(pg),
                           "largest_process": True}
        return out

    async def configure(self) -> None:
        """The demo's segments and campaign (the load's buyers get emails), and the probes'."""
        async with grpc.aio.insecure_channel(self.addresses["segmentation"]) as seg, \
                grpc.aio.insecure_channel(self.addresses["activation"]) as act:
            stubs = (segmentation_pb2_grpc.SegmentationServiceStub(seg), activation_pb2_grpc.ActivationServiceStub(act))
            await demo.configure(*stubs)
            await demo.configure(*stubs, SEGMENTS, CAMPAIGNS)

    async def stop(self) -> None:
        if self.process is not None:
            await asyncio.to_thread(ib._stop_process, self.process, 90.0)


def _vm_hwm(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --- load steps ----------------------------------------------------------------------------------


def load_bodies(rate: float, seconds: float, tag: str) -> tuple[list[bytes], float]:
    """HTTP /v1/batch bodies, one per tick, of rate * seconds events of the identity bench's mix
    (new and returning visitors, logged-in users, sign-ups, log-ins that merge), ids unique to
    `tag`; and the ticks per second."""
    ticks = min(float(TICKS_PER_SECOND), rate)
    count, events = max(1, round(ticks * seconds)), max(1, round(rate * seconds))
    messages, _, _ = idb.segment_messages(events, seed=zlib.crc32(tag.encode()))
    for message in messages:
        message["messageId"] = f"{tag}-{message['messageId']}"
    bounds = [round(k * events / count) for k in range(count + 1)]
    return [json.dumps({"batch": messages[a:b]}).encode() for a, b in zip(bounds, bounds[1:]) if b > a], ticks


async def lag_samples(js: Any, topology: eventlog.Topology, began: float, every: float,
                      out: list[tuple[float, dict[str, int]]], stop: asyncio.Event) -> None:
    """Every `every` seconds, pending + unacknowledged messages of every durable consumer."""
    while not stop.is_set():
        lags: dict[str, int] = {}
        for area in eventlog.AREAS:
            for info in await js.consumers_info(topology.stream(area)):
                lags[info.name] = (info.num_pending or 0) + (info.num_ack_pending or 0)
        out.append((time.perf_counter() - began, lags))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def judge(samples: Sequence[tuple[float, dict[str, int]]], rate: float, seconds: float,
          sent: dict[str, Any]) -> dict[str, Any]:
    """Sustained: ingest answered every batch, none later than INGEST_MAX_DELAY_MS after its
    schedule, and over the second half of the step each consumer's lag either stayed within the
    floor or grew by at most GROWTH_TOLERANCE * rate per second (least-squares slope)."""
    floor = max(LAG_FLOOR_MIN, LAG_FLOOR_SECONDS * rate)
    consumers = {}
    for name in sorted({n for _, lags in samples for n in lags}):
        points = [(t, lags[name]) for t, lags in samples if name in lags and seconds / 2 <= t <= seconds]
        values = [v for _, v in points]
        slope = statistics.linear_regression([t for t, _ in points], values).slope if len(points) >= 3 else 0.0
        peak = max(values, default=0)
        consumers[name] = {"slope_per_s": slope, "peak": peak, "last": values[-1] if values else 0,
                           "kept_up": peak <= floor or slope <= GROWTH_TOLERANCE * rate}
    ingest_ok = sent["errors"] == 0 and sent["max_ms"] <= INGEST_MAX_DELAY_MS
    return {"sustained": ingest_ok and all(c["kept_up"] for c in consumers.values()), "ingest_kept_up": ingest_ok,
            "consumers": consumers}


@dataclass
class Pipeline:
    """The running suite under load: its log, the load client and the CPU accounting."""

    suite: Suite
    js: Any
    topology: eventlog.Topology
    session: aiohttp.ClientSession
    stored: int = 0

    async def post(self, body: bytes) -> None:
        async with self.session.post(f"{self.suite.http_url}/v1/batch", data=body) as response:
            reply = await response.json()
            if response.status != 200 or reply.get("rejected"):
                raise RuntimeError(f"HTTP {response.status}: {str(reply)[:300]}")
            self.stored += reply["stored"]

    async def step(self, rate: float, seconds: float, label: str,
                   alongside: Callable[[], Awaitable[Any]] | None = None) -> dict[str, Any]:
        """`rate` events/s for `seconds`, open loop; judged, then drained."""
        bodies, ticks = load_bodies(rate, seconds, f"{label}-{uuid.uuid4().hex[:6]}")
        samples: list[tuple[float, dict[str, int]]] = []
        stop = asyncio.Event()
        began = time.perf_counter()
        sampler = asyncio.create_task(lag_samples(self.js, self.topology, began, min(1.0, seconds / 8), samples, stop))
        usage = self.suite.usage()
        usage.start()
        stored_before = self.stored
        loops = [ib.open_loop(self.post, bodies, ticks, [os.getpid(), self.suite.servers.nats_pid], None)]
        if alongside is not None:
            loops.append(alongside())
        sent, *beside = await asyncio.gather(*loops)
        used = usage.stop()
        stop.set()
        await sampler
        events = self.stored - stored_before
        verdict = judge(samples, rate, seconds, sent)
        drain_began = time.perf_counter()
        await settle(self.js, self.topology, timeout=DRAIN_TIMEOUT)
        result = {"rate": rate, "seconds": seconds, "events": events, **verdict,
                  "ingest": {k: sent[k] for k in ("errors", "error_samples", "p50_ms", "p99_ms", "max_ms")},
                  "busy_cores": {k: v / used["seconds"] for k, v in used["cpu_s"].items()},
                  "cpu_us_per_event": {k: 1e6 * v / max(events, 1) for k, v in used["cpu_s"].items()},
                  "foreign_cores": used["foreign_cores"], "drain_s": time.perf_counter() - drain_began,
                  "samples": samples}
        if beside:
            result["alongside"] = beside[0]
        slowest = max(verdict["consumers"].items(), key=lambda kv: kv[1]["slope_per_s"], default=("-", {}))
        print(f"  {label} {rate:,.0f} ev/s for {seconds:g} s: {'sustained' if verdict['sustained'] else 'NOT sustained'}"
              f" (ingest max delay {sent['max_ms']:.0f} ms, {sent['errors']} errors; steepest lag {slowest[0]} "
              f"{slowest[1].get('slope_per_s', 0):+.0f}/s, peak {slowest[1].get('peak', 0):,}; drained in "
              f"{result['drain_s']:.0f} s; other load {used['foreign_cores']:.2f} cores)", flush=True)
        return result


async def search(pipeline: Pipeline, args: argparse.Namespace) -> dict[str, Any]:
    """The highest sustained rate: a fixed list (--rates), or doubling from --start-rate until a
    step fails (halving if the first one does), then --refine bisections of the gap."""
    steps: list[dict[str, Any]] = []

    async def trial(rate: float) -> bool:
        steps.append(await pipeline.step(rate, args.step_seconds, "step"))
        return bool(steps[-1]["sustained"])

    if args.rates:
        for rate in (float(r) for r in args.rates.split(",")):
            await trial(rate)
    else:
        good, bad, rate = 0.0, 0.0, args.start_rate
        while not bad and rate <= args.max_rate:
            good, bad = (rate, bad) if await trial(rate) else (good, rate)
            rate *= 2
        rate = bad / 2
        while not good and rate >= MIN_RATE:
            good, bad = (rate, bad) if await trial(rate) else (good, rate)
            rate /= 2
        for _ in range(args.refine):
            if not good or not bad or bad / good < 1.1:
                break
            rate = round((good + bad) / 2, -1 if bad - good > 40 else 0)
            good, bad = (rate, bad) if await trial(rate) else (good, rate)
    sustained = max((s["rate"] for s in steps if s["sustained"]), default=0.0)
    return {"sustained_rate": sustained, "steps": steps}


# --- freshness -------------------------------------------------------------------------------------


@dataclass
class Probes:
    """New customers identifying with a unique email and the probe trait, sent over gRPC Identify
    with their own correlation id; their stream sequences in COLLECTED come back in the replies."""

    address: str
    tag: str
    sent_at: dict[str, float] = field(default_factory=dict)
    sequence: dict[str, int] = field(default_factory=dict)

    def requests(self, count: int) -> list[ingest_pb2.IdentifyRequest]:
        now = eventlog.timestamp(eventlog.now())
        out = []
        for i in range(count):
            user = f"probe-{self.tag}-{i}"
            address = f"{user}@probe.example.com"
            out.append(ingest_pb2.IdentifyRequest(
                event_id=user, identifiers=event_pb2.Identifiers(user_id=user, email=address), timestamp=now,
                traits=convert.dict_to_struct({"email": address, "first_name": "Probe", PROBE_TRAIT: True})))
        return out

    async def run(self, seconds: float) -> dict[str, Any]:
        async with grpc.aio.insecure_channel(self.address) as channel:
            identify = ingest_pb2_grpc.IngestServiceStub(channel).Identify

            async def send(request: ingest_pb2.IdentifyRequest) -> None:
                self.sent_at[request.event_id] = time.time()
                reply = await identify(request, metadata=(("x-correlation-id", request.event_id),), timeout=10)
                self.sequence[request.event_id] = reply.stream_sequence

            return dict(await ib.open_loop(send, self.requests(max(1, round(PROBE_RATE * seconds))), PROBE_RATE,
                                           [os.getpid()] * 2, None))

    @staticmethod
    def email(probe: str) -> str:
        return f"{probe}@probe.example.com"


async def read_since(js: Any, stream: str, since: datetime, headers_only: bool) -> list[Any]:
    """Every message stored in `stream` at or after `since`, through a short-lived consumer that
    acknowledges nothing (headers_only: without the payloads)."""
    last = (await js.stream_info(stream)).state.last_seq
    name = f"bench-read-{uuid.uuid4().hex[:10]}"
    await js.add_consumer(stream, ConsumerConfig(
        name=name, deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since, ack_policy=AckPolicy.NONE,
        headers_only=headers_only, mem_storage=True, inactive_threshold=60.0))
    found: list[Any] = []
    try:
        sub = await js.pull_subscribe_bind(name, stream=stream)
        while not found or found[-1].metadata.sequence.stream < last:
            try:
                found.extend(await sub.fetch(1000, timeout=5))
            except nats.errors.TimeoutError:
                break
        await sub.unsubscribe()
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(stream, name)
    return found


def sink_arrivals(maildir: Path, seen: dict[str, tuple[str, float]]) -> dict[str, float]:
    """When each recipient's first email was written to the sink's Maildir (file mtime); `seen`
    caches the files already parsed."""
    parser = email.parser.BytesHeaderParser()
    for folder in ("new", "cur"):
        for path in (maildir / folder).glob("*"):
            if path.name not in seen:
                with contextlib.suppress(OSError), path.open("rb") as file:
                    seen[path.name] = (str(parser.parse(file).get("To", "")), path.stat().st_mtime)
    arrivals: dict[str, float] = {}
    for recipient, at in seen.values():
        arrivals[recipient] = min(at, arrivals.get(recipient, at))
    return arrivals


async def trace(js: Any, topology: eventlog.Topology, probes: Probes, since: datetime,
                arrivals: dict[str, float]) -> dict[str, Any]:
    """Each probe's stages in seconds after its event was stored in COLLECTED (log times)."""
    wanted = set(probes.sequence)
    first: dict[tuple[str, str], float] = {}

    def seen(stage: str, probe: str, msg: Any) -> None:
        first.setdefault((stage, probe), msg.metadata.timestamp.timestamp())

    for msg in await read_since(js, topology.stream("identity"), since, headers_only=True):
        if msg.subject.endswith(".resolved") and (probe := msg.headers.get(eventlog.CORRELATION_HEADER)) in wanted:
            seen("resolved", probe, msg)
    for msg in await read_since(js, topology.stream("profile"), since, headers_only=True):
        if msg.headers.get(eventlog.TYPE_HEADER) == "profile_changed" and (
                probe := msg.headers.get(eventlog.CORRELATION_HEADER)) in wanted:
            seen("profile_changed", probe, msg)
    for msg in await read_since(js, topology.stream("segment"), since, headers_only=False):
        if (probe := (msg.headers or {}).get(eventlog.CORRELATION_HEADER)) in wanted:
            event = eventlog.decode(msg.data)
            if event.type == "segment_entered" and event.membership.segment_id == PROBE_SEGMENT:
                seen("segment_entered", probe, msg)
    stages: dict[str, list[float]] = {stage: [] for stage in ("accepted", *STAGES)}
    missing = {stage: 0 for stage in STAGES}
    # Each probe by when it was sent (s after the first), with its stages in ms (None: missing):
    # whether the slow ones came together.
    each: list[list[float | None]] = []
    began = min(probes.sent_at.values(), default=0.0)
    for probe, sequence in probes.sequence.items():
        collected = (await js.get_msg(topology.stream("collected"), sequence)).time.timestamp()
        stages["accepted"].append(collected - probes.sent_at[probe])
        times = {stage: first.get((stage, probe)) for stage in STAGES[:-1]}
        times["email_in_sink"] = arrivals.get(Probes.email(probe))
        for stage, at in times.items():
            if at is None:
                missing[stage] += 1
            else:
                stages[stage].append(at - collected)
        each.append([round(probes.sent_at[probe] - began, 3),
                     *(None if at is None else round(1000 * (at - collected), 1) for at in times.values())])
    return {"probes": len(probes.sequence), "missing": missing, "each": sorted(each, key=lambda row: row[0] or 0.0),
            "stages": {stage: {"n": len(values), "p50_ms": 1000 * ib.pct(values, 50) if values else None,
                               "p99_ms": 1000 * ib.pct(values, 99) if values else None,
                               "max_ms": 1000 * max(values) if values else None}
                       for stage, values in stages.items()}}


async def freshness(pipeline: Pipeline, rate: float, seconds: float) -> dict[str, Any]:
    probes = Probes(pipeline.suite.addresses["ingest"], uuid.uuid4().hex[:8])
    since = eventlog.now() - timedelta(seconds=1)
    step = await pipeline.step(rate, seconds, "freshness", lambda: probes.run(seconds))
    step.pop("samples")
    deadline, seen = time.monotonic() + EMAIL_WAIT, {}
    wanted = {Probes.email(p) for p in probes.sequence}
    while not wanted <= set(arrivals := sink_arrivals(pipeline.suite.maildir, seen)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    traced = await trace(pipeline.js, pipeline.topology, probes, since, arrivals)
    s = traced["stages"]
    print(f"  freshness at {rate:,.0f} ev/s, {traced['probes']} probes: p50/p99 "
          + ", ".join(f"{stage} {_ms(s[stage]['p50_ms'])}/{_ms(s[stage]['p99_ms'])}" for stage in STAGES)
          + (f"; missing {traced['missing']}" if any(traced["missing"].values()) else "")
          + (f"; {step['alongside']['errors']} probes refused" if step["alongside"]["errors"] else ""), flush=True)
    # A probe ingest refused never reached the log: counted here, not among the traced ones.
    return {"rate": rate, "seconds": seconds, **traced, "probes_failed": step["alongside"]["errors"], "step": step}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


async def measure_suite(args: argparse.Namespace, suite: Suite) -> list[dict[str, Any]]:
    started = await suite.start()
    print(f"cdp up: six services healthy in {started:.1f} s ({suite.data_dir})", flush=True)
    await suite.configure()
    topology = eventlog.Topology("cdp")
    runs = []
    async with idb.Log(suite.servers.nats_url) as log, aiohttp.ClientSession(
            headers={"Content-Type": "application/json"}, connector=aiohttp.TCPConnector(limit=64)) as session:
        pipeline = Pipeline(suite, log.js, topology, session)
        if args.warmup:
            (await pipeline.step(args.start_rate if not args.rates else float(args.rates.split(",")[0]),
                                 args.warmup, "warm-up")).pop("samples")
        for run in range(args.suite_runs):
            await _wait_quiet(args, f"suite run {run + 1}")
            found = await search(pipeline, args)
            rate = args.freshness_rate or max(MIN_RATE, (found["sustained_rate"] // 2 // 10) * 10)
            runs.append({**found, "freshness": await freshness(pipeline, rate, args.freshness_seconds)})
            print(f"suite run {run + 1}/{args.suite_runs}: sustained {found['sustained_rate']:,.0f} ev/s", flush=True)
    runs[-1]["memory"] = suite.memory()
    await suite.stop()
    return runs


# --- the report ------------------------------------------------------------------------------------


def summarize(parts: list[dict[str, Any]], suite_runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per figure: median over runs, each run's value, the ratio to the ceiling, the goal."""
    rows: dict[str, dict[str, Any]] = {}

    def add(key: str, label: str, values: Sequence[float | None], unit: str, *, ceiling: str | None = None,
            goal: str = "", met: Callable[[float], bool] | None = None, other: Sequence[float] = ()) -> None:
        known = [v for v in values if v is not None]
        value = statistics.median(known) if known else None
        row: dict[str, Any] = {"label": label, "value": value, "unit": unit, "runs": list(values), "goal": goal,
                               "met": None if value is None or met is None else met(value),
                               "other_load": statistics.median(other) if other else None}
        if ceiling is not None and value is not None:
            row["vs_ceiling"], row["ceiling"] = value / rows[ceiling]["value"], ceiling
        rows[key] = row

    def pick(run: dict[str, Any], path: Sequence[str]) -> dict[str, Any] | None:
        for key in path:
            run = run[key] if run else None  # type: ignore[assignment]
        return run

    def rate(*path: str) -> list[float | None]:
        return [p["events_per_s"] if (p := pick(r, path)) else None for r in parts]

    def other(*path: str) -> list[float]:
        # bench/ingest.py keeps it under "cpu", the others beside the rate.
        return [p["foreign_cores"] if "foreign_cores" in p else p["cpu"]["foreign_cores"]
                for r in parts if (p := pick(r, path))]

    add("ceiling_publish", "ceiling: nats-py publish_async", rate("publish"), "ev/s", other=other("publish"))
    add("ceiling_consume", "ceiling: nats-py pull consume", rate("consume"), "ev/s", other=other("consume"))
    for kind, label in (("grpc_batch", "ingest gRPC Batch"), ("http_batch", "ingest HTTP /v1/batch")):
        add(f"ingest_{kind}", label, rate(kind), "ev/s", ceiling="ceiling_publish", other=other(kind),
            goal=f">= {ib.TARGET_BATCH_RATIO:.2f}x", met=lambda v: v / rows["ceiling_publish"]["value"] >= ib.TARGET_BATCH_RATIO)
    add("suite_sustained", "whole suite (cdp up) sustained", [r["sustained_rate"] for r in suite_runs], "ev/s",
        ceiling="ceiling_publish", goal=f">= {TARGET_SUSTAINED:,.0f}", met=lambda v: v >= TARGET_SUSTAINED,
        other=[statistics.median(s["foreign_cores"] for s in r["steps"]) for r in suite_runs])
    add("lean_pipeline", "  lean pipeline, the least it must do (upper bound)", rate("lean"), "ev/s",
        ceiling="ceiling_publish", other=other("lean"))
    add("lean_pipeline_cpu", "  lean pipeline: CPU per event, all processes",
        [r["lean"]["cpu_us_per_event_all"] for r in parts], "µs", other=other("lean"))
    for stage, label in (("resolved", "identity resolved"), ("profile_changed", "profile updated"),
                         ("segment_entered", "segment entered"), ("email_in_sink", "email in SMTP sink")):
        for p in ("p50", "p99"):
            add(f"freshness_{stage}_{p}", f"freshness {p}: {label}",
                [r["freshness"]["stages"][stage][f"{p}_ms"] for r in suite_runs], "ms",
                other=[r["freshness"]["step"]["foreign_cores"] for r in suite_runs])
    add("profile_live", "profile live projection", rate("profile"), "ev/s", ceiling="ceiling_consume",
        goal=f">= {pb.TARGET_LIVE:,.0f}", met=lambda v: v >= pb.TARGET_LIVE, other=other("profile"))
    add("profile_rebuild", "profile rebuild (cdp replay profile)", rate("profile", "rebuild"), "ev/s",
        ceiling="ceiling_consume", goal=f">= {pb.TARGET_REBUILD:,.0f}", met=lambda v: v >= pb.TARGET_REBUILD,
        other=other("profile", "rebuild"))
    add("rebuild_get_profile_max", "  GetProfile slowest during the rebuild",
        [p["answering"]["get_profile"]["max_ms"] if (p := pick(r, ("profile", "rebuild"))) else None for r in parts],
        "ms", other=other("profile", "rebuild"))
    for key, kind, p in (("get_profile_p50", "get_profile", "p50"), ("get_profile_p99", "get_profile", "p99"),
                         ("health_p99", "health", "p99")):
        add(key, f"{'GetProfile' if kind == 'get_profile' else 'health check (floor)'} {p}",
            [r["latency"][kind][f"{p}_ms"] for r in parts], "ms", other=other("latency", kind),
            goal=f"< {pb.TARGET_P99_MS:g} ms" if key == "get_profile_p99" else "",
            met=(lambda v: v < pb.TARGET_P99_MS) if key == "get_profile_p99" else None)
    for name, peak in suite_runs[-1]["memory"].items():
        add(f"memory_{name.replace('-', '_')}", f"peak memory: {name}" + (" (largest process)" if
            peak.get("largest_process") else ""), [peak["peak_mib"]], "MiB")
    return rows


def render(info: dict[str, Any], args: argparse.Namespace, rows: dict[str, dict[str, Any]],
           suite_runs: list[dict[str, Any]], fingerprints: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        return _ms(value) if unit == "ms" else f"{value:,.0f} {unit}".strip()

    def runs(row: dict[str, Any]) -> str:
        return "  ".join(fmt(v, "ms" if row["unit"] == "ms" else "") for v in row["runs"]) if len(row["runs"]) > 1 else ""

    console = Console(width=170)
    console.print(f"[bold]Machine[/] {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM; Python "
                  f"{info['python']} (protobuf {info['protobuf_backend']}); {info['nats_server']}; {info['postgres']}")
    console.print(f"[bold]OS[/] {info['os']}; [bold]date[/] {info['date']}; [bold]code[/] {info['commit']}"
                  + (f" + uncommitted changes to {len(info['modified'])} file(s)" if info["modified"] else "")
                  + f" (sources {', '.join(fingerprints)})")
    if len(fingerprints) > 1:
        console.print("[bold red]The code under test changed while the bench ran[/]: figures mix versions.")
    console.print(f"[bold]Runs[/] parts: {args.runs} ({args.events:,} events each, medians); suite: {args.suite_runs} "
                  f"search(es) of {args.step_seconds:g} s steps, {args.ingest_workers} ingest worker(s), freshness "
                  f"for {args.freshness_seconds:g} s with {PROBE_RATE:g} probes/s; GetProfile at {args.rate:g}/s on "
                  f"{args.profiles:,} profiles")
    table = Table()
    for column in ("measurement", "median", "runs", "vs ceiling", "goal", "other load"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for key, row in rows.items():
        label = row["label"]
        if key == "suite_sustained":
            label += f" ({args.ingest_workers} ingest worker{'s' if args.ingest_workers > 1 else ''})"
        elif key.startswith("freshness_"):
            rates = ", ".join(f"{r['freshness']['rate']:,.0f}" for r in suite_runs)
            label = label.replace("freshness", f"freshness at {rates} ev/s")
        ratio = f"{row['vs_ceiling']:.3f}x {row['ceiling'].split('_')[1]}" if "vs_ceiling" in row else ""
        goal = row["goal"] + ("" if row["met"] is None else " [green]met[/]" if row["met"] else " [red]MISSED[/]")
        table.add_row(label, fmt(row["value"], row["unit"]), runs(row), ratio, goal,
                      "" if row["other_load"] is None else f"{row['other_load']:.2f}")
    console.print(table)
    steps = Table(title="suite load steps: CPU cores busy while loaded", title_justify="left")
    groups = {"ingest": "ing", "identity": "idn", "profile": "prof", "segmentation": "seg", "activation": "act",
              "dmp-bridge": "dmp", "nats_server": "nats", "postgres": "pg", "client": "bench"}
    for column in ("ev/s", "verdict", "steepest lag growth, peak", "ingest max", *groups.values(), "other"):
        steps.add_column(column, justify="right")
    for run in suite_runs:
        for s in [*run["steps"], run["freshness"]["step"]]:
            name, worst = max(s["consumers"].items(), key=lambda kv: kv[1]["slope_per_s"], default=("-", {}))
            steps.add_row(f"{s['rate']:,.0f}" + (" fresh" if s is run["freshness"]["step"] else ""),
                          "[green]kept up[/]" if s["sustained"] else "[red]behind[/]",
                          f"{name} {worst.get('slope_per_s', 0):+,.0f}/s, {worst.get('peak', 0):,}",
                          _ms(s["ingest"]["max_ms"]), *(f"{s['busy_cores'].get(g, 0):.2f}" for g in groups),
                          f"{s['foreign_cores']:.2f}")
    console.print(steps)
    console.print(
        "vs ceiling: the median over the median ceiling of the same run (publish for ingest and the suite, consume "
        "for profile). other load: cores busy with processes outside this bench while measuring (0 = quiet). "
        "Steps: ing idn prof seg act dmp = the six services (all their processes), pg = all PostgreSQL processes, "
        "bench = this client (load, probes, lag polls). "
        "Freshness stages are timed from the probe's event stored in COLLECTED to its first resolved event, "
        "profile_changed and segment_entered in the log, and its email's file in the sink's Maildir.")


async def _wait_quiet(args: argparse.Namespace, what: str) -> None:
    """With --wait-quiet, waits for other processes to leave the CPU (every row shows their load anyway)."""
    if not args.wait_quiet:
        return
    deadline = time.monotonic() + args.wait_quiet
    while (load := await asyncio.to_thread(ib.machine_load)) > idb.QUIET_CORES and time.monotonic() < deadline:
        pass
    if load > idb.QUIET_CORES:
        print(f"note: {load:.2f} cores busy with other processes before {what}", flush=True)


async def bench(args: argparse.Namespace, servers: Any, tmp: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    workloads = {"suite": idb.build_workload(args.events),
                 "profile": pb.build_workload(args.events, max(1000, args.events // 2))}
    parts = []
    async with idb.Log(servers.nats_url) as log:
        log.server_pid = servers.nats_pid  # for bench/ingest.py's CPU accounting
        preload = await pb.build_preload(log, servers, args.profiles)
        print(f"preload: {preload['profiles']:,} profiles in {preload['total_s']:.1f} s", flush=True)
        for run in range(args.runs):
            await _wait_quiet(args, f"run {run + 1}")
            parts.append(await measure_parts(args, servers, log, workloads, preload, run, tmp))
        await servers.drop_database(preload["database"])
    suite = Suite(servers, tmp / "suite", f"bench_suite_{uuid.uuid4().hex[:8]}", args.ingest_workers)
    began = time.perf_counter()
    try:
        runs = await measure_suite(args, suite)
        print(f"suite measured in {time.perf_counter() - began:.0f} s", flush=True)
        return parts, runs
    finally:
        await suite.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    option = parser.add_argument

    def preset(name: str, text: str) -> str:
        def shown(value: Any) -> str:
            return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

        return f"{text} (default {shown(FULL[name])}; --smoke {shown(SMOKE[name])})"

    option("--smoke", action="store_true", help="tiny parameters, about a minute: to see that it all still runs")
    option("--runs", type=int, help=preset("runs", "repetitions of the parts; the table shows medians"))
    option("--events", type=int, help=preset("events", "events per ceiling, ingest and profile measurement"))
    option("--batch", type=int, help=preset("batch", "events per ingest Batch call / HTTP body"))
    option("--concurrency", type=int, help=preset("concurrency", "ingest batch calls in flight"))
    option("--profiles", type=int, help=preset("profiles", "profiles preloaded for GetProfile"))
    option("--rate", type=float, help=preset("rate", "GetProfile (and health check) requests per second"))
    option("--duration", type=float, help=preset("duration", "seconds of GetProfile load"))
    option("--step-seconds", type=float, help=preset("step_seconds", "seconds of load per suite step"))
    option("--start-rate", type=float, help=preset("start_rate", "first rate of the search, events/s"))
    option("--max-rate", type=float, help=preset("max_rate", "the search doubles up to this rate"))
    option("--refine", type=int, help=preset("refine", "bisections between the last sustained and first failed rate"))
    option("--rates", help=preset("rates", "comma-separated rates to step through instead of searching"))
    option("--warmup", type=float, help=preset("warmup", "seconds of unjudged load before the search"))
    option("--freshness-rate", type=float,
           help=preset("freshness_rate", "load rate while timing freshness; none: half the sustained rate"))
    option("--freshness-seconds", type=float, help=preset("freshness_seconds", "seconds of freshness probing"))
    option("--suite-runs", type=int, default=1, help="searches (each with its freshness run) on the one suite")
    option("--ingest-workers", type=int, default=1, help="CDP_INGEST_WORKERS for the suite and CDP_WORKERS for ingest")
    option("--json", type=Path, help="where to write everything (default bench/results/suite-<date>.json)")
    option("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
           help="before each run, wait up to this long for other processes to leave the CPU idle")
    option("--keep", action="store_true", help="keep the temp dir (nats store, PostgreSQL data, logs, Maildir)")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.runs, args.suite_runs, args.ingest_workers, args.events, args.profiles) < 1 or args.step_seconds <= 0:
        parser.error("--runs, --suite-runs, --ingest-workers, --events and --profiles must be at least 1")
    ib.WORKERS = args.ingest_workers
    # The parts' services run alone and nothing scrapes them: no Prometheus endpoint, whose fixed
    # default ports would collide with any other suite on the machine (`cdp up` gets its own env).
    os.environ["CDP_METRICS_LISTEN"] = "0"

    stamp, results_dir, tmp, logs = idb.set_up("suite")
    nats_server = postgres = None
    began = time.perf_counter()
    code = Code()
    try:
        nats_server = start_nats(tmp / "nats", log_file=logs / "nats-server.log")
        _children.append(nats_server.process)
        postgres = start_postgres(tmp / "pg" / "data", keep=args.keep)
        servers = idb.Servers(nats_server.url, nats_server.process.pid, postgres, logs)
        info = idb.machine(servers)
        info["modified"] = subprocess.run(["git", "status", "--porcelain", "--", "services", "libs", "bench"], cwd=REPO,
                                          capture_output=True, text=True, check=False).stdout.splitlines()
        info["postgres"] = "PostgreSQL " + ib.run_async(idb.postgres_info(servers))["settings"]["server_version"]
        fingerprints = [code.fingerprint()]
        print(f"nats-server {nats_server.url}, {info['postgres']} in {tmp}; {info['cpu']}, {info['cores']} cores",
              flush=True)
        parts, suite_runs = ib.run_async(bench(args, servers, tmp))
        fingerprints = sorted({fingerprints[0], code.fingerprint()})
        rows = summarize(parts, suite_runs)
        render(info, args, rows, suite_runs, fingerprints)
        out = args.json or results_dir / f"suite-{stamp}.json"
        for run in suite_runs:
            for step in run["steps"]:
                step["samples"] = [[round(t, 2), lags] for t, lags in step["samples"]]
        return int(idb.save(out, {"machine": info, "settings": vars(args) | {"json": str(out)}, "rows": rows,
                                  "code_fingerprints": fingerprints, "suite": suite_runs, "parts": parts}, began))
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        idb.tear_down(_children, nats_server, postgres, tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
