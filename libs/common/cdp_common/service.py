"""The composition root every service shares: connect, migrate, serve gRPC, consume, stop.

A service describes itself with a `ServiceDefinition`; `run` is its `main`, `running` starts
the same thing inside an existing event loop (the end-to-end tests use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import nats
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_common import db, eventlog, logs, metrics, rpc, tracing
from cdp_common.consumer import BatchHandler, Consumer, ConsumerSpec, Handler, Pipeline
from cdp_common.settings import DEFAULT_MAX_CONCURRENT_RPCS, Settings, SettingsError, optional_int

# The cyclic collector's thresholds. With the defaults (700, 10, 10) it ran 1,276 young, 115 middle
# and 10 full collections while identity resolved 40,000 events (bench/identity.py, measured with
# gc.callbacks): 0.41 s, about 10 µs per event; with these, once. Cycles are still collected.
GC_THRESHOLDS = (50_000, 20, 100)
# How often the young generation is collected on a clock as well. grpc.aio leaves a reference
# cycle of five objects behind every call it serves (grpcio 1.85: the closure `_find_method_handler`
# makes; gc.DEBUG_SAVEALL shows it), and only the cyclic collector frees them. Left to
# GC_THRESHOLDS, 50,000 of them went at once, every 10 s at 1,000 GetProfile calls/s, and each time
# the service stopped for 20-44 ms (timed with gc.callbacks): a stall of that length is the slowest
# 1% of its calls. On this clock a few hundred go at a time: 0.17 ms a collection on average while
# it serves GetProfile. A consumer pays for it: each collection also scans the batch in hand (about
# 3 ms in profile's projection), about 5 µs per event.
YOUNG_EVERY_SECONDS = 0.1
# Fewer young objects than this since the last collection: nothing worth a collection yet.
_YOUNG_AT_LEAST = 200

log = structlog.get_logger("cdp.service")

CORRELATION_METADATA = "x-correlation-id"


@dataclass
class Runtime:
    """The adapters a service's parts are built from."""

    settings: Settings
    nc: NATS
    js: JetStreamContext
    topology: eventlog.Topology
    schema: str | None
    maybe_engine: AsyncEngine | None
    consumers: list[Consumer] = field(default_factory=list)
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    # Other listeners a service opens (e.g. ingest's HTTP collector), by name.
    endpoints: dict[str, str] = field(default_factory=dict)
    # Called first at shutdown, after gRPC stops taking calls (e.g. closing an HTTP server).
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    log: Any = field(default_factory=lambda: structlog.get_logger("cdp.service"))
    # OpenTelemetry (off unless the OTEL_* environment configures it), e.g. for an HTTP server's spans.
    tracing: tracing.Tracing = field(default_factory=lambda: tracing.Tracing("", {}))

    def __post_init__(self) -> None:
        self.publisher = eventlog.Publisher(self.nc)
        self._outbox = (
            db.Outbox(self.maybe_engine, self.publisher, self.schema)
            if self.maybe_engine is not None and self.schema is not None
            else None
        )

    @property
    def engine(self) -> AsyncEngine:
        if self.maybe_engine is None:
            raise RuntimeError(f"service {self.settings.service} has no database schema")
        return self.maybe_engine

    @property
    def outbox(self) -> db.Outbox:
        if self._outbox is None:
            raise RuntimeError(f"service {self.settings.service} has no database schema")
        return self._outbox

    def consumer(
        self, spec: ConsumerSpec, handler: Handler, batch_handler: BatchHandler | None = None,
        pipeline: Pipeline | None = None,
    ) -> Consumer:
        consumer = Consumer(
            batch_handler=batch_handler,
            pipeline=pipeline,
            js=self.js,
            engine=self.engine,
            outbox=self.outbox,
            schema=self.schema or "",
            topology=self.topology,
            spec=replace(spec, linger_seconds=self.settings.consumer_linger_ms / 1000),
            handler=handler,
        )
        self.consumers.append(consumer)
        return consumer


