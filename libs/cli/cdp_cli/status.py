"""`cdp status`: each service's gRPC health, and how far behind its durable consumers are.

Health comes from each service's standard gRPC health check; lag (messages pending plus delivered
but not acknowledged) and dead letters straight from JetStream, so they are right even when a
service is down (its consumers' lag then grows). Durable consumers are named
`<service>-<purpose>` after the service's module (`dmp-...` for dmp-bridge); others on the same
streams (an external subscriber's) are not shown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import nats.errors
import nats.js.errors
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js import JetStreamContext
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cdp_cli import dlq, options
from cdp_cli.suite import SERVICES
from cdp_common import eventlog
from cdp_common.settings import SettingsError

EXIT_OK = 0
EXIT_NOT_SERVING = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 75

SERVING = "SERVING"
UNREACHABLE = "unreachable"
HEALTH_TIMEOUT_SECONDS = 2.0
LOG_TIMEOUT_SECONDS = 5.0
# Durable consumer name prefix -> service.
_OWNERS = {module.removeprefix("cdp_"): name for name, module, _ in SERVICES}


@dataclass(frozen=True)
class ConsumerState:
    name: str
    stream: str
    # pending + ack_pending: what the service has not applied yet.
    lag: int
    pending: int
    ack_pending: int
    dead_letters: int
    redriven: int


@dataclass
class ServiceState:
    name: str
    address: str
    # SERVING, NOT_SERVING (e.g. shutting down), another health status, or "unreachable".
    health: str
    error: str = ""
    consumers: list[ConsumerState] = field(default_factory=list)

    @property
    def serving(self) -> bool:
        return self.health == SERVING


@dataclass
class Status:
    services: list[ServiceState]
    namespace: str
    nats: str | None
    # Why lag and dead letters are not shown (no NATS given, NATS unreachable, no such namespace).
    log_error: str | None = None
    # The exit status when every service serves: lag not read because of a wrong option or NATS.
    log_exit: int = EXIT_OK

    @property
    def serving(self) -> bool:
        return all(service.serving for service in self.services)

    def exit_code(self) -> int:
        return self.log_exit if self.serving else EXIT_NOT_SERVING

    def as_json(self) -> dict[str, Any]:
        return {
            "serving": self.serving, "namespace": self.namespace, "nats": self.nats, "log_error": self.log_error,
            "services": [{**asdict(service), "serving": service.serving} for service in self.services],
        }


# Pure parts.


def owner(durable: str) -> str | None:
    """The service a durable consumer belongs to, by its name, or None for someone else's."""
    return _OWNERS.get(durable.split("-", 1)[0]) if "-" in durable else None


def dead_letter_counts(topology: eventlog.Topology, subjects: dict[str, int]) -> tuple[Counter[str], Counter[str]]:
    """(letters, re-driven markers) per consumer, from the DEADLETTER stream's subject counts."""
    prefix = f"{topology.root}.deadletter."
    letters: Counter[str] = Counter()
    redriven: Counter[str] = Counter()
    for subject, count in subjects.items():
        if not subject.startswith(prefix):
            continue
        consumer, _, rest = subject[len(prefix):].partition(".")
        if not rest:
            letters[consumer] += count
        elif rest == dlq.MARKER_SUFFIX:
            redriven[consumer] += count
    return letters, redriven


def table(status: Status) -> Table:
    result = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("service", "left"), ("health", "left"), ("address", "left"), ("consumer", "left"),
                          ("lag", "right"), ("dead letters", "right")):
        result.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    unknown = "?" if status.log_error else "-"
    for service in status.services:
        health = Text(service.health, style="green" if service.serving else "bold red")
        if not service.consumers:
            result.add_row(service.name, health, service.address, unknown if service.name != "ingest" else "-", "", "")
        for i, consumer in enumerate(service.consumers):
            letters = f"{consumer.dead_letters}" + (f" ({consumer.redriven} re-driven)" if consumer.redriven else "")
            result.add_row(*((service.name, health, service.address) if i == 0 else ("", "", "")),
                           consumer.name, f"{consumer.lag:,}", letters)
    return result


def summary(status: Status) -> list[str]:
    down = [f"{s.name} ({s.health}{f': {s.error}' if s.error else ''})" for s in status.services if not s.serving]
    lines = [f"{len(status.services) - len(down)} of {len(status.services)} services serving"
             + (f"; not serving: {', '.join(down)}" if down else "")]
    consumers = [c for s in status.services for c in s.consumers]
    if status.log_error:
        lines.append(f"no consumer lag: {status.log_error}")
    elif consumers:
        lines.append(f"{sum(c.lag for c in consumers):,} message(s) behind, "
                     f"{sum(c.dead_letters for c in consumers):,} dead letter(s) in namespace {status.namespace!r}")
    return lines


