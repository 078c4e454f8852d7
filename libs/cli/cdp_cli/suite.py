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

# (service, module, default port)
SERVICES = (
    ("ingest", "cdp_ingest", 50051),
    ("identity", "cdp_identity", 50052),
    ("profile", "cdp_profile", 50053),
    ("segmentation", "cdp_segmentation", 50054),
    ("activation", "cdp_activation", 50055),
    ("dmp-bridge", "cdp_dmp", 50056),
)


# Listeners besides gRPC: (service, setting, default port, name).
EXTRA_LISTENERS = (("ingest", "CDP_HTTP_LISTEN", 8088, "http"),)


@dataclass
class ServiceProcess:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_file: Path
    extra: dict[str, str] = field(default_factory=dict)


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
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def services(data_dir: Path, settings: Mapping[str, str], timeout: float = 60.0) -> Iterator[list[ServiceProcess]]:
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: list[ServiceProcess] = []
    try:
        for name, module, default_port in SERVICES:
            port = default_port if _port_free(default_port) else free_port()
            env = {**os.environ, **settings, "CDP_GRPC_LISTEN": f"127.0.0.1:{port}"}
            # Only ingest is stateless and may run several worker processes.
            env["CDP_WORKERS"] = os.environ.get("CDP_INGEST_WORKERS", "1") if name == "ingest" else "1"
            extra = {}
            for service_name, setting, extra_port, label in EXTRA_LISTENERS:
                if service_name == name:
                    chosen = extra_port if _port_free(extra_port) else free_port()
                    env[setting] = f"127.0.0.1:{chosen}"
                    extra[label] = f"http://127.0.0.1:{chosen}"
            log_file = logs / f"{name}.log"
            out = open(log_file, "ab")  # noqa: SIM115 - handed to the child
            # Own session: Ctrl-C reaches only `cdp`, which stops the services before the servers.
            process = subprocess.Popen(
                [sys.executable, "-m", module], env=env, stdout=out, stderr=out, start_new_session=True
            )
            out.close()
            running.append(ServiceProcess(name, f"127.0.0.1:{port}", process, log_file, extra))
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
