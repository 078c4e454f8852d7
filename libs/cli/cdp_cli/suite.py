"""Runs the six services as their own processes and stops them in order."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp_cli.infra import InfraError, free_port
from cdp_common.settings import METRICS_PORTS

# (service, module, default port)
SERVICES = (
    ("ingest", "cdp_ingest", 50051),
    ("identity", "cdp_identity", 50052),
    ("profile", "cdp_profile", 50053),
    ("segmentation", "cdp_segmentation", 50054),
    ("activation", "cdp_activation", 50055),
    ("dmp-bridge", "cdp_dmp", 50056),
)


# Listeners besides gRPC: (service, setting, default port, name, path shown).
EXTRA_LISTENERS = (
    ("ingest", "CDP_HTTP_LISTEN", 8088, "http", ""),
    *((name, "CDP_METRICS_LISTEN", port, "metrics", "/metrics") for name, port in METRICS_PORTS.items()),
)


@dataclass
class ServiceProcess:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_file: Path
    extra: dict[str, str] = field(default_factory=dict)
    # How it was started (same ports, same log): a supervisor starts it again with `restart`.
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def healthy(address: str, timeout: float = 1.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its method attributes.
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)  # type: ignore[attr-defined]
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def services(
    data_dir: Path, settings: Mapping[str, str], timeout: float = 60.0, default_ports: bool = True
) -> Iterator[list[ServiceProcess]]:
    """`default_ports=False`: every listener on a free port, none on a default one (for tests, so
    that no other client on the machine, expecting the defaults, talks to these services)."""
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: list[ServiceProcess] = []
    try:
        for name, module, default_port in SERVICES:
            port = default_port if default_ports and _port_free(default_port) else free_port()
            env = {**os.environ, **settings, "CDP_GRPC_LISTEN": f"127.0.0.1:{port}"}
            # Only ingest is stateless and may run several worker processes.
            env["CDP_WORKERS"] = os.environ.get("CDP_INGEST_WORKERS", "1") if name == "ingest" else "1"
            extra = {}
            for service_name, setting, extra_port, label, path in EXTRA_LISTENERS:
                if service_name == name:
                    chosen = extra_port if default_ports and _port_free(extra_port) else free_port()
                    env[setting] = f"127.0.0.1:{chosen}"
                    extra[label] = f"http://127.0.0.1:{chosen}{path}"
            if env["CDP_METRICS_LISTEN"] == f"127.0.0.1:{METRICS_PORTS[name]}":
                # Left as the service's default: should another process take the port before the
                # service binds it, the service runs without metrics (logging so) instead of exiting.
                del env["CDP_METRICS_LISTEN"]
            log_file = logs / f"{name}.log"
            command = [sys.executable, "-m", module]
            process = _spawn(command, env, log_file)
            running.append(ServiceProcess(name, f"127.0.0.1:{port}", process, log_file, extra, command, env))
        deadline = time.monotonic() + timeout
        for service in running:
            while not healthy(service.address):
                if service.process.poll() is not None:
                    raise InfraError(
                        f"service {service.name} exited with code {service.process.returncode}; "
                        f"last lines of {service.log_file}:\n{tail(service.log_file)}"
                    )
                if time.monotonic() > deadline:
                    raise InfraError(f"service {service.name} not healthy within {timeout:.0f}s; see {service.log_file}")
                time.sleep(0.1)
        yield running
    finally:
        stop(running)


def _spawn(command: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    out = open(log_file, "ab")  # noqa: SIM115 - handed to the child
    try:
        # Own session: Ctrl-C reaches only `cdp`, which stops the services before the servers.
        return subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
    finally:
        out.close()


def restart(service: ServiceProcess) -> None:
    """Starts a service whose process has exited again, exactly as it was started (same ports and
    log file); wait for it with `healthy(service.address)`."""
    if service.process.poll() is None:
        raise InfraError(f"service {service.name} is still running (pid {service.process.pid})")
    service.process = _spawn(service.command, service.env, service.log_file)


def stop(running: list[ServiceProcess], timeout: float = 20.0) -> None:
    for service in running:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for service in running:
        try:
            service.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