# Reading the services and the log.


async def check_health(address: str) -> tuple[str, str]:
    """(health status or "unreachable", why it is unreachable)."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its method attributes.
            reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            return UNREACHABLE, f"{error.code().name}: {error.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), ""


async def read_consumers(js: JetStreamContext, topology: eventlog.Topology) -> dict[str, list[ConsumerState]]:
    """The six services' durable consumers by service, with their lag and dead letters."""
    try:
        info = await js.stream_info(topology.stream("deadletter"), subjects_filter=f"{topology.root}.deadletter.>")
    except nats.js.errors.NotFoundError:
        raise SettingsError(f"no streams in namespace {topology.namespace!r}: no service has run in it "
                            "(set --namespace / CDP_NAMESPACE as the services have it)") from None
    letters, redriven = dead_letter_counts(topology, info.state.subjects or {})
    found: dict[str, list[ConsumerState]] = {}
    for area in eventlog.AREAS:
        stream = topology.stream(area)
        try:
            consumers = await js.consumers_info(stream)
        except nats.js.errors.NotFoundError:
            continue
        for consumer in consumers:
            durable = consumer.config.durable_name or ""
            service = owner(durable)
            if service is None:
                continue
            pending, ack_pending = consumer.num_pending or 0, consumer.num_ack_pending or 0
            found.setdefault(service, []).append(ConsumerState(
                name=durable, stream=stream, lag=pending + ack_pending, pending=pending, ack_pending=ack_pending,
                dead_letters=letters[durable], redriven=redriven[durable],
            ))
    return {service: sorted(states, key=lambda c: c.name) for service, states in found.items()}


async def _read_log(url: str, topology: eventlog.Topology) -> dict[str, list[ConsumerState]]:
    nc = await options.connect(url, "cdp-status")
    try:
        return await read_consumers(nc.jetstream(timeout=LOG_TIMEOUT_SECONDS), topology)
    finally:
        await nc.close()


async def collect(addresses: dict[str, str], url: str | None, topology: eventlog.Topology) -> Status:
    healths = asyncio.gather(*(check_health(address) for address in addresses.values()))
    status = Status(services=[], namespace=topology.namespace, nats=url)
    consumers: dict[str, list[ConsumerState]] = {}
    if url is None:
        status.log_error = options.NO_NATS
    else:
        try:
            consumers = await _read_log(url, topology)
        except SettingsError as error:
            status.log_error, status.log_exit = str(error), EXIT_USAGE
        except (*eventlog.LOG_UNAVAILABLE, nats.errors.Error) as error:
            status.log_error = f"NATS is unavailable ({type(error).__name__}: {error})"
            status.log_exit = EXIT_UNAVAILABLE
    for (name, address), (health, why) in zip(addresses.items(), await healths, strict=True):
        status.services.append(ServiceState(name, address, health, why, consumers.get(name, [])))
    return status


# The command.


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "status", help="each service's health, its consumers' lag and dead letters",
        description="Checks each service's gRPC health and reads its durable consumers' lag (messages not yet "
        "applied) and dead letters from JetStream. Exit status 0 when every service serves, 1 when one does "
        "not, 2 for a wrong option (e.g. a namespace no service uses), 75 when NATS is unreachable.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    options.add_log_options(parser)
    for name, _, _ in SERVICES:
        options.add_address_option(parser, name)
    return parser


def command(args: argparse.Namespace) -> int:
    out = Console(highlight=False, markup=False, soft_wrap=True)
    if not out.is_terminal:
        # Piped (e.g. to grep): one line per row rather than 80 columns' folding.
        out = Console(highlight=False, markup=False, soft_wrap=True, width=max(out.width, 160))
    err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    addresses = {name: options.service_address(name, getattr(args, name.replace("-", "_"))) for name, _, _ in SERVICES}
    try:
        topology = options.topology(args)
    except SettingsError as error:
        err.print(f"cdp status: {error}")
        return EXIT_USAGE
    try:
        # Without NATS, health alone is still worth showing.
        status = asyncio.run(collect(addresses, options.nats_url(args), topology))
    except KeyboardInterrupt:
        err.print("cdp status: interrupted")
        return 130
    if args.json:
        print(json.dumps(status.as_json(), indent=2))
    else:
        out.print(table(status))
        for line in summary(status):
            err.print(line)
    return status.exit_code()
