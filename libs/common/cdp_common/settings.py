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


_NAMESPACE = re.compile(r"^[a-z][a-z0-9]{0,30}$")


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
            stream_replicas=_replicas(optional_int("CDP_STREAM_REPLICAS", 1, environ)),
        )


def _replicas(value: int) -> int:
    if not 1 <= value <= 5:
        raise SettingsError(f"environment variable CDP_STREAM_REPLICAS must be 1 to 5, got {value}")
    return value


def listen_address(name: str, default: str, environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """A host:port setting, as (host, port)."""
    raw = optional(name, default, environ)
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SettingsError(f"environment variable {name} must be host:port, got {raw!r}")
    return host, int(port)