@dataclass(frozen=True)
class ServiceDefinition:
    name: str
    # None for a service that keeps no read model (it then needs no database at all).
    schema: str | None
    default_port: int
    migrations: Sequence[db.Migration]
    # Adds the servicers to the server, creates consumers on the runtime, returns the
    # full names of the gRPC services it registered (for health and reflection).
    build: Callable[[grpc.aio.Server, Runtime], Awaitable[Sequence[str]]]


def grpc_server(max_concurrent_rpcs: int, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """A service's gRPC server: beyond `max_concurrent_rpcs` calls in progress, further calls are
    refused at once with RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!"), which clients may
    retry with backoff, rather than queued without bound."""
    # Calls that have arrived but that the server has not taken up yet. gRPC's defaults (1,000, and
    # 3,000 at most) made a burst's excess come back as a bare CANCELLED before the concurrency limit
    # could refuse it clearly; these leave the refusing to the limit.
    pending = 10 * max(max_concurrent_rpcs, DEFAULT_MAX_CONCURRENT_RPCS)
    return grpc.aio.server(
        interceptors=interceptors, maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.server.max_pending_requests", pending),
                 ("grpc.server.max_pending_requests_hard_limit", 2 * pending)],
    )


class _CorrelationInterceptor(rpc.PerMethodInterceptor):
    """Binds a correlation id (from `x-correlation-id` metadata, or a new one) to each RPC's logs,
    and parses requests itself: one the parser refuses (e.g. a Struct nested deeper than protobuf's
    depth limit) is INVALID_ARGUMENT, where gRPC's own parsing would answer UNKNOWN."""

    def wrap(self, method: str, handler: Any) -> Any:
        parse = _parser(handler.request_deserializer)
        if handler.stream_stream is not None:
            streamed = handler.stream_stream

            async def wrapped_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async def parsed() -> Any:
                    async for raw in requests:
                        yield await parse(raw, context)

                async for response in streamed(parsed(), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                wrapped_stream, response_serializer=handler.response_serializer
            )
        if handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def wrapped(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request = await parse(raw, context)
            metadata = context.invocation_metadata() or ()
            given = next((value for key, value in metadata if key == CORRELATION_METADATA), None)
            with structlog.contextvars.bound_contextvars(rpc=method, correlation_id=str(given or uuid.uuid4())):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(wrapped, response_serializer=handler.response_serializer)


def _parser(deserialize: Callable[[bytes], Any] | None) -> Callable[..., Awaitable[Any]]:
    async def parse(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, or anything its parser raises
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: cannot be parsed: {error}")

    return parse


def correlation_id() -> str:
    """The correlation id bound to the current RPC (a new one outside an RPC)."""
    bound = structlog.contextvars.get_contextvars().get("correlation_id")
    return str(bound) if bound else str(uuid.uuid4())


@dataclass
class Running:
    port: int
    runtime: Runtime
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    # Where Prometheus scrapes it (None: CDP_METRICS_LISTEN=0).
    metrics_url: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_failed(self) -> BaseException:
        """Returns the error of the first consumer or background task that died.

        A consumer stopped on purpose (profile stops its own while it swaps in a rebuilt read
        model, then starts it again) has not died: the watched set is taken afresh every second.
        """
        while True:
            consumers = [c for c in self.runtime.consumers if c.task is not None]
            watched = [*self.runtime.background, *(c.task for c in consumers if c.task is not None and not c.stopped)]
            done: set[asyncio.Task[Any]] = set()
            if watched:
                done, _ = await asyncio.wait(watched, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(1.0)
            for task in done:
                if any(c.task is task and c.stopped for c in consumers):
                    continue
                return task.exception() or RuntimeError(f"{task.get_name()} stopped unexpectedly")


async def connect_nats(url: str, name: str) -> NATS:
    async def on_error(error: Exception) -> None:
        log.warning("nats_error", error=str(error))

    async def on_disconnected() -> None:
        log.warning("nats_disconnected")

    async def on_reconnected() -> None:
        log.info("nats_reconnected")

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        drain_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )


async def collect_on_a_clock() -> None:
    """Runs the cyclic collector every YOUNG_EVERY_SECONDS by its own rule: the young generation,
    or an older one once the one below it was collected as often as its threshold says. It leaves
    it alone while it is disabled (as `cdp_profile.bulk` does while it folds a chunk)."""
    while True:
        await asyncio.sleep(YOUNG_EVERY_SECONDS)
        young, young_collections, middle_collections = gc.get_count()
        if not gc.isenabled() or young < _YOUNG_AT_LEAST:
            continue
        _, young_threshold, middle_threshold = gc.get_threshold()
        if middle_collections >= middle_threshold:
            gc.collect(2)
        elif young_collections >= young_threshold:
            gc.collect(1)
        else:
            gc.collect(0)


@contextlib.asynccontextmanager
async def running(definition: ServiceDefinition, settings: Settings) -> AsyncIterator[Running]:
    """Starts the service in this event loop; leaving the block shuts it down gracefully."""
    if definition.schema is not None and not settings.database_url:
        raise SettingsError("environment variable CDP_DATABASE_URL is required but not set")
    traces = tracing.Tracing(definition.name)
    nc = await connect_nats(settings.nats_url, f"cdp-{definition.name}")
    engine = (
        db.create_engine(settings.database_url, search_path=definition.schema,
                         application_name=f"cdp-{definition.name}")
        if definition.schema is not None
        else None
    )
    service_metrics = metrics.ServiceMetrics()
    server = grpc_server(settings.grpc_max_concurrent_rpcs,
                         [service_metrics.interceptor, *traces.interceptors, _CorrelationInterceptor()])
    health_servicer = health.aio.HealthServicer()
    runtime: Runtime | None = None
    try:
        js = nc.jetstream()
        topology = eventlog.Topology(settings.namespace)
        await eventlog.provision_streams(js, topology, settings.stream_replicas)
        if engine is not None and definition.schema is not None:
            await db.migrate(engine, definition.schema, definition.migrations)
        runtime = Runtime(
            settings=settings, nc=nc, js=js, topology=topology, schema=definition.schema, maybe_engine=engine,
            tracing=traces,
        )
        names = list(await definition.build(server, runtime))
        service_metrics.watch(js, runtime.consumers)
        traces.watch(runtime.consumers)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        port = server.add_insecure_port(settings.grpc_listen)
        if port == 0:
            raise RuntimeError(f"cannot listen on {settings.grpc_listen}")
        await server.start()
        for consumer in runtime.consumers:
            await consumer.start()
        metrics_url = await service_metrics.serve(settings.metrics_listen, settings.metrics_required)
        # What start-up allocated lives as long as the process: keep the collector from scanning
        # it again and again (shorter pauses on the request path).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        runtime.background.append(asyncio.create_task(collect_on_a_clock(), name="collector"))
        for name in ["", *names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = settings.grpc_listen.rsplit(":", 1)[0]
        log.info("service_started", grpc=f"{host}:{port}", namespace=settings.namespace, metrics=metrics_url,
                 **runtime.endpoints)
        yield Running(port=port, runtime=runtime, server=server, health=health_servicer, metrics_url=metrics_url)
    finally:
        # Reverse order: stop taking RPCs, finish (or nak) the batches in hand, then disconnect.
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=5)
        if runtime is not None:
            for stop in runtime.on_stop:
                await stop()
            # A consumer that died re-raises its error here (already reported): the rest of the
            # shutdown must still run, e.g. the activation sender finishing the message in hand.
            await asyncio.gather(*(c.stop() for c in runtime.consumers), return_exceptions=True)
            for task in runtime.background:
                task.cancel()
            await asyncio.gather(*runtime.background, return_exceptions=True)
            await runtime.publisher.close()
        await service_metrics.stop()
        # After the consumers stopped: their last spans are exported too.
        await traces.shutdown()
        with contextlib.suppress(Exception):
            await nc.drain()
        if engine is not None:
            await engine.dispose()
        log.info("service_stopped")


# How long a service whose worker failed may take to shut down before it exits regardless: longer
# than the graceful steps' own bounds together (gRPC grace 5 s, profile's read pool 5 s, the consumers 10 s,
# NATS drain 5 s), and short enough that a supervisor sees it gone within a minute.
FAILED_SHUTDOWN_SECONDS = 40.0


def exit_after(seconds: float) -> threading.Timer:
    """Ends the process with exit code 1 after `seconds`, from a thread of its own, whatever the event
    loop is doing. Once a worker failed, nothing else ends a service whose shutdown hangs: it stays
    up, unhealthy, and no supervisor restarts it."""

    def leave() -> None:
        log.error("shutdown_timed_out", seconds=seconds)
        os._exit(1)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()
    return timer


async def _serve_until_signalled(definition: ServiceDefinition, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(definition, settings) as service:
        _signal_ready()
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(service.wait_failed())
        await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        if failed.done():
            # A service whose consumer died must not look healthy: exit so the supervisor restarts it.
            log.error("worker_failed", error=repr(failed.result()))
            exit_after(FAILED_SHUTDOWN_SECONDS)
            raise SystemExit(1)
        failed.cancel()
        log.info("shutdown_requested")


def _start_workers(count: int, timeout: float = 60.0) -> list[subprocess.Popen[bytes]]:
    """More processes of this very command, sharing its ports (SO_REUSEPORT): Python runs one
    event loop per core, so a stateless service uses the other cores this way.

    Returns once every worker serves, so that the first process turns healthy only after them:
    clients connecting at that moment are spread over all of them.
    """
    if count <= 1:
        return []
    ready_read, ready_write = os.pipe()
    env = {**os.environ, "CDP_WORKERS": "1", "CDP_READY_FD": str(ready_write)}
    workers = [subprocess.Popen(sys.orig_argv, env=env, pass_fds=(ready_write,)) for _ in range(count - 1)]
    os.close(ready_write)
    deadline = time.monotonic() + timeout
    ready = 0
    with os.fdopen(ready_read, "rb", buffering=0) as pipe:
        while ready < len(workers):
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                _stop_workers(workers)
                raise SettingsError(f"{len(workers) - ready} of {len(workers)} worker processes did not start")
            if select.select([pipe], [], [], 0.2)[0]:
                ready += len(pipe.read(len(workers)) or b"")
    return workers


def _signal_ready() -> None:
    fd = os.environ.pop("CDP_READY_FD", "")
    if fd:
        os.write(int(fd), b".")
        os.close(int(fd))


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> int:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    return max((worker.wait() for worker in workers), default=0)


def run(definition: ServiceDefinition) -> None:
    """A service's `main`: settings from the environment, JSON logs, stop on SIGTERM/SIGINT."""
    try:
        settings = Settings.from_env(definition.name, definition.default_port)
        workers = optional_int("CDP_WORKERS", 1)
        if workers < 1 or (workers > 1 and definition.schema is not None):
            raise SettingsError(
                "environment variable CDP_WORKERS must be 1, or more only for a service without a read model"
            )
    except SettingsError as error:
        sys.exit(f"cdp-{definition.name}: {error}")
    logs.configure(definition.name, settings.log_level)
    try:
        if workers > 1:
            metrics.share_between_processes()
        children = _start_workers(workers)
    except SettingsError as error:
        sys.exit(f"cdp-{definition.name}: {error}")
    try:
        asyncio.run(_serve_until_signalled(definition, settings))
    except SettingsError as error:
        sys.exit(f"cdp-{definition.name}: {error}")
    finally:
        code = _stop_workers(children)
    if code:
        sys.exit(code)
