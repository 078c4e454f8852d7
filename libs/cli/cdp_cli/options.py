"""Where a command finds the suite, the same way for every command: each service's gRPC address
(`--<service>`, `$CDP_<SERVICE>_ADDRESS`, what a running `cdp up` wrote, or its default port on
this machine) and the log (`--nats` / `$CDP_NATS_URL` / what a running `cdp up` wrote,
`--namespace` / `$CDP_NAMESPACE`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from cdp_cli.suite import SERVICES
from cdp_common import eventlog
from cdp_common.settings import Settings, SettingsError

DEFAULT_PORTS = {name: port for name, _, port in SERVICES}
# Written by `cdp up` into its data dir while it runs: where its NATS server and services listen.
ENDPOINTS_FILE = "endpoints.json"


def default_data_dir() -> Path:
    return Path(os.environ.get("CDP_DATA_DIR", ".cdp")).resolve()


def running_suite(data_dir: Path | None = None) -> dict[str, Any]:
    """What the `cdp up` running on `data_dir` (default $CDP_DATA_DIR or ./.cdp) wrote; {} if
    none runs there (no file, or the process that wrote it is gone)."""
    try:
        written = json.loads(((data_dir or default_data_dir()) / ENDPOINTS_FILE).read_text())
        os.kill(int(written["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return written if isinstance(written, dict) else {}


def write_endpoints(data_dir: Path, nats_url: str, services: dict[str, str]) -> Path:
    path = data_dir / ENDPOINTS_FILE
    path.write_text(json.dumps({"pid": os.getpid(), "nats": nats_url, "services": services}, indent=2) + "\n")
    return path


def remove_endpoints(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / ENDPOINTS_FILE).unlink()


def address_variable(service: str) -> str:
    """`CDP_DMP_BRIDGE_ADDRESS` for dmp-bridge."""
    return f"CDP_{service.upper().replace('-', '_')}_ADDRESS"


def default_address(service: str) -> str:
    return f"127.0.0.1:{DEFAULT_PORTS[service]}"


def add_address_option(parser: argparse.ArgumentParser, service: str) -> None:
    """`--<service> ADDRESS`, read back with `service_address`."""
    parser.add_argument(f"--{service}", metavar="ADDRESS", default=None,
                        help=f"{service}'s gRPC address (default: ${address_variable(service)} or "
                             f"{default_address(service)})")


def service_address(service: str, given: str | None) -> str:
    return (
        given
        or os.environ.get(address_variable(service), "").strip()
        or str(running_suite().get("services", {}).get(service) or "")
        or default_address(service)
    )


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """`--nats URL` and `--namespace NAME`, read back with `log_settings`."""
    parser.add_argument("--nats", metavar="URL", default=None,
                        help="NATS server (default: $CDP_NATS_URL, or the one of a running `cdp up`)")
    parser.add_argument("--namespace", default=None, help="stream namespace (default: $CDP_NAMESPACE or cdp)")


NO_NATS = (
    "no NATS server: pass --nats URL or set CDP_NATS_URL (`cdp up` prints it), or run the command "
    "where `cdp up` keeps its data (./.cdp, or CDP_DATA_DIR)"
)


def nats_url(args: argparse.Namespace) -> str | None:
    return (
        str(args.nats or "").strip()
        or os.environ.get("CDP_NATS_URL", "").strip()
        or str(running_suite().get("nats") or "").strip()
        or None
    )


def topology(args: argparse.Namespace) -> eventlog.Topology:
    """The namespace's streams and subjects; SettingsError if the services would refuse the name."""
    namespace = args.namespace or os.environ.get("CDP_NAMESPACE", "").strip() or "cdp"
    # The services' own check of the namespace, so both refuse the same values.
    try:
        settings = Settings.from_env("cdp", 0, {"CDP_NATS_URL": "-", "CDP_NAMESPACE": namespace})
    except SettingsError as error:
        raise SettingsError(
            str(error).replace("environment variable CDP_NAMESPACE", "--namespace / CDP_NAMESPACE")
        ) from None
    return eventlog.Topology(settings.namespace)


def log_settings(args: argparse.Namespace) -> tuple[str, eventlog.Topology]:
    """The NATS URL and the namespace's streams; SettingsError names the flag or variable to set."""
    url = nats_url(args)
    if url is None:
        raise SettingsError(NO_NATS)
    return url, topology(args)


async def connect(url: str, name: str) -> NATS:
    """A connection for one command: gives up at once rather than reconnecting."""

    async def quiet(*_: Any) -> None:
        return None

    # nats-py retries the first connect forever with max_reconnect_attempts=0: 1 gives up after two tries.
    return await nats.connect(
        url, name=name, connect_timeout=3, allow_reconnect=False, max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        error_cb=quiet, disconnected_cb=quiet, closed_cb=quiet,
    )
