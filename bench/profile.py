#!/usr/bin/env python
"""Profile projection, rebuild and GetProfile speed against raw JetStream consumption (issue #5).

    .venv/bin/python bench/profile.py [--events N] [--runs R] [--profiles P] [--json OUT] [--profile]

One fresh nats-server (JetStream) and one embedded PostgreSQL for the whole invocation, in a temp
dir. The workload is N resolved events of a B2C shop (page views, Product Viewed, carts, orders
with products, refunds, email engagement, identify with traits and consent, Consent Updated,
loyalty, support tickets, sign-ups and a few profile merges) as identity publishes them: each a
cdp.v1.Event built by ingest's own build_event, with profile_id and the identifiers identity keeps,
on `topology.keyed("identity", profile_id, "resolved")`, merges on `... survivor, "merged"`.
The same events, in the same order, are used by every measurement.

Each run measures, in this order:

  ceiling        plain nats-py: the N events already in a fresh IDENTITY stream, read by a durable
                 pull consumer (fetch 200, ack each); events/s (the stream is read several times
                 when N < 20,000). Beside it, for reference, the service's own lean pull
                 (cdp_common.pull.Puller, one ack per batch), and reference projections of the same
                 events in this process: minimal (counts per profile and the checkpoint in one
                 transaction per batch), + timeline rows, + a fact per touched profile through an
                 outbox, and bulk (timeline rows by COPY): what the service's goals rest on
  live           the profile service as its own process (`python -m cdp_profile`, as `cdp up` runs
                 it) on a fresh database, its IDENTITY stream already holding the events: from the
                 first delivery until the durable `profile-project` has nothing pending or unacked
  rebuild        `cdp replay profile` against that running service, timed (when the command exists)
  latency        the service on a database preloaded once with P (default 100,000) profiles: a
                 separate client process sends grpc.health.v1 Check (the floor), then GetProfile
                 (half by profile_id, half by email), each at a fixed rate on an open-loop schedule

Medians over --runs go to a table; raw numbers and medians to JSON (bench/results/). With each
number comes the CPU each process used and the CPU other processes on the machine took meanwhile.

--profile instead measures where the live projection's time goes: SQL statements per event
(pg_stat_statements), then the service under cProfile. See bench/profile.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import pstats
import random
import signal
import statistics
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
import psutil
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cdp.v1 import event_pb2
from cdp_cli.infra import free_port, start_nats, start_postgres
from cdp_common import eventlog
from cdp_identity import core as identity_core
from cdp_ingest import core as ingest_core
from cdp_ingest.ingestor import build_event

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def _load_identity_bench() -> Any:
    """bench/identity.py (which loads bench/ingest.py): servers, CPU accounting, the drain poll,
    pg_stat_statements, the machine description and signal handling."""
    spec = importlib.util.spec_from_file_location("bench_identity", BENCH_DIR / "identity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_identity"] = module
    spec.loader.exec_module(module)
    return module


idb = _load_identity_bench()
ib = idb.ib

DURABLE = "profile-project"  # the profile service's consumer on the IDENTITY stream
# identity.drain polls the durable named by its module constant: this process never measures
# identity, so it points it at profile's consumer.
idb.DURABLE = DURABLE
CEILING_DURABLE = "bench-ceiling"
FETCH_BATCH = 200
CEILING_MIN_EVENTS = 20_000
SOURCE = "bench"
SEED = 20261129
TARGET_LIVE = 10_000.0  # events/s per replica
TARGET_REBUILD = 20_000.0
TARGET_P99_MS = 5.0
QUIET_CORES = 0.25
DEFAULT_EVENTS = 20_000
MIN_MEASURE_SECONDS = 5.0
# The scoring job runs once, at start, and not again while measuring.
SCORES_INTERVAL = "1000000"
# Preloaded profiles: events folded per profile on average (the first one for each, then a skewed draw).
PRELOAD_EVENTS_PER_PROFILE = 3
PRELOAD_CHUNK = 2000
# `cdp replay profile` (being written): how it finds the running service is settled when it lands.
REBUILD_COMMAND = [str(REPO / ".venv" / "bin" / "cdp"), "replay", "profile"]

PROFILED_MAIN = idb.PROFILED_MAIN.replace('"cdp_identity"', '"cdp_profile"')
# The same, but the profiler starts on SIGUSR1: start-up and the scoring job's first pass (which
# reads and scores every profile) stay out of a GetProfile profile.
PROFILED_ON_SIGNAL = """
import cProfile, runpy, signal, sys
profiler = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
try:
    runpy.run_module("cdp_profile", run_name="__main__", alter_sys=True)
finally:
    profiler.disable()
    profiler.dump_stats(sys.argv[1])
