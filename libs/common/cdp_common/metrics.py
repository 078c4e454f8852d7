"""Prometheus metrics of one service (its consumers and its gRPC calls), served as `/metrics`.

Counting costs the hot path nothing per event: the consumer loop already counts what it applies
and dead-letters, and those counts are read when Prometheus scrapes; the only per-batch work is
one histogram observation. Consumer lag is asked of JetStream at scrape time, never in the loop.

Each service has its own registry, so several services can run in one process (the tests do).
A service with worker processes (ingest with CDP_WORKERS > 1) uses prometheus_client's
multiprocess mode: every process writes its counts to files in a directory they share, all of
them listen on the metrics port (SO_REUSEPORT, as for gRPC), and whichever one answers a scrape
reports the sum over all of them.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import structlog
from aiohttp import web
from nats.js import JetStreamContext
from prometheus_client import (
    CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics, values,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from cdp_common import rpc
from cdp_common.consumer import Consumer
from cdp_common.settings import SettingsError

log = structlog.get_logger("cdp.metrics")

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# A scrape waits this long for JetStream's consumer info; a consumer it cannot get has no lag sample.
LAG_TIMEOUT_SECONDS = 2.0
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# No `<name>_created` series beside every counter and histogram: Prometheus has no use for them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def share_between_processes() -> None:
    """Switches this process, and the worker processes it starts next, to multiprocess mode."""
    if os.environ.get(MULTIPROCESS_DIR):
        return
    directory = tempfile.mkdtemp(prefix="cdp-metrics-")
    os.environ[MULTIPROCESS_DIR] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    # prometheus_client chooses where values live when it is imported; this process imported it
    # before it knew it would start workers. The workers inherit the variable and choose alone.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


class ServiceMetrics:
    """The metrics of one service: a gRPC interceptor, consumer hooks and the `/metrics` endpoint."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        own = CollectorRegistry()
        self._rpc_handled = Counter(
            "grpc_server_handled", "gRPC calls completed, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"], registry=own,
        )
        self._rpc_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from a gRPC call's start to its last response, by method.",
            ["grpc_service", "grpc_method"], buckets=RPC_BUCKETS, registry=own,
        )
        self._batch_seconds = Histogram(
            "cdp_consumer_batch_seconds",
            "Time to apply one batch of a durable consumer: transaction, publishing its facts, ack.",
            ["consumer"], buckets=BATCH_BUCKETS, registry=own,
        )
        if self.multiprocess:
            # The metrics above are written to files; this registry reads every process's files.
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        else:
            self.registry = own
            ProcessCollector(registry=own)
        self._consumers: Sequence[Consumer] = ()
        self._js: JetStreamContext | None = None
        self._lag: dict[str, int] = {}
        self.registry.register(_ConsumerCollector(lambda: self._consumers, self._lag))
        self.interceptor = rpc.ObservingInterceptor(
            lambda method: _Recorder(self._rpc_handled, self._rpc_seconds, method)
        )
        self._runner: web.AppRunner | None = None

    def watch(self, js: JetStreamContext, consumers: Sequence[Consumer]) -> None:
        """Reports these consumers (a live list: read at every scrape) and times their batches."""
        self._js = js
        self._consumers = consumers
        for consumer in consumers:
            consumer.on_batch = self._batch_seconds.labels(consumer.spec.durable).observe

    async def refresh_lag(self) -> None:
        """Asks JetStream how far behind each consumer is: pending plus delivered but not acked."""
        js = self._js
        if js is None:
            return

        async def one(consumer: Consumer) -> None:
            durable = consumer.spec.durable
            try:
                info = await asyncio.wait_for(js.consumer_info(consumer.stream, durable), LAG_TIMEOUT_SECONDS)
            except Exception as error:  # noqa: BLE001 - the log is unreachable or the consumer gone: no sample
                self._lag.pop(durable, None)
                log.debug("consumer_lag_unavailable", consumer=durable, error=repr(error))
                return
            self._lag[durable] = (info.num_pending or 0) + (info.num_ack_pending or 0)

        await asyncio.gather(*(one(consumer) for consumer in self._consumers))

    async def serve(self, listen: str, required: bool = True) -> str | None:
        """Serves `/metrics` on host:port (empty: not at all); returns its URL. A port in use stops
        the service if the address was `required` (set explicitly), else it runs without metrics."""
        if not listen:
            return None
        host, _, port = listen.rpartition(":")
        exposition = make_aiohttp_handler(self.registry)

        async def scrape(request: web.Request) -> web.StreamResponse:
            await self.refresh_lag()
            return await exposition(request)

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            # Worker processes share the port, as they share gRPC's.
            await web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=self.multiprocess).start()
        except OSError as error:
            await runner.cleanup()
            if required:
                raise SettingsError(
                    f"environment variable CDP_METRICS_LISTEN: cannot listen on {listen}: {error}") from None
            log.warning("metrics_not_served", listen=listen, error=str(error),
                        hint="set CDP_METRICS_LISTEN to a free host:port, or 0")
            return None
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        return f"http://{shown}:{bound_port}/metrics"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class _ConsumerCollector(Collector):
    """The consumers' own counts, read at scrape time (services with consumers run one process)."""

    def __init__(self, consumers: Callable[[], Sequence[Consumer]], lag: dict[str, int]) -> None:
        self._consumers = consumers
        self._lag = lag

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        handled = CounterMetricFamily(
            "cdp_consumer_events_handled", "Events a durable consumer's handler applied.", labels=["consumer"])
        errors = CounterMetricFamily(
            "cdp_consumer_handler_errors", "Times a handler raised (each attempt at an event, or a whole batch).",
            labels=["consumer"])
        dead = CounterMetricFamily(
            "cdp_consumer_dead_letters", "Events given up on and written to the DEADLETTER stream.",
            labels=["consumer"])
        failed = CounterMetricFamily(
            "cdp_consumer_batch_failures", "Batches rolled back because the database or the log failed.",
            labels=["consumer"])
        lag = GaugeMetricFamily(
            "cdp_consumer_lag_messages", "Messages not yet applied: pending plus delivered but unacknowledged.",
            labels=["consumer"])
        active = GaugeMetricFamily(
            "cdp_consumer_active", "1 if this process applies the consumer, 0 if it is a standby or stopped.",
            labels=["consumer"])
        for consumer in self._consumers():
            name = [consumer.spec.durable]
            handled.add_metric(name, consumer.applied)
            errors.add_metric(name, consumer.handler_errors)
            dead.add_metric(name, consumer.dead_lettered)
            failed.add_metric(name, consumer.batch_failures)
            active.add_metric(name, 1 if consumer.active else 0)
            if consumer.spec.durable in self._lag:
                lag.add_metric(name, self._lag[consumer.spec.durable])
        return [handled, errors, dead, failed, lag, active]


class _Recorder:
    """One method's labelled series, looked up once: each call timed and counted by status code."""

    def __init__(self, handled: Counter, seconds: Histogram, method: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self._handled = handled
        self._labels = (service, name)
        self._seconds = seconds.labels(service, name)
        self._by_code: dict[str, Any] = {}

    def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        return time.perf_counter()

    def end(self, started: float, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> None:
        self._seconds.observe(time.perf_counter() - started)
        code = rpc.call_status(context, error).name
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._handled.labels(*self._labels, code)
        counter.inc()
