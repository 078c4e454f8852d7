"""Settings from environment variables, failing fast with the name of what is missing."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


class SettingsError(ValueError):
    """A required environment variable is missing or malformed."""


def require(name: str, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    value = env.get(name, "").strip()
    if not value:
        raise SettingsError(f"environment variable {name} is required but not set")
    return value


def optional(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(name, "").strip() or default


def optional_int(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    raw = optional(name, str(default), environ)
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"environment variable {name} must be an integer, got {raw!r}") from None


DEFAULT_LINGER_MS = 100
# Calls one service process works on at once; more are refused with RESOURCE_EXHAUSTED.
DEFAULT_MAX_CONCURRENT_RPCS = 1000
MAX_CONCURRENT_RPCS = 100_000
# Below the pull request's one-second wait for a first message, and far below the ack wait.
MAX_LINGER_MS = 1000

_NAMESPACE = re.compile(r"^[a-z][a-z0-9]{0,30}$")

# Where each service serves Prometheus metrics unless CDP_METRICS_LISTEN says otherwise: 9101-9106,
# in the order of their gRPC ports 50051-50056.
METRICS_PORTS = {
    "ingest": 9101, "identity": 9102, "profile": 9103, "segmentation": 9104, "activation": 9105, "dmp-bridge": 9106,
}


@dataclass(frozen=True)
class Settings:
    """What every service needs: where the log and the store are, and where to listen."""

    service: str
    nats_url: str
    database_url: str
    grpc_listen: str
    namespace: str
    log_level: str
    # Copies of each stream in a NATS cluster: 1 locally, 3 in production.
    stream_replicas: int = 1
    # host:port of the Prometheus /metrics endpoint; empty: none.
    metrics_listen: str = ""
    # Set explicitly (CDP_METRICS_LISTEN), so a port in use stops the service; a busy default does not.
    metrics_required: bool = False
    # How long a log consumer's batch that is not full waits for more messages (`cdp_common.pull`).
    consumer_linger_ms: int = DEFAULT_LINGER_MS
    # gRPC calls in progress at once before more are refused (`cdp_common.service.grpc_server`).
    grpc_max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS

    @classmethod
    def from_env(
        cls, service: str, default_port: int, environ: Mapping[str, str] | None = None
    ) -> Settings:
        namespace = optional("CDP_NAMESPACE", "cdp", environ)
        if not _NAMESPACE.fullmatch(namespace):
            raise SettingsError(
                f"environment variable CDP_NAMESPACE must be lower-case letters and digits "
                f"starting with a letter, got {namespace!r}"
            )
        listen = optional("CDP_GRPC_LISTEN", f"127.0.0.1:{default_port}", environ)
        if ":" not in listen:
            raise SettingsError(f"environment variable CDP_GRPC_LISTEN must be host:port, got {listen!r}")
        return cls(
            service=service,
            nats_url=require("CDP_NATS_URL", environ),
            # Required by every service that keeps a read model; checked when it starts.
            database_url=optional("CDP_DATABASE_URL", "", environ),
            grpc_listen=listen,
            namespace=namespace,
            log_level=optional("CDP_LOG_LEVEL", "info", environ).lower(),
            stream_replicas=bounded_int("CDP_STREAM_REPLICAS", 1, 1, 5, environ),
            metrics_listen=_metrics_listen(service, environ),
            metrics_required=optional("CDP_METRICS_LISTEN", "0", environ) != "0",
            consumer_linger_ms=bounded_int("CDP_CONSUMER_LINGER_MS", DEFAULT_LINGER_MS, 0, MAX_LINGER_MS, environ),
            grpc_max_concurrent_rpcs=bounded_int(
                "CDP_GRPC_MAX_CONCURRENT_RPCS", DEFAULT_MAX_CONCURRENT_RPCS, 1, MAX_CONCURRENT_RPCS, environ),
        )


def bounded_int(name: str, default: int, low: int, high: int, environ: Mapping[str, str] | None = None) -> int:
    """An integer setting that must lie between `low` and `high` (inclusive)."""
    value = optional_int(name, default, environ)
    if not low <= value <= high:
        raise SettingsError(f"environment variable {name} must be {low} to {high}, got {value}")
    return value


def _metrics_listen(service: str, environ: Mapping[str, str] | None) -> str:
    """CDP_METRICS_LISTEN, `0` to serve no metrics."""
    default = f"127.0.0.1:{METRICS_PORTS[service]}" if service in METRICS_PORTS else "0"
    if optional("CDP_METRICS_LISTEN", default, environ) == "0":
        return ""
    host, port = listen_address("CDP_METRICS_LISTEN", default, environ)
    return f"{host}:{port}"


def listen_address(name: str, default: str, environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """A host:port setting, as (host, port)."""
    raw = optional(name, default, environ)
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SettingsError(f"environment variable {name} must be host:port, got {raw!r}")
    return host, int(port)