"""
_children: list[subprocess.Popen[bytes]] = ib._children


class Code(idb.Code):  # type: ignore[misc,name-defined]
    """The sources the profile service runs, hashed per launch: others edit them meanwhile."""

    @property
    def dirs(self) -> list[Path]:
        return [self.root / "services" / "profile", self.root / "libs" / "common"]


CODE = Code()


# --- the workload -------------------------------------------------------------------------------

CATEGORIES = ("Apparel", "Footwear", "Accessories", "Home", "Beauty", "Outdoor")
FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman")
CITIES = ("Berlin", "Hamburg", "Munich", "Cologne", "Vienna", "Zurich", "Amsterdam", "Paris")
PAGES = (("Home", "/"), ("Category", "/c/apparel"), ("Search", "/search?q=shoes"), ("Product", "/p/p-1003"),
         ("Cart", "/cart"), ("Account", "/account"), ("Sale", "/sale"))
TIERS = ("bronze", "silver", "gold", "platinum")
CONTEXT = {
    "ip": "203.0.113.7",
    "locale": "de-DE",
    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "library": {"name": "analytics.js", "version": "5.2.0"},
}
# What a known customer does, and how often (relative weights).
KNOWN_MIX = (
    ("page", 20), ("Product Viewed", 20), ("Cart Updated", 4), ("Order Completed", 8), ("Order Refunded", 1),
    ("Email Delivered", 12), ("Email Opened", 6), ("Email Link Clicked", 2), ("identify", 6),
    ("Consent Updated", 2), ("Loyalty Points Earned", 3), ("Loyalty Tier Changed", 1), ("Ticket Opened", 1),
    ("Ticket Resolved", 1),
)
# What an anonymous visitor does; "signup" is an identify that makes them known (same profile).
ANONYMOUS_MIX = (("page", 45), ("Product Viewed", 40), ("Cart Updated", 10), ("signup", 5))
KNOWN_SHARE = 0.55
# Share of events that are a visitor logging in as an existing customer: identity merges the
# visitor's profile into the customer's (profiles_merged, then the resolved identify).
MERGE_SHARE = 0.002


@dataclass(slots=True)
class Shopper:
    index: int
    profile_id: str
    anonymous_id: str
    device_id: str
    category: str
    user_id: str = ""
    email: str = ""
    loyalty_id: str = ""
    orders: list[tuple[str, float]] = field(default_factory=list)
    open_tickets: list[str] = field(default_factory=list)
    balance: int = 0
    tier: int = -1
    events: int = 0
    merged_into: Shopper | None = None

    @property
    def live(self) -> Shopper:
        return self if self.merged_into is None else self.merged_into.live


@dataclass(frozen=True, slots=True)
class Fact:
    """One resolved event as identity publishes it (and, for a log-in, the merge before it)."""

    profile_id: str
    message: dict[str, Any]
    keys: tuple[tuple[str, str], ...]
    when: datetime
    merged: str = ""  # the profile merged into profile_id just before this event


class Shop:
    """A deterministic B2C shop: shoppers with skewed activity and their events, in time order."""

    def __init__(self, profiles: int, seed: int = SEED) -> None:
        rng = self.rng = random.Random(seed)
        self.products = [
            {"product_id": f"p-{c + 1}{k:03d}", "sku": f"SKU-{c + 1}{k:03d}", "name": f"{category} item {k + 1}",
             "category": category, "price": round(rng.uniform(9.9, 149.0), 2)}
            for c, category in enumerate(CATEGORIES) for k in range(8)
        ]
        self.by_category = {c: [p for p in self.products if p["category"] == c] for c in CATEGORIES}
        self.shoppers = [self._shopper(i) for i in range(profiles)]
        # A few customers are very active, most come by now and then.
        self.cumulative = list(itertools.accumulate(rng.paretovariate(1.3) for _ in self.shoppers))
        self.counter = 0

    def _token(self) -> str:
        self.counter += 1
        return f"{self.counter:07d}{self.rng.getrandbits(32):08x}"

    def _shopper(self, i: int) -> Shopper:
        rng = self.rng
        shopper = Shopper(i, str(uuid.UUID(int=rng.getrandbits(128), version=4)), f"anon-{rng.getrandbits(64):016x}",
                          f"dev-{rng.getrandbits(48):012x}", rng.choice(CATEGORIES))
        if rng.random() < KNOWN_SHARE:
            self._make_known(shopper)
        return shopper

    def _make_known(self, s: Shopper) -> None:
        s.user_id = f"u-{s.index:07d}"
        s.email = f"{self.rng.choice(FIRST_NAMES).lower()}.{self.rng.choice(LAST_NAMES).lower()}.{s.index}@example.com"
        if self.rng.random() < 0.4:
            s.loyalty_id = f"L{s.index:08d}"

    def _items(self, s: Shopper, count: int) -> list[dict[str, Any]]:
        rng, items = self.rng, []
        for _ in range(count):
            pool = self.by_category[s.category] if rng.random() < 0.6 else self.products
            items.append({**rng.choice(pool), "quantity": rng.choice((1, 1, 1, 2, 3))})
        return items

    def facts(self, events: int, start: datetime, span: timedelta, cover: bool = False,
              merges: bool = True) -> list[Fact]:
        """`events` events from `start` over `span`; `cover`: every shopper's first event comes first
        (so that each exists as a profile), then the skewed draw."""
        rng = self.rng
        order: list[Shopper] = list(self.shoppers) if cover else []
        if cover:
            rng.shuffle(order)
        order += rng.choices(self.shoppers, cum_weights=self.cumulative, k=max(0, events - len(order)))
        step = span / max(len(order), 1)
        out: list[Fact] = []
        for i, chosen in enumerate(order):
            when = start + i * step
            if merges and rng.random() < MERGE_SHARE and (fact := self._login_merge(when)) is not None:
                out.append(fact)
                continue
            out.append(self._event(chosen.live if chosen.merged_into else chosen, when))
        return out

    def _login_merge(self, when: datetime) -> Fact | None:
        """A visitor who browsed anonymously logs in as an existing customer on that device."""
        rng = self.rng
        for _ in range(20):
            visitor, customer = rng.choice(self.shoppers), rng.choice(self.shoppers)
            if (not visitor.user_id and visitor.events and visitor.merged_into is None and customer.user_id
                    and customer.merged_into is None and customer.events):
                visitor.merged_into = customer
                message = self._base(customer, when, anonymous_id=visitor.anonymous_id, device_id=visitor.device_id)
                message |= {"type": "identify", "traits": {"email": customer.email}}
                customer.events += 1
                return Fact(customer.profile_id, message, self._keys(message), when, merged=visitor.profile_id)
        return None

    def _base(self, s: Shopper, when: datetime, anonymous_id: str = "", device_id: str = "") -> dict[str, Any]:
        message: dict[str, Any] = {
            "messageId": f"ev-{self._token()}", "timestamp": when.isoformat().replace("+00:00", "Z"),
            "anonymousId": anonymous_id or s.anonymous_id, "device_id": device_id or s.device_id, "context": CONTEXT,
        }
        if s.user_id:
            message["userId"] = s.user_id
        if s.loyalty_id:
            message["externalIds"] = {"loyalty_id": s.loyalty_id}
        return message

    @staticmethod
    def _keys(message: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        """The identifiers identity keeps of the event (normalised; an email adds its SHA-256)."""
        raw = {"user_id": message.get("userId", ""), "anonymous_id": message.get("anonymousId", ""),
               "device_id": message.get("device_id", ""),
               "email": message.get("traits", {}).get("email", "") if message["type"] == "identify" else ""}
        return tuple(identity_core.event_identifiers(raw, message.get("externalIds", {})))

    def _event(self, s: Shopper, when: datetime) -> Fact:
        rng = self.rng
        mix = KNOWN_MIX if s.user_id else ANONYMOUS_MIX
        kind = rng.choices([k for k, _ in mix], [w for _, w in mix])[0]
        if kind == "Order Refunded" and not s.orders:
            kind = "Order Completed"
        if kind == "Ticket Resolved" and not s.open_tickets:
            kind = "Ticket Opened"
        if kind.startswith("Loyalty") and not s.loyalty_id:
            kind = "Email Opened"
        if kind == "signup":
            self._make_known(s)
            kind = "identify"
        message = self._base(s, when)
        props: dict[str, Any]
        if kind == "page":
            name, path = rng.choice(PAGES)
            message |= {"type": "page", "name": name, "properties": {
                "path": path, "url": f"https://shop.example.com{path}", "title": f"{name} | Example Shop",
                "referrer": rng.choice(("", "https://www.google.com/", "https://www.instagram.com/"))}}
        elif kind == "identify":
            traits = {"email": s.email, "first_name": s.email.split(".")[0].title(),
                      "last_name": s.email.split(".")[1].title(), "city": rng.choice(CITIES),
                      "plan": rng.choice(("free", "plus", "plus", "pro")), "newsletter": rng.random() < 0.6}
            message |= {"type": "identify", "traits": traits,
                        "consent": {"email.marketing": traits["newsletter"], "sms.marketing": rng.random() < 0.2}}
        else:
            if kind == "Product Viewed":
                product = self._items(s, 1)[0]
                props = {k: product[k] for k in ("product_id", "sku", "name", "category", "price")}
            elif kind == "Cart Updated":
                items = self._items(s, rng.randint(1, 3))
                props = {"cart_id": f"cart-{s.index}", "products": items,
                         "value": round(sum(p["price"] * p["quantity"] for p in items), 2)}
            elif kind == "Order Completed":
                items = self._items(s, rng.randint(1, 4))
                subtotal = round(sum(p["price"] * p["quantity"] for p in items), 2)
                coupon = rng.random() < 0.2
                revenue = round(subtotal * (0.9 if coupon else 1.0), 2)
                total = round(revenue + (4.95 if revenue < 50 else 0.0), 2)
                order_id = f"o-{self._token()}"
                s.orders.append((order_id, total))
                props = {"order_id": order_id, "revenue": revenue, "total": total, "currency": "EUR",
                         "products": items, **({"coupon": "SPRING10"} if coupon else {})}
            elif kind == "Order Refunded":
                order_id, total = rng.choice(s.orders)
                props = {"order_id": order_id, "total": total, "currency": "EUR"}
            elif kind.startswith("Email"):
                campaign = f"cmp-{rng.randint(1, 40):03d}"
                props = {"campaign_id": campaign, "email_id": f"{campaign}-{s.index}"}
                if kind == "Email Link Clicked":
                    props["link_url"] = "https://shop.example.com/sale"
            elif kind == "Consent Updated":
                props = {"channel": rng.choice(("email", "sms", "push")), "purpose": "marketing",
                         "granted": rng.random() < 0.7}
            elif kind == "Loyalty Points Earned":
                points = rng.randint(10, 300)
                s.balance += points
                props = {"points": points, "balance": s.balance, "reason": "purchase"}
            elif kind == "Loyalty Tier Changed":
                previous, s.tier = s.tier, min(s.tier + 1, len(TIERS) - 1)
                props = {"tier": TIERS[s.tier], **({"previous_tier": TIERS[previous]} if previous >= 0 else {})}
            elif kind == "Ticket Opened":
                ticket = f"T-{self._token()}"
                s.open_tickets.append(ticket)
                props = {"ticket_id": ticket, "channel": rng.choice(("email", "chat", "phone")),
                         "subject": "Where is my order?"}
            else:  # Ticket Resolved
                props = {"ticket_id": s.open_tickets.pop(0)}
            message |= {"type": "track", "event": kind, "properties": props}
        s.events += 1
        return Fact(s.profile_id, message, self._keys(message), when)


def _identifiers(keys: Sequence[tuple[str, str]]) -> event_pb2.Identifiers:
    """The kept identifiers as identity puts them on the resolved event (cdp_identity.handlers)."""
    result = event_pb2.Identifiers()
    for id_type, value in keys:
        if id_type in ("user_id", "email", "phone", "anonymous_id", "device_id"):
            setattr(result, id_type, value)
        else:
            result.custom[id_type] = value
    return result


@dataclass
class Workload:
    """The resolved events and merges as (fact, profile_id, payload, headers), in stream order."""

    items: list[tuple[str, str, bytes, dict[str, str]]]
    summary: dict[str, Any]
    expected: dict[str, int]
    live_profiles: list[str]  # the ids of the profiles not merged away

    def addressed(self, topology: eventlog.Topology) -> list[tuple[str, bytes, dict[str, str]]]:
        return [(topology.keyed("identity", pid, fact), payload, headers) for fact, pid, payload, headers in self.items]


def build_workload(events: int, profiles: int) -> Workload:
    shop = Shop(profiles)
    now = eventlog.now()
    facts = shop.facts(events, now - timedelta(days=365), timedelta(days=365) - timedelta(minutes=5))
    items: list[tuple[str, str, bytes, dict[str, str]]] = []
    names: dict[str, int] = {}
    expected = {"resolved": 0, "merged": 0, "orders": 0, "revenue_cents": 0, "refunds": 0}
    touched: set[str] = set()
    merged: set[str] = set()
    for fact in facts:
        event = build_event(ingest_core.from_segment(fact.message), received_at=now, source=SOURCE,
                            correlation_id=str(uuid.UUID(int=shop.rng.getrandbits(128), version=4)))
        event.profile_id = fact.profile_id
        event.identifiers.CopyFrom(_identifiers(fact.keys))
        if fact.merged:
            merge = eventlog.new_event("profiles_merged", event_id=eventlog.derived_id(event.id, "merged"),
                                       source="identity", cause=event)
            merge.profile_id = fact.profile_id
            merge.profiles_merged.survivor_id = fact.profile_id
            merge.profiles_merged.merged_ids.append(fact.merged)
            merge.profiles_merged.reason = "anonymous_id links two profiles"
            merge.profiles_merged.linking_identifiers.add(type="anonymous_id", value=event.identifiers.anonymous_id)
            items.append(("merged", fact.profile_id, eventlog.encode(merge), eventlog.Outgoing("", merge).headers()))
            expected["merged"] += 1
            merged.add(fact.merged)
        items.append(("resolved", fact.profile_id, eventlog.encode(event), eventlog.Outgoing("", event).headers()))
        expected["resolved"] += 1
        touched.add(fact.profile_id)
        label = event.name if event.type == "track" else event.type
        names[label] = names.get(label, 0) + 1
        if event.type == "track" and event.name == "Order Completed":
            expected["orders"] += 1
            expected["revenue_cents"] += round(fact.message["properties"]["revenue"] * 100)
        elif event.type == "track" and event.name == "Order Refunded":
            expected["refunds"] += 1
    expected["live_profiles"] = len(touched - merged)
    sizes = [len(p) for _, _, p, _ in items]
    summary = {"events": len(items), "resolved": expected["resolved"], "merges": expected["merged"],
               "profiles_touched": len(touched), "profile_pool": profiles, "bytes_per_event": statistics.fmean(sizes),
               "mix": dict(sorted(names.items(), key=lambda kv: -kv[1]))}
    return Workload(items, summary, expected, sorted(touched - merged))


# --- servers and the service --------------------------------------------------------------------


class Service(idb.Service):  # type: ignore[misc,name-defined]
    """`python -m cdp_profile` in its own process, configured the way `cdp up` does it."""

    profile_on_signal = False
    scores_interval = SCORES_INTERVAL  # --scoring-every

    @property
    def log_file(self) -> Path:
        return Path(self.servers.logs / f"profile-{self.namespace}.log")

    def start(self) -> None:
        self.grpc_address = f"127.0.0.1:{free_port()}"
        self.fingerprint = CODE.fingerprint()
        env = {
            **os.environ,
            **CODE.environ(),
            "CDP_NATS_URL": self.servers.nats_url,
            "CDP_DATABASE_URL": idb._with_database(self.servers.pg_url, self.database),
            "CDP_GRPC_LISTEN": self.grpc_address,
            "CDP_NAMESPACE": self.namespace,
            "CDP_WORKERS": "1",
            "CDP_PROFILE_SCORES_INTERVAL_SECONDS": self.scores_interval,
        }
        command = [sys.executable, "-m", "cdp_profile"]
        if self.profile_out:
            main = PROFILED_ON_SIGNAL if self.profile_on_signal else PROFILED_MAIN
            command = [sys.executable, "-c", main, str(self.profile_out)]
        self.launched_at = time.perf_counter()
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
        _children.append(self.process)

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"profile exited with code {self.process.returncode}; last lines of "
                               f"{self.log_file}:\n{idb._tail(self.log_file)}")

    async def wait_logged(self, *events: str, timeout: float = 300.0) -> str:
        """Waits for the first of these structlog events in the service's log; returns its line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                for line in self.log_file.read_text(errors="replace").splitlines():
                    if any(f'"event": "{e}"' in line or f'"event":"{e}"' in line for e in events):
                        return line
            await asyncio.sleep(0.2)
        raise RuntimeError(f"profile did not log {events} within {timeout:.0f}s; see {self.log_file}")


def _groups(servers: Any, service: Service, client: Callable[[], list[int]] | None = None) -> Any:
    """The profile column counts the service's child processes too (a scoring round's, a rebuild's),
    also one that ended within the window (through the service's reaped-children total)."""
    return idb.Usage(
        {"client": client or (lambda: [os.getpid()]), "nats_server": lambda: [servers.nats_pid],
         "profile": lambda: _and_children(service.pids), "postgres": servers.postgres_pids},
        reaper={"postgres": lambda: servers.postmaster_pid, "profile": lambda: next(iter(service.pids), None)},
    )


def _and_children(pids: list[int]) -> list[int]:
    found = list(pids)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return found


async def publish(log: Any, messages: Sequence[tuple[str, bytes, dict[str, str]]], topology: eventlog.Topology) -> float:
    """Into the IDENTITY stream with the services' own pipelined publisher (untimed set-up)."""
    began = time.perf_counter()
    nc = await nats.connect(log.url)
    publisher = eventlog.Publisher(nc)
    try:
        acks = await ib.publisher_windows(publisher, messages, 500, 4)
    finally:
        await publisher.close()
        await nc.close()
    stored = await log.count(topology, "identity")
    idb._expect(stored == len(messages) and not any(a.duplicate for a in acks),
                f"published {len(messages)}, the IDENTITY stream holds {stored}")
    return time.perf_counter() - began


# --- measurements -------------------------------------------------------------------------------


async def measure_ceiling(log: Any, servers: Any, workload: Workload, passes: int) -> dict[str, Any]:
    """The raw consume rate of the same events from a fresh IDENTITY stream, no service: plain
    nats-py (fetch 200, ack each), and the services' own Puller (one ack per batch). Each pass is
    a new durable consumer; the rate is over all passes."""
    from cdp_common.pull import Puller

    events = len(workload.items)
    topology = await log.fresh("c")
    stream = topology.stream("identity")
    out: dict[str, Any] = {}
    try:
        await publish(log, workload.addressed(topology), topology)
        nc = await nats.connect(log.url)
        try:
            js = nc.jetstream()
            for mode, policy in (("nats_py", AckPolicy.EXPLICIT), ("puller", AckPolicy.ALL)):
                names = [f"{CEILING_DURABLE}-{mode}-{p}" for p in range(passes)]
                for name in names:
                    await log.js.add_consumer(stream, ConsumerConfig(
                        durable_name=name, deliver_policy=DeliverPolicy.ALL, ack_policy=policy, ack_wait=30,
                        max_deliver=-1, max_ack_pending=None if mode == "nats_py" else 400))
                usage = idb.Usage({"client": lambda: [os.getpid()], "nats_server": lambda: [servers.nats_pid]})
                usage.start()
                for name in names:
                    acked = 0
                    if mode == "nats_py":
                        sub = await js.pull_subscribe_bind(name, stream=stream)
                        while acked < events:
                            msgs = await sub.fetch(FETCH_BATCH, timeout=5)
                            for msg in msgs:
                                await msg.ack()
                            acked += len(msgs)
                        await sub.unsubscribe()
                    else:
                        puller = Puller(nc, stream, name, FETCH_BATCH, 1.0)
                        while acked < events:
                            msgs = await puller.fetch()
                            if msgs:
                                await msgs[-1].ack()
                            acked += len(msgs)
                        await puller.forget()
                await nc.flush()
                used = usage.stop()
                for name in names:
                    info = await log.js.consumer_info(stream, name)
                    idb._expect(info.num_pending == 0 and info.delivered.stream_seq == events,
                                f"ceiling {mode}: {info.num_pending} pending, delivered {info.delivered.stream_seq}")
                consumed = events * passes
                out[mode] = {**used, "events": events, "passes": passes, "consumed": consumed,
                             "events_per_s": consumed / used["seconds"],
                             "cpu_us_per_event": {k: 1e6 * v / consumed for k, v in used["cpu_s"].items()}}
            for level in REFERENCE_LEVELS:
                out[level] = await measure_reference_projection(nc, log, servers, topology, events,
                                                                workload.expected["resolved"], passes, level)
        finally:
            await nc.close()
    finally:
        await log.drop(topology)
    return out


# The yardstick: "a batched projection with its checkpoint in the same transaction". Each
# fetched batch is decoded and counted per profile, and one transaction upserts the counts (one
# statement) and the checkpoint; then one ack. Two more levels add what the issue requires of the
# service besides: the events' timeline rows (properties as JSON), and a fact per touched profile
# written to an outbox in the transaction, published after it with JetStream acks (as
# `cdp_common.db.Outbox` does) and deleted in the next one. The fact is the profile's last event
# of the batch re-labelled (about 580 B; a real profile_changed with its snapshot is about 850 B).
# The fourth, "bulk", is the least a rebuild writes: the events read the same way, their timeline
# rows kept and written by COPY every BULK_ROWS events, a transaction each.
REFERENCE_LEVELS = ("minimal", "timeline", "facts", "bulk")
BULK_ROWS = 20_000
_REFERENCE_TABLES = (
    "CREATE TABLE ref_profiles (profile_id text PRIMARY KEY, events bigint NOT NULL, last_seen timestamptz NOT NULL)",
    "CREATE TABLE ref_checkpoints (consumer text PRIMARY KEY, stream_sequence bigint NOT NULL)",
    "CREATE TABLE ref_events (event_id text PRIMARY KEY, profile_id text NOT NULL, name text NOT NULL, "
    "occurred_at timestamptz NOT NULL, properties jsonb NOT NULL)",
    "CREATE INDEX ref_events_profile ON ref_events (profile_id, occurred_at DESC)",
    "CREATE TABLE ref_outbox (id bigserial PRIMARY KEY, subject text NOT NULL, msg_id text NOT NULL, payload bytea NOT NULL)",
)
_REFERENCE_UPSERT = (
    "INSERT INTO ref_profiles AS p SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[]) "
    "ON CONFLICT (profile_id) DO UPDATE SET events = p.events + EXCLUDED.events, "
    "last_seen = GREATEST(p.last_seen, EXCLUDED.last_seen)"
)
_REFERENCE_CHECKPOINT = (
    "INSERT INTO ref_checkpoints VALUES ($1, $2) ON CONFLICT (consumer) DO UPDATE SET stream_sequence = $2"
)
_REFERENCE_TIMELINE = (
    "INSERT INTO ref_events SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], "
    "$5::jsonb[]) ON CONFLICT DO NOTHING"
)
_REFERENCE_OUTBOX = (
    "INSERT INTO ref_outbox (subject, msg_id, payload) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) "
    "RETURNING id"
)


def _reference_batch(msgs: Sequence[Any], with_rows: bool) -> tuple[dict[str, list[Any]], dict[str, event_pb2.Event],
                                                                    list[tuple[Any, ...]]]:
    """A fetched batch decoded: events and latest time per profile, each profile's last event, and
    (`with_rows`) the timeline rows of the resolved events."""
    from cdp_common.convert import struct_to_dict, to_datetime, to_json

    counts: dict[str, list[Any]] = {}
    last: dict[str, event_pb2.Event] = {}
    rows: list[tuple[Any, ...]] = []
    for msg in msgs:
        event = eventlog.decode(msg.data)
        seen = to_datetime(event.occurred_at)
        held = counts.setdefault(event.profile_id, [0, seen])
        held[0] += 1
        held[1] = max(held[1], seen) if seen else held[1]
        if with_rows and event.type != "profiles_merged":
            rows.append((event.id, event.profile_id, event.name or event.type, seen,
                         to_json(struct_to_dict(event.properties))))
        last[event.profile_id] = event
    return counts, last, rows


class ReferenceProjection:
    """One reference projection's writes at `level` on `conn`, batch by batch (`apply`; the caller
    acks): the facts go to `topology`'s PROFILE stream, the checkpoint is kept under `name`."""

    def __init__(self, conn: Any, publisher: eventlog.Publisher, topology: eventlog.Topology, name: str,
                 level: str) -> None:
        if level not in REFERENCE_LEVELS:
            raise ValueError(f"unknown reference level {level!r}; one of {', '.join(REFERENCE_LEVELS)}")
        self.conn, self.publisher, self.topology, self.name, self.level = conn, publisher, topology, name, level
        self._kept: list[tuple[Any, ...]] = []
        self._published: list[int] = []

    async def apply(self, msgs: Sequence[Any], final: bool = False) -> None:
        """One fetched batch; `final` writes what bulk has kept."""
        conn, level = self.conn, self.level
        counts, last, rows = _reference_batch(msgs, with_rows=level != "minimal")
        if level == "bulk":
            self._kept += rows
            if len(self._kept) >= BULK_ROWS or final:
                async with conn.transaction():
                    await conn.copy_records_to_table("ref_events", records=self._kept)
                self._kept = []
            return
        facts = []
        if level == "facts":
            for profile_id, event in last.items():
                event.id, event.type = eventlog.derived_id(event.id, f"changed:{profile_id}"), "profile_changed"
                fact = eventlog.Outgoing(self.topology.keyed("profile", profile_id, "changed"), event)
                facts.append((fact.subject, eventlog.encode(event), fact.headers()))
        async with conn.transaction():
            if self._published:
                await conn.execute("DELETE FROM ref_outbox WHERE id = ANY($1)", self._published)
            await conn.execute(_REFERENCE_UPSERT, list(counts), [c for c, _ in counts.values()],
                               [t for _, t in counts.values()])
            if rows:
                await conn.execute(_REFERENCE_TIMELINE, *(list(column) for column in zip(*rows, strict=True)))
            if facts:
                ids = await conn.fetch(_REFERENCE_OUTBOX, [f[0] for f in facts],
                                       [f[2][eventlog.MSG_ID_HEADER] for f in facts], [f[1] for f in facts])
            await conn.execute(_REFERENCE_CHECKPOINT, self.name, msgs[-1].metadata.sequence.stream)
        if facts:
            await self.publisher.publish(facts)
            self._published = [r["id"] for r in ids]


async def measure_reference_projection(nc: Any, log: Any, servers: Any, topology: eventlog.Topology, events: int,
                                       resolved: int, passes: int, level: str) -> dict[str, Any]:
    """A batched projection of the same events at `level` (plain asyncpg, the services' Puller), in
    this process: what a projection costs before the service's own work."""
    from cdp_common.pull import Puller

    stream = topology.stream("identity")
    database = f"bench_reference_{uuid.uuid4().hex[:8]}"
    await servers.create_database(database)
    conn = await servers.admin(database)
    publisher = eventlog.Publisher(nc)
    try:
        for statement in _REFERENCE_TABLES:
            await conn.execute(statement)
        names = [f"{CEILING_DURABLE}-{level}-{p}" for p in range(passes)]
        for name in names:
            await log.js.add_consumer(stream, ConsumerConfig(
                durable_name=name, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.ALL, ack_wait=30,
                max_deliver=-1, max_ack_pending=400))
        usage = idb.Usage({"client": lambda: [os.getpid()], "nats_server": lambda: [servers.nats_pid],
                           "postgres": servers.postgres_pids})
        usage.start()
        projection = ReferenceProjection(conn, publisher, topology, names[0], level)
        for name in names:
            applied = 0
            projection.name = name
            puller = Puller(nc, stream, name, FETCH_BATCH, 1.0)
            while applied < events:
                msgs = await puller.fetch()
                if not msgs:
                    continue
                applied += len(msgs)
                await projection.apply(msgs, final=applied >= events)
                await msgs[-1].ack()
            await puller.forget()
            # Checked, then emptied: each pass writes the same events anew, not onto rows already there.
            counted = await conn.fetchval("SELECT sum(events) FROM ref_profiles")
            timeline = await conn.fetchval("SELECT count(*) FROM ref_events")
            idb._expect(level == "bulk" or counted == events, f"reference {level}: {counted} events counted, not {events}")
            idb._expect(level == "minimal" or timeline == resolved,
                        f"reference {level}: {timeline} timeline rows, not {resolved}")
            await conn.execute("TRUNCATE ref_profiles, ref_events")
        await nc.flush()
        used = usage.stop()
    finally:
        await publisher.close()
        await conn.close()
        await servers.drop_database(database)
    consumed = events * passes
    return {**used, "level": level, "events": events, "passes": passes, "consumed": consumed,
            "events_per_s": consumed / used["seconds"],
            "cpu_us_per_event": {k: 1e6 * v / consumed for k, v in used["cpu_s"].items()}}


def rebuild_available() -> bool:
    with contextlib.suppress(OSError):
        return subprocess.run([*REBUILD_COMMAND[:2], "--help"], capture_output=True, check=False).returncode == 0
    return False


async def measure_rebuild(servers: Any, service: Service, events: int,
                          profile_ids: Sequence[str]) -> dict[str, Any] | None:
    """`cdp replay profile` against the running service: the read model rebuilt from the whole
    IDENTITY stream into a new schema, then swapped in; timed from launch to exit. Meanwhile a
    health check and a GetProfile (of `profile_ids`) are called one after the other."""
    if not rebuild_available():
        return None
    env = {**os.environ, "CDP_NATS_URL": servers.nats_url, "CDP_NAMESPACE": service.namespace,
           "CDP_DATABASE_URL": idb._with_database(servers.pg_url, service.database),
           "CDP_PROFILE_ADDRESS": service.grpc_address}
    log_file = servers.logs / f"replay-{service.namespace}.log"
    usage = _groups(servers, service)
    stop = asyncio.Event()
    probes = [asyncio.create_task(_probe(service.grpc_address, kind, profile_ids, stop)) for kind in PROBES]
    await asyncio.sleep(PROBE_SETTLE_SECONDS)  # connected and warm before the rebuild starts
    usage.start()
    try:
        with open(log_file, "ab") as out:
            process = await asyncio.create_subprocess_exec(*REBUILD_COMMAND, env=env, stdout=out, stderr=out)
            code = await process.wait()
        used = usage.stop()
    finally:
        stop.set()
        answered = await asyncio.gather(*probes)
    idb._expect(code == 0, f"cdp replay profile exited with {code}: {idb._tail(log_file)}")
    assert service.process is not None
    # A service that fails after the swap exits a moment after the command returns.
    deadline = time.monotonic() + 3.0
    while (survived := service.process.poll() is None) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if not survived:
        # Its CPU is then lost with it (the profile column shows 0).
        print(f"warning: the profile service exited during or after the rebuild (code {service.process.returncode}); "
              f"last lines of {service.log_file}:\n{idb._tail(service.log_file, 4)}", flush=True)
    return {**used, "events": events, "events_per_s": events / used["seconds"], "service_survived": survived,
            "cpu_us_per_event": {k: 1e6 * v / events for k, v in used["cpu_s"].items()},
            "answering": dict(zip(PROBES, answered, strict=True))}


# Calls the service answers during a rebuild: one at a time, each as soon as the one before came back
# (at most PROBE_RATE a second), so a stalled event loop shows as the latency of the call waiting on it.
PROBES = ("health", "get_profile")
PROBE_RATE = 100.0
# During the live projection the probes take the service's own core from what they measure (each
# call costs it about 0.7 ms of CPU): slower there.
LIVE_PROBE_RATE = 20.0
PROBE_SETTLE_SECONDS = 1.0


async def _probes_once_healthy(service: Service, profile_ids: Sequence[str],
                               stop: asyncio.Event) -> dict[str, dict[str, Any]]:
    """The PROBES from the service's first healthy answer until `stop` is set."""
    await service.wait_healthy()
    answered = await asyncio.gather(*(_probe(service.grpc_address, kind, profile_ids, stop, LIVE_PROBE_RATE)
                                      for kind in PROBES))
    return dict(zip(PROBES, answered, strict=True))


async def _probe(address: str, kind: str, profile_ids: Sequence[str], stop: asyncio.Event,
                 rate: float = PROBE_RATE) -> dict[str, Any]:
    """Latencies of `kind` calls from `stop`'s clearing to its setting (the first second aside)."""
    import grpc
    from grpc_health.v1 import health_pb2

    from cdp.profile.v1 import profile_pb2

    rng = random.Random(SEED + 300)
    method, reply = {
        "health": ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckResponse.FromString),
        "get_profile": ("/cdp.profile.v1.ProfileService/GetProfile", event_pb2.ProfileSnapshot.FromString),
    }[kind]
    latencies, errors = [], 0
    began = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=reply)
        while not stop.is_set():
            request = (health_pb2.HealthCheckRequest() if kind == "health"
                       else profile_pb2.GetProfileRequest(profile_id=rng.choice(profile_ids))).SerializeToString()
            sent = time.perf_counter()
            try:
                await call(request, timeout=30)
            except grpc.aio.AioRpcError as error:
                # NOT_FOUND is an answer: during the live projection a profile may not be there yet.
                errors += error.code() != grpc.StatusCode.NOT_FOUND
            if sent - began >= PROBE_SETTLE_SECONDS:
                latencies.append(time.perf_counter() - sent)
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - sent)))
    ms = sorted(1e3 * x for x in latencies)
    if not ms:
        return {"calls": 0, "errors": errors}
    return {"calls": len(ms), "errors": errors, "p50_ms": ms[len(ms) // 2], "p99_ms": ms[int(len(ms) * 0.99)],
            "max_ms": ms[-1], "over_100ms": sum(1 for x in ms if x > 100)}


async def measure_live(log: Any, servers: Any, workload: Workload, label: str, profile_out: Path | None = None,
                       before_start: Callable[[str], Any] | None = None, keep_database: bool = False,
                       rebuild: bool = False) -> dict[str, Any]:
    """The profile service projecting the N pre-published events, fresh namespace and database."""
    total = len(workload.items)
    topology = await log.fresh(label)
    database = f"bench_{topology.namespace}"
    service = Service(servers, topology.namespace, database, profile_out)
    rebuilt, probes, answering = None, None, None
    try:
        await servers.create_database(database)
        usage = _groups(servers, service)
        if profile_out is None:
            publish_s = await publish(log, workload.addressed(topology), topology)
            if before_start is not None:
                await before_start(database)
            service.start()
            # Calls the service answers while it projects: health and GetProfile, one at a time each.
            stop_probes = asyncio.Event()
            probes = asyncio.ensure_future(_probes_once_healthy(service, workload.live_profiles, stop_probes))
        else:
            # Start-up stays out of the profile: the profiler starts once the service is up, and
            # the events come after it (published ten times faster than they are applied, so the
            # batches are full all the same).
            service.profile_on_signal = True
            service.start()
            await service.wait_healthy()
            assert service.process is not None
            service.process.send_signal(signal.SIGUSR1)
            publish_s = await publish(log, workload.addressed(topology), topology)
        # identity.drain reads only topology.stream("collected"): give it the IDENTITY stream.
        try:
            timing = await idb.drain(log, service,
                                     types.SimpleNamespace(stream=lambda _: topology.stream("identity")), total, usage)
        finally:
            if probes is not None:
                stop_probes.set()
                answering = await probes
        if rebuild:
            rebuilt = await measure_rebuild(servers, service, total, workload.live_profiles)
        await service.stop()
        checks = await verify(log, servers, topology, database, workload)
    finally:
        await service.stop()
        await log.drop(topology)
    used = timing.pop("usage")
    seconds = used["seconds"]
    result = {
        "events": total, **timing, "events_per_s": total / timing["seconds"],
        "cpu_s": used["cpu_s"], "cpu_us_per_event": {k: 1e6 * v / total for k, v in used["cpu_s"].items()},
        "busy_cores": {k: v / seconds for k, v in used["cpu_s"].items()},
        "foreign_cores": used["foreign_cores"], "usage_seconds": seconds, "publish_s": publish_s,
        "database": database, "code_fingerprint": service.fingerprint, "rebuild": rebuilt, **checks,
        "answering": answering,
    }
    if not keep_database:
        await servers.drop_database(database)
    return result


async def verify(log: Any, servers: Any, topology: eventlog.Topology, database: str,
                 workload: Workload) -> dict[str, Any]:
    """Every event on the timeline once, the orders and revenue in the aggregates, nothing
    dead-lettered; what the service published."""
    dead = await log.count(topology, "deadletter")
    changed = await log.count(topology, "profile")
    conn = await servers.admin(database)
    try:
        # One statement starting "SELECT count(*)", so the --profile report can leave it out.
        row = await conn.fetchrow(
            "SELECT count(*) AS events, (SELECT count(*) FROM profile.profiles WHERE merged_into IS NULL) AS live, "
            "(SELECT count(*) FROM profile.profiles WHERE merged_into IS NOT NULL) AS merged, "
            "(SELECT sum(order_count) FROM profile.profiles WHERE merged_into IS NULL) AS orders, "
            "(SELECT round(sum(revenue) * 100) FROM profile.profiles WHERE merged_into IS NULL) AS revenue_cents, "
            "(SELECT sum(refund_count) FROM profile.profiles WHERE merged_into IS NULL) AS refunds, "
            "(SELECT count(*) FROM profile.profiles WHERE lifecycle_stage IS NOT NULL) AS scored "
            "FROM profile.events")
    finally:
        await conn.close()
    want = workload.expected
    idb._expect(dead == 0, f"profile dead-lettered {dead} events")
    idb._expect(row["events"] == want["resolved"], f"timeline holds {row['events']} of {want['resolved']} events")
    idb._expect(row["orders"] == want["orders"] and int(row["revenue_cents"]) == want["revenue_cents"],
                f"orders {row['orders']} / revenue {row['revenue_cents']} cents, want {want['orders']} / "
                f"{want['revenue_cents']}")
    idb._expect(row["merged"] == want["merged"] and row["live"] == want["live_profiles"],
                f"{row['live']} live and {row['merged']} merged profiles, want {want['live_profiles']} / {want['merged']}")
    return {"dead_lettered": dead, "profile_changed_published": changed, "live_profiles": row["live"],
            "merged_profiles": row["merged"], "scored_profiles": row["scored"], "refunds": int(row["refunds"] or 0)}


# --- GetProfile latency -------------------------------------------------------------------------


def _engine(url: str) -> Any:
    """An engine whose unqualified table names resolve to schema profile, when the store asks for
    that (cdp_common.db.create_engine's search_path); older stores qualify their tables."""
    from cdp_common import db

    if "search_path" in inspect.signature(db.create_engine).parameters:
        return db.create_engine(url, search_path="profile")
    return db.create_engine(url)


async def build_preload(log: Any, servers: Any, profiles: int) -> dict[str, Any]:
    """A database holding `profiles` profiles, written by the service's own code: its migrations
    (the service started once on it), core.fold over each profile's events, scoring.build_models
    and score, store.save_models and store.save_many in chunks; then VACUUM ANALYZE."""
    from cdp_profile import core, scoring, store

    name = f"bench_profiles_{uuid.uuid4().hex[:8]}"
    topology = await log.fresh("m")
    began = time.perf_counter()
    await servers.create_database(name)
    service = Service(servers, topology.namespace, name)
    try:
        service.start()
        await service.wait_healthy()
        await service.stop()
    finally:
        await service.stop()
        await log.drop(topology)
    migrated = time.perf_counter()
    shop = Shop(profiles, seed=SEED + 1)
    now = eventlog.now()
    states: dict[str, core.ProfileState] = {}
    facts = shop.facts(profiles * PRELOAD_EVENTS_PER_PROFILE, now - timedelta(days=730),
                       timedelta(days=729), cover=True, merges=False)
    for fact in facts:
        m = fact.message
        observed = core.Observed(at=fact.when, name=m.get("event", m.get("name", "")) if m["type"] != "identify" else "",
                                 type=m["type"], properties=m.get("properties", {}), traits=m.get("traits", {}),
                                 consent=m.get("consent", {}), identifiers=fact.keys)
        states[fact.profile_id] = core.fold(states.get(fact.profile_id) or core.ProfileState(fact.profile_id),
                                            [observed])
    models = scoring.build_models((scoring.inputs_of(s) for s in states.values()), now)
    scored = [replace(s, scores=scoring.score(scoring.inputs_of(s), models, now)) for s in states.values()]
    folded = time.perf_counter()
    engine = _engine(idb._with_database(servers.pg_url, name))
    try:
        async with engine.begin() as conn:
            await store.save_models(conn, models)
        for start in range(0, len(scored), PRELOAD_CHUNK):
            async with engine.begin() as conn:
                await store.save_many(conn, scored[start:start + PRELOAD_CHUNK], {})
    finally:
        await engine.dispose()
    saved = time.perf_counter()
    conn = await servers.admin(name)
    try:
        for table in ("checkpoints", "outbox"):
            await conn.execute(f"DELETE FROM profile.{table}")
        await conn.execute("VACUUM (ANALYZE) profile.profiles")
        await conn.execute("VACUUM (ANALYZE) profile.identifiers")
        count = await conn.fetchval("SELECT count(*) FROM profile.profiles WHERE merged_into IS NULL")
        identifiers = await conn.fetchval("SELECT count(*) FROM profile.identifiers")
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        row_bytes = await conn.fetchval("SELECT avg(pg_column_size(p.*)) FROM profile.profiles p")
    finally:
        await conn.close()
    idb._expect(count == profiles, f"preload: {count} profiles, wanted {profiles}")
    # By email only where the profile holds it (a customer who never sent an identify does not).
    known = [(s.profile_id, s.email if ("email", s.email) in states[s.profile_id].identifiers else "")
             for s in shop.shoppers]
    return {"database": name, "profiles": count, "identifiers": identifiers, "events_folded": len(facts),
            "customers": sum(1 for s in states.values() if s.order_count), "database_bytes": size,
            "avg_row_bytes": float(row_bytes), "migrate_s": migrated - began, "fold_score_s": folded - migrated,
            "save_s": saved - folded, "analyze_s": time.perf_counter() - saved,
            "total_s": time.perf_counter() - began, "keys": known}


def latency_requests(keys: Sequence[tuple[str, str]], count: int, seed: int) -> list[bytes]:
    """GetProfile requests: half by profile_id, half by email (half of those typed in mixed case)."""
    from cdp.profile.v1 import profile_pb2

    rng = random.Random(seed)
    with_email = [k for k in keys if k[1]]
    out = []
    for _ in range(count):
        if rng.random() < 0.5:
            request = profile_pb2.GetProfileRequest(profile_id=rng.choice(keys)[0])
        else:
            email = rng.choice(with_email)[1]
            request = profile_pb2.GetProfileRequest()
            request.identifier.type = "email"
            request.identifier.value = email.title() if rng.random() < 0.5 else email
        out.append(request.SerializeToString())
    return out


async def run_client(kind: str, address: str, rate: float, requests: Sequence[bytes], servers: Any,
                     service: Service, tmp: Path, on_ready: Callable[[], Any] | None = None) -> dict[str, Any]:
    """The open-loop client in its own process (this script with --latency-client): it warms up,
    says ready, and on "go" runs bench/ingest.py's open_loop; CPU is counted here meanwhile.
    `on_ready` runs between the warm-up and the measured part."""
    path = tmp / f"requests-{kind}.txt"
    path.write_text("\n".join(base64.b64encode(r).decode() for r in requests))
    config = json.dumps({"kind": kind, "address": address, "rate": rate, "requests": str(path)})
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--latency-client", config,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        assert process.stdin is not None and process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        idb._expect(line.strip() == b"ready", f"latency client: {line!r}")
        if on_ready is not None:
            await on_ready()
        usage = _groups(servers, service, client=lambda: [process.pid])
        usage.start()
        process.stdin.write(b"go\n")
        await process.stdin.drain()
        line = await asyncio.wait_for(process.stdout.readline(), len(requests) / rate + 120)
        used = usage.stop()
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    result: dict[str, Any] = json.loads(line)
    result.pop("cpu", None)  # the client's own view; the whole picture is `used`
    result.pop("cpu_us_per_event", None)
    return {**result, "kind": kind, "cpu_s": used["cpu_s"], "foreign_cores": used["foreign_cores"],
            "cpu_us_per_request": {k: 1e6 * v / max(result["ok"], 1) for k, v in used["cpu_s"].items()}}


async def latency_client(config: dict[str, Any]) -> None:
    """The client process: one open loop, its result as one JSON line."""
    import grpc
    from grpc_health.v1 import health_pb2

    requests = [base64.b64decode(line) for line in Path(config["requests"]).read_text().splitlines()]
    method, reply = {
        "health": ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckResponse.FromString),
        "get_profile": ("/cdp.profile.v1.ProfileService/GetProfile", event_pb2.ProfileSnapshot.FromString),
    }[config["kind"]]
    async with grpc.aio.insecure_channel(config["address"]) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=reply)
        for request in requests[:300]:
            await call(request, timeout=10)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        result = await ib.open_loop(call, requests, config["rate"], [os.getpid(), os.getpid()], metadata=())
    print(json.dumps(result), flush=True)


async def measure_latency(log: Any, servers: Any, preload: dict[str, Any], args: argparse.Namespace, run: int,
                          tmp: Path) -> dict[str, Any]:
    """The service on the preloaded database: the health check, then GetProfile, at --rate."""
    from grpc_health.v1 import health_pb2

    topology = await log.fresh("l")
    service = Service(servers, topology.namespace, preload["database"])
    count = int(args.rate * args.duration)
    out: dict[str, Any] = {}
    try:
        service.start()
        out["startup_s"] = await service.wait_healthy()
        # The scoring job scans every profile at start; measured after it.
        line = await service.wait_logged("rescored", "scoring_failed")
        out["scoring_at_start"] = json.loads(line)
        out["scoring_ready_s"] = time.perf_counter() - service.launched_at
        out["fingerprint"] = service.fingerprint
        check = health_pb2.HealthCheckRequest().SerializeToString()
        out["health"] = await run_client("health", service.grpc_address, args.rate,
                                         [check] * int(args.rate * args.duration / 2), servers, service, tmp)
        out["get_profile"] = await run_client("get_profile", service.grpc_address, args.rate,
                                              latency_requests(preload["keys"], count, SEED + 100 + run),
                                              servers, service, tmp)
        # A quarter of the rate, for what one call costs when the service is not saturated.
        light = args.rate / LIGHT
        out["get_profile_light"] = await run_client(
            "get_profile", service.grpc_address, light,
            latency_requests(preload["keys"], int(light * args.duration / 2), SEED + 200 + run), servers, service, tmp)
    finally:
        await service.stop()
        await log.drop(topology)
    return out


# --- the report -----------------------------------------------------------------------------------


LIGHT = 4  # the light GetProfile load is --rate / LIGHT, for half of --duration
LATENCY_KEYS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "from_send_p50_ms", "from_send_p99_ms",
                "from_send_max_ms", "send_lag_p99_ms", "achieved_rate", "errors")


def summarize(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    def costs(rows: list[dict[str, Any]], key: str = "cpu_us_per_event") -> dict[str, float]:
        return {p: statistics.median(r[key][p] for r in rows) for p in rows[0][key]}

    m: dict[str, Any] = {}
    for kind in ("get_profile", "get_profile_light", "health") if raw["latency"] else ():  # not with --no-latency
        rows = [r[kind] for r in raw["latency"]]
        m[kind] = {k: med(rows, k) for k in LATENCY_KEYS if all(k in r for r in rows)}
        m[kind]["cpu_us_per_request"] = costs(rows, "cpu_us_per_request")
        m[kind]["foreign_cores"] = med(rows, "foreign_cores")
    m["fingerprints"] = sorted({r["code_fingerprint"] for r in raw["live"]} | {r["fingerprint"] for r in raw["latency"]})
    m["targets"] = {"get_profile_p99_under_5ms": m["get_profile"]["p99_ms"] < TARGET_P99_MS if raw["latency"] else None}
    if not raw["live"]:  # --latency-only
        return m
    for mode in ("nats_py", "puller", *REFERENCE_LEVELS):
        rows = [r[mode] for r in raw["ceiling"]]
        m[f"ceiling_{mode}"] = {"events_per_s": med(rows, "events_per_s"), "cpu_us_per_event": costs(rows),
                                "foreign_cores": med(rows, "foreign_cores")}
    ceiling = m["ceiling_nats_py"]["events_per_s"]
    live = raw["live"]
    m["live"] = {"events_per_s": med(live, "events_per_s"), "cpu_us_per_event": costs(live),
                 "foreign_cores": med(live, "foreign_cores"), "startup_s": med(live, "startup_s"),
                 "busy_cores": {p: statistics.median(r["busy_cores"][p] for r in live) for p in live[0]["busy_cores"]},
                 "profile_changed_per_event": statistics.median(r["profile_changed_published"] / r["events"]
                                                                for r in live)}
    m["live"]["vs_ceiling"] = m["live"]["events_per_s"] / ceiling
    m["live"]["vs_ceiling_paired"] = statistics.median(
        r["events_per_s"] / c["nats_py"]["events_per_s"] for r, c in zip(live, raw["ceiling"], strict=True))
    m["live"]["answering"] = _answering([r for r in live if r.get("answering")])
    rebuilds = [r["rebuild"] for r in live if r.get("rebuild")]
    m["rebuild"] = None if not rebuilds else {"events_per_s": med(rebuilds, "events_per_s"),
                                              "cpu_us_per_event": costs(rebuilds),
                                              "service_survived": all(r["service_survived"] for r in rebuilds),
                                              "foreign_cores": med(rebuilds, "foreign_cores"),
                                              "answering": _answering(rebuilds)}
    m["targets"] |= {
        "live_at_least_10000_per_s": m["live"]["events_per_s"] >= TARGET_LIVE,
        "rebuild_at_least_20000_per_s": None if m["rebuild"] is None else m["rebuild"]["events_per_s"] >= TARGET_REBUILD,
    }
    return m


def _answering(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """Medians over runs of what the probes saw (None: no run had them, as under --profile; a probe
    that got in no call past its first second counts as none)."""
    rows = [r for r in rows if all(r["answering"][kind].get("calls") for kind in PROBES)]
    if not rows:
        return None
    return {kind: {key: statistics.median(r["answering"][kind][key] for r in rows)
                   for key in ("p50_ms", "p99_ms", "max_ms", "errors")} for kind in PROBES}


def _answering_rows(table: Any, got: dict[str, dict[str, float]] | None, rows: Sequence[dict[str, Any]]) -> None:
    """The probes' rows under a throughput row: p50 / p99 / max, and each run's max."""
    if got is None:
        return
    for kind, label in (("health", "health check"), ("get_profile", "GetProfile")):
        per_run = " ".join(f"{r['answering'][kind]['max_ms']:.0f}" for r in rows
                           if r.get("answering") and r["answering"][kind].get("calls"))
        table.add_row(f"  {label} meanwhile: p50 / p99 / max", f"{got[kind]['p50_ms']:.1f} / "
                      f"{got[kind]['p99_ms']:.1f} / {got[kind]['max_ms']:.0f} ms", f"max {per_run}", "", "", "", "",
                      f"{got[kind]['errors']:.0f} errors" if got[kind]["errors"] else "")


def _throughput_rows(table: Any, m: dict[str, Any], raw: dict[str, list[dict[str, Any]]], runs: Callable[..., str],
                     verdict: Callable[[bool | None], str], cost: Callable[[dict[str, float]], str]) -> None:
    """The ceiling, live projection and rebuild rows of the table."""
    ceiling = m["ceiling_nats_py"]["events_per_s"]
    for mode, label in (("nats_py", "ceiling: nats-py pull, fetch 200, ack each"),
                        ("puller", "reference: the services' Puller, 1 ack/batch"),
                        ("minimal", "reference: minimal batched projection"),
                        ("timeline", "  + timeline rows"),
                        ("facts", "  + a fact per profile (outbox, publish)"),
                        ("bulk", "reference: bulk, timeline rows by COPY")):
        rows = [r[mode] for r in raw["ceiling"]]
        c = m[f"ceiling_{mode}"]
        table.add_row(label, f"{c['events_per_s']:,.0f} ev/s", runs(rows, "events_per_s", ",.0f"),
                      f"{c['events_per_s'] / ceiling:.2f}x", "", f"{c['foreign_cores']:.2f}", "",
                      cost(c["cpu_us_per_event"]))
    live = m["live"]
    table.add_row("live projection (profile-project)", f"{live['events_per_s']:,.0f} ev/s",
                  runs(raw["live"], "events_per_s", ",.0f"), f"{live['vs_ceiling']:.2f}x",
                  f">= 10,000 {verdict(m['targets']['live_at_least_10000_per_s'])}", f"{live['foreign_cores']:.2f}",
                  f"{live['busy_cores']['profile']:.2f} / {live['busy_cores']['postgres']:.2f}",
                  cost(live["cpu_us_per_event"]))
    _answering_rows(table, live["answering"], raw["live"])
    rebuild = m["rebuild"]
    if rebuild is None:
        table.add_row("rebuild (cdp replay profile)", "not measured", "", "", f">= 20,000 {verdict(None)}", "", "", "")
    else:
        rows = [r["rebuild"] for r in raw["live"] if r.get("rebuild")]
        table.add_row("rebuild (cdp replay profile)", f"{rebuild['events_per_s']:,.0f} ev/s",
                      runs(rows, "events_per_s", ",.0f"), f"{rebuild['events_per_s'] / ceiling:.2f}x",
                      f">= 20,000 {verdict(m['targets']['rebuild_at_least_20000_per_s'])}",
                      f"{rebuild['foreign_cores']:.2f}", "", cost(rebuild["cpu_us_per_event"]))
        _answering_rows(table, rebuild["answering"], rows)
        if not rebuild["service_survived"]:
            table.add_row("  [red]the service exited after the rebuild[/]", "", "", "", "", "", "", "")


def render(info: dict[str, Any], pg: dict[str, Any], args: argparse.Namespace, workload: Workload,
           preload: dict[str, Any], raw: dict[str, list[dict[str, Any]]], m: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def runs(rows: list[Any], key: str, fmt: str) -> str:
        return "  ".join(format(r[key], fmt) for r in rows)

    def verdict(ok: bool | None) -> str:
        return "[yellow]not measured[/]" if ok is None else "[green]met[/]" if ok else "[red]MISSED[/]"

    def cost(per: dict[str, float]) -> str:
        return " / ".join(f"{per[p]:.0f}" if p in per else "-" for p in ("client", "nats_server", "profile", "postgres"))

    console = Console(width=190)
    console.print(f"[bold]Machine[/] {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM; "
                  f"Python {info['python']} (protobuf {info['protobuf_backend']}); {info['nats_server']}; "
                  f"PostgreSQL {pg['settings']['server_version']} (embedded, shared_buffers "
                  f"{pg['settings']['shared_buffers']}, synchronous_commit {pg['settings']['synchronous_commit']})")
    tested = f"working tree at {info['commit']}" + (
        f" + uncommitted changes to {len(info['modified'])} file(s) under services/profile, libs/common"
        if info["modified"] else "")
    if info["code_under_test"]["commit"]:
        tested = f"services/profile and libs/common at {info['code_under_test']['commit']} ({info['code_under_test']['label']})"
    console.print(f"[bold]OS[/] {info['os']}; [bold]date[/] {info['date']}; [bold]code under test[/] {tested} "
                  f"(sources {', '.join(m['fingerprints'])})")
    if len(m["fingerprints"]) > 1:
        console.print("[bold red]The code under test changed while the bench ran[/]: the medians mix versions.")
    s = workload.summary
    mix = ", ".join(f"{k} {100 * v / s['resolved']:.0f}%" for k, v in list(s["mix"].items())[:9])
    console.print(f"[bold]Workload[/] {s['events']:,} events ({s['resolved']:,} resolved, {s['merges']} merges) over "
                  f"{s['profiles_touched']:,} profiles, {s['bytes_per_event']:.0f} B/event ({mix}, ...)"
                  + ("; no GetProfile latency (--no-latency)" if not preload else
                  f"; GetProfile on {preload['profiles']:,} preloaded profiles ({preload['database_bytes'] / 2**20:.0f} "
                  f"MiB, loaded in {preload['total_s']:.0f} s) at {args.rate:g}/s for {args.duration:g} s, and at "
                  f"{args.rate / LIGHT:g}/s for {args.duration / 2:g} s; health check at {args.rate:g}/s for "
                  f"{args.duration / 2:g} s") + f"; {args.runs} runs, medians"
                  + ("" if args.scoring_every is None else
                     f"; [bold]the scoring job every {args.scoring_every:g} s[/] (--scoring-every)"))
    table = Table()
    for column in ("measurement", "median", "runs", "vs ceiling", "goal", "other load", "busy p / pg",
                   "CPU us/event c/n/p/pg"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    if "live" in m:  # not with --latency-only
        _throughput_rows(table, m, raw, runs, verdict, cost)
    for kind, label, rate in (("get_profile", "GetProfile", args.rate),
                              ("get_profile_light", "GetProfile", args.rate / LIGHT),
                              ("health", "health check (floor)", args.rate)) if raw["latency"] else ():
        lat = m[kind]
        rows = [r[kind] for r in raw["latency"]]
        label = f"{label} {rate:g}/s"
        table.add_row(f"{label}: achieved", f"{lat['achieved_rate']:,.1f} req/s",
                      runs(rows, "achieved_rate", ",.1f"), "", "", f"{lat['foreign_cores']:.2f}", "",
                      cost(lat["cpu_us_per_request"]))
        for key, name in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p95_ms", "p95"), ("p99_ms", "p99"),
                          ("max_ms", "max"), ("from_send_p50_ms", "p50 from send"),
                          ("from_send_p99_ms", "p99 from send"), ("from_send_max_ms", "max from send"),
                          ("send_lag_p99_ms", "client send lag p99")):
            if key not in lat or (kind == "get_profile_light" and key not in ("p50_ms", "p99_ms", "max_ms")):
                continue
            goal = f"< 5 ms {verdict(m['targets']['get_profile_p99_under_5ms'])}" if (
                kind == "get_profile" and key == "p99_ms") else ""
            table.add_row(f"  {label} {name}", f"{lat[key]:.2f} ms", runs(rows, key, ".2f"), "", goal, "", "", "")
        table.add_row(f"  {label} errors", f"{lat['errors']:.0f}", runs(rows, "errors", ".0f"), "", "", "", "", "")
    console.print(table)
    console.print(
        "vs ceiling = median rate / median plain nats-py pull-consume rate of the same events. other load = CPU cores "
        "busy with processes outside this bench while measuring (0 = quiet). busy p / pg = cores the profile process / "
        "all PostgreSQL processes used. CPU us/event = CPU per event (per request for the latency rows) of the bench "
        "client / nats-server / profile / PostgreSQL. Latencies are timed from the scheduled send (open loop) unless "
        "marked" + ("" if "live" not in m else
                    f"; live start-up (launch to first delivery, untimed) {m['live']['startup_s']:.1f} s; "
                    f"{m['live']['profile_changed_per_event']:.2f} profile_changed published per event") + ".")


# --- profile ----------------------------------------------------------------------------------------


def _category(file: str, name: str) -> str:
    if "cdp_profile" in file:
        return f"cdp_profile.{Path(file).stem}"
    if "cdp_common" in file:
        return f"cdp_common.{Path(file).stem}"
    if file.endswith("/json/encoder.py") or file.endswith("/json/decoder.py") or "json" in name:
        return "json"
    return str(idb._category(file, name))


# Synchronous steps of the projection: their cumulative time is meaningful (coroutines' is not).
STAGES = (
    ("eventlog.py", "decode", "decode the delivered envelopes"),
    ("handlers.py", "_recorded", "envelope -> timeline row (struct_to_dict of properties, traits)"),
    ("core.py", "fold", "fold the new events into each profile"),
    ("scoring.py", "score", "rescore profiles whose score inputs changed"),
    ("core.py", "changed_fields", "changed_fields per touched profile"),
    ("messages.py", "changed_event", "profile_changed: snapshot + envelope per touched profile"),
    ("store.py", "_rows", "profiles upsert: rows as one JSON recordset"),
    ("store.py", "_state", "stored row -> ProfileState"),
    ("eventlog.py", "encode", "encode outgoing profile_changed"),
    ("eventlog.py", "headers", "outgoing headers"),
)


def print_profile(path: Path, events: int, label: str = "live projection", top: int = 30) -> dict[str, Any]:
    """The service's main thread under cProfile: own time by module, the synchronous stages'
    cumulative time, the hot functions, each per event (per request for GetProfile)."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    by: dict[str, float] = {}
    for (file, _line, name), (_cc, _calls, own, _cum, callers) in entries.items():
        key = _category(file, name)
        if file == "~" and key == "other" and callers:
            # A built-in: its time goes to whoever called it.
            spent = sum(v[2] for v in callers.values()) or 1.0
            for (cfile, _cl, cname), v in callers.items():
                by[_category(cfile, cname)] = by.get(_category(cfile, cname), 0.0) + own * v[2] / spent
        else:
            by[key] = by.get(key, 0.0) + own
    idle = by.pop("idle (epoll)", 0.0)
    busy = sum(by.values())
    print(f"\n== {label}: profile main thread under cProfile ({events} events or requests; {busy:.2f} s busy, "
          f"{idle:.2f} s idle in epoll left out) ==")
    print(f"{'own time by module':48} {'s':>7} {'% busy':>7} {'us/event':>9}")
    for key, own in sorted(by.items(), key=lambda kv: kv[1], reverse=True)[:28]:
        print(f"{key:48} {own:7.2f} {100 * own / busy:6.1f}% {1e6 * own / events:9.1f}")
    print(f"\n{'synchronous stage (cumulative)':72} {'calls/ev':>8} {'us/event':>9}")
    stages = {}
    for file, name, what in STAGES:
        hits = [v for k, v in entries.items() if Path(k[0]).name == file and k[2] == name and "cdp_" in k[0]]
        if hits:
            calls, cumulative = sum(v[1] for v in hits), sum(v[3] for v in hits)
            stages[f"{file}:{name}"] = {"what": what, "calls": calls, "cumulative_s": cumulative}
            print(f"{file + ':' + name + '  ' + what:72} {calls / events:8.2f} {1e6 * cumulative / events:9.1f}")
    print(f"\ntop {top} functions by own time:")
    print(f"{'own s':>7} {'us/event':>9} {'calls/ev':>9}  function")
    hot = []
    for (file, line, name), (_cc, calls, own, _cum, _callers) in sorted(
            ((k, v) for k, v in entries.items() if "epoll" not in k[2]), key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"{own:7.2f} {1e6 * own / events:9.1f} {calls / events:9.2f}  {where}")
        hot.append({"function": where, "own_s": own, "calls": calls})
    return {"busy_s": busy, "idle_s": idle, "own_time_by_module_s": by, "stages": stages, "hot": hot}


async def _reset_statements(servers: Any, database: str) -> None:
    conn = await servers.admin(database)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def _statements(servers: Any, database: str, count: int, label: str, seconds: float) -> dict[str, Any]:
    rows = [r for r in await idb.statements(servers, database, count)
            if not r["query"].startswith(("SELECT count(*)", "SELECT pg_stat_statements_reset", "CREATE EXTENSION"))]
    return dict(idb.print_statements(label, rows, count, seconds))


async def profile(args: argparse.Namespace, servers: Any, workload: Workload, out_dir: Path, stamp: str,
                  tmp: Path) -> dict[str, Any]:
    """Where the time goes: the live projection with pg_stat_statements, then under cProfile (start-up
    included); GetProfile at a quarter of --rate likewise (the profiler on after start-up)."""
    await asyncio.to_thread(idb.enable_pg_stat_statements, servers)
    events = len(workload.items)
    report: dict[str, Any] = {}
    async with idb.Log(servers.nats_url) as log:
        report["ceiling"] = await measure_ceiling(log, servers, workload, max(1, math.ceil(CEILING_MIN_EVENTS / events)))
        print(f"ceiling {report['ceiling']['nats_py']['events_per_s']:,.0f} ev/s", flush=True)
        result = await measure_live(log, servers, workload, "p", before_start=lambda db: _reset_statements(servers, db),
                                    keep_database=True)
        per, busy = result["cpu_us_per_event"], result["busy_cores"]
        print(f"\nlive: {result['events_per_s']:,.0f} ev/s (pg_stat_statements on, no profiler); CPU per event profile "
              f"{per['profile']:.0f} us, PostgreSQL {per['postgres']:.0f} us, nats-server {per['nats_server']:.0f} us; "
              f"busy profile {busy['profile']:.2f} cores, PostgreSQL {busy['postgres']:.2f}")
        report["live"] = {**result, **await _statements(servers, result["database"], events, "live projection",
                                                         result["seconds"])}
        await servers.drop_database(result["database"])
        path = out_dir / f"profile-live-{stamp}.prof"
        profiled = await measure_live(log, servers, workload, "q", profile_out=path)
        print(f"\nunder cProfile: {profiled['events_per_s']:,.0f} ev/s (profiler overhead included)")
        report["live_cprofile"] = {**profiled, "profile": str(path), **print_profile(path, events)}

        preload = await build_preload(log, servers, args.profiles)
        print(f"\npreload: {preload['profiles']:,} profiles in {preload['total_s']:.1f} s", flush=True)
        rate = args.rate / LIGHT
        requests = latency_requests(preload["keys"], int(rate * args.duration / 2), SEED + 300)
        for profiled_run in (False, True):
            topology = await log.fresh("g")
            service = Service(servers, topology.namespace, preload["database"],
                              out_dir / f"profile-getprofile-{stamp}.prof" if profiled_run else None)
            service.profile_on_signal = True

            async def ready(profiled: bool = profiled_run, service: Service = service) -> None:
                """After the client's warm-up: the profiler on, or the statement counts reset."""
                if profiled:
                    assert service.process is not None
                    service.process.send_signal(signal.SIGUSR1)
                else:
                    await _reset_statements(servers, preload["database"])

            try:
                service.start()
                await service.wait_healthy()
                await service.wait_logged("rescored", "scoring_failed")
                got = await run_client("get_profile", service.grpc_address, rate, requests, servers, service, tmp,
                                       ready)
            finally:
                await service.stop()
                await log.drop(topology)
            per = got["cpu_us_per_request"]
            print(f"\nGetProfile at {rate:g}/s{' under cProfile' if profiled_run else ''}: p50 {got['p50_ms']:.2f} ms, "
                  f"p99 {got['p99_ms']:.2f} ms; CPU per request client {per['client']:.0f} us, profile "
                  f"{per['profile']:.0f} us, PostgreSQL {per['postgres']:.0f} us", flush=True)
            if profiled_run:
                report["get_profile_cprofile"] = {**got, **print_profile(service.profile_out, got["ok"], "GetProfile")}
            else:
                report["get_profile"] = {**got, **await _statements(servers, preload["database"], got["ok"],
                                                                    "GetProfile", len(requests) / rate)}
        preload.pop("keys")
        report["preload"] = preload
    return report


# --- main -----------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, servers: Any, workload: Workload,
                tmp: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    raw: dict[str, list[dict[str, Any]]] = {"ceiling": [], "live": [], "latency": []}
    can_rebuild = not args.latency_only and rebuild_available()
    if not can_rebuild and not args.latency_only:
        print("rebuild: not measured (cdp replay profile not available)", flush=True)
    passes = max(1, math.ceil(CEILING_MIN_EVENTS / len(workload.items)))
    async with idb.Log(servers.nats_url) as log:
        preload: dict[str, Any] = {} if args.no_latency else await build_preload(log, servers, args.profiles)
        print("preload: none (--no-latency)" if not preload else f"preload: {preload['profiles']:,} profiles ({preload['customers']:,} customers, "
              f"{preload['identifiers']:,} identifiers, {preload['database_bytes'] / 2**20:.0f} MiB) in "
              f"{preload['total_s']:.1f} s: migrations {preload['migrate_s']:.1f} s, fold + score "
              f"{preload['fold_score_s']:.1f} s, save_many {preload['save_s']:.1f} s, VACUUM ANALYZE "
              f"{preload['analyze_s']:.1f} s", flush=True)
        for run in range(args.runs):
            deadline = time.monotonic() + args.wait_quiet
            while (load := await asyncio.to_thread(ib.machine_load)) > QUIET_CORES and time.monotonic() < deadline:
                pass
            if load > QUIET_CORES:
                print(f"note: {load:.2f} cores busy with other processes before run {run + 1}", flush=True)
            began = time.perf_counter()
            if args.latency_only:
                raw["latency"].append(await measure_latency(log, servers, preload, args, run, tmp))
                lat = raw["latency"][-1]
                print(f"run {run + 1}/{args.runs} ({time.perf_counter() - began:.0f} s): GetProfile p50/p99 "
                      f"{lat['get_profile']['p50_ms']:.2f}/{lat['get_profile']['p99_ms']:.2f} ms, health "
                      f"{lat['health']['p50_ms']:.2f}/{lat['health']['p99_ms']:.2f} ms; other load up to "
                      f"{lat['get_profile']['foreign_cores']:.2f} cores", flush=True)
                continue
            raw["ceiling"].append(await measure_ceiling(log, servers, workload, passes))
            raw["live"].append(await measure_live(log, servers, workload, "p", rebuild=can_rebuild))
            live = raw["live"][-1]
            if live["seconds"] < MIN_MEASURE_SECONDS:
                print(f"warning: the live projection lasted only {live['seconds']:.1f} s; use --events "
                      f"{math.ceil(len(workload.items) * 10 / live['seconds'] / 1000) * 1000} or more for about 10 s",
                      flush=True)
            c = raw["ceiling"][-1]
            rebuilt = f"{live['rebuild']['events_per_s']:,.0f} ev/s" if live.get("rebuild") else "not measured"
            references = ", ".join(f"{c[level]['events_per_s']:,.0f}" for level in REFERENCE_LEVELS)
            print(f"run {run + 1}/{args.runs} ({time.perf_counter() - began:.0f} s): ceiling "
                  f"{c['nats_py']['events_per_s']:,.0f} ev/s (Puller {c['puller']['events_per_s']:,.0f}; references "
                  f"{references}); live "
                  f"{live['events_per_s']:,.0f} ev/s; rebuild {rebuilt}; other load up to "
                  f"{max(c['nats_py']['foreign_cores'], live['foreign_cores']):.2f} cores", flush=True)
            if preload:
                raw["latency"].append(await measure_latency(log, servers, preload, args, run, tmp))
                lat = raw["latency"][-1]
                print(f"run {run + 1}/{args.runs}: GetProfile p50/p99 {lat['get_profile']['p50_ms']:.2f}/"
                      f"{lat['get_profile']['p99_ms']:.2f} ms, health {lat['health']['p50_ms']:.2f}/"
                      f"{lat['health']['p99_ms']:.2f} ms; other load up to {lat['get_profile']['foreign_cores']:.2f} "
                      "cores", flush=True)
        if preload:
            await servers.drop_database(preload["database"])
    return raw, preload


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="resolved events per measurement")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the table shows medians")
    parser.add_argument("--profiles", type=int, default=100_000, help="profiles preloaded for GetProfile")
    parser.add_argument("--rate", type=float, default=1000.0, help="GetProfile (and health check) requests per second")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of GetProfile load per run (the health check runs half as long)")
    parser.add_argument("--json", type=Path, help="where to write raw numbers and medians "
                        "(default bench/results/profile-<date>.json)")
    parser.add_argument("--profile", action="store_true",
                        help="SQL per event (pg_stat_statements) and cProfile of the live projection, instead")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to leave the CPU idle")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the GetProfile latency part (preload, then health check and GetProfile each run)")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the GetProfile latency part (no preload): ceiling, live projection and rebuild only")
    parser.add_argument("--scoring-every", type=float, metavar="SECONDS",
                        help="run the scoring job every SECONDS during the measurements, not only at start "
                        "(what its rounds cost the calls and the projection)")
    parser.add_argument("--rev", metavar="REV",
                        help="run services/profile and libs/common as of this git revision (exported to the temp "
                             "dir, first on the service's PYTHONPATH) instead of the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (nats store, PostgreSQL data, logs)")
    parser.add_argument("--latency-client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.latency_client:
        asyncio.run(latency_client(json.loads(args.latency_client)))
        return 0
    if args.scoring_every is not None:
        if not math.isfinite(args.scoring_every) or args.scoring_every <= 0:
            parser.error(f"--scoring-every must be a number of seconds above 0, got {args.scoring_every}")
        Service.scores_interval = str(args.scoring_every)
    if args.events < FETCH_BATCH or args.runs < 1 or args.profiles < 100 or args.rate <= 0 or args.duration <= 0:
        parser.error(f"--events must be at least {FETCH_BATCH}, --runs at least 1, --profiles at least 100")

    stamp, results_dir, tmp, logs = idb.set_up("profile")
    nats_server = postgres = None
    began = time.perf_counter()
    global CODE
    try:
        if args.rev:
            CODE = Code.at(args.rev, tmp)
        print(f"building {args.events} events ...", flush=True)
        workload = build_workload(args.events, max(1000, args.events // 2))
        nats_server = start_nats(tmp / "nats", log_file=logs / "nats-server.log")
        _children.append(nats_server.process)
        postgres = start_postgres(tmp / "pg" / "data", keep=args.keep)
        servers = idb.Servers(nats_server.url, nats_server.process.pid, postgres, logs)
        pg = ib.run_async(idb.postgres_info(servers))
        info = ib.machine()
        info["modified"] = subprocess.run(["git", "status", "--porcelain", "--", "services/profile", "libs/common"],
                                          cwd=REPO, capture_output=True, text=True, check=False).stdout.splitlines()
        info["postgres"] = pg["version"]
        info["code_under_test"] = {"label": CODE.label, "commit": CODE.commit}
        info["fingerprint_at_start"] = CODE.fingerprint()
        print(f"nats-server {nats_server.url}, PostgreSQL {pg['settings']['server_version']} in {tmp}; "
              f"{info['cpu']}, {info['cores']} cores; workload {workload.summary['events']:,} events over "
              f"{workload.summary['profiles_touched']:,} profiles", flush=True)
        document: dict[str, Any] = {"machine": info, "postgres": pg, "workload": workload.summary}
        if args.profile:
            report = ib.run_async(profile(args, servers, workload, results_dir, stamp, tmp))
            out = args.json or results_dir / f"profile-profile-{stamp}.json"
            document |= {"settings": vars(args) | {"json": str(out)}, "profile": report}
        else:
            raw, preload = ib.run_async(bench(args, servers, workload, tmp))
            preload.pop("keys", None)
            medians = summarize(raw)
            render(info, pg, args, workload, preload, raw, medians)
            out = args.json or results_dir / f"profile-{stamp}.json"
            document |= {"settings": vars(args) | {"json": str(out)}, "preload": preload, "medians": medians,
                         "raw": raw}
        info["fingerprint_at_end"] = CODE.fingerprint()
        return int(idb.save(out, document, began))
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        idb.tear_down(_children, nats_server, postgres, tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
