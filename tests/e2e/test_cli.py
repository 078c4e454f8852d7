"""The `cdp` command as a newcomer runs it: real processes, real servers from the wheels."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.v1 import event_pb2
from cdp_cli.suite import healthy

pytestmark = pytest.mark.timeout(180)

CDP = str(Path(sys.executable).parent / "cdp")


def _env() -> dict[str, str]:
    # The command starts its own servers, as on a fresh machine.
    return {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}


def test_a_service_without_its_settings_names_what_is_missing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cdp_profile"], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "CDP_NATS_URL is required" in result.stderr


def test_demo_reports_every_stage() -> None:
    result = subprocess.run([CDP, "demo"], env=_env(), capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "18 events accepted" in out
    assert "exported audience 'high-value': 2 SHA-256 hashed emails" in out
    assert "imported 3 conversions: 3 appended to the log, 2 matched known profiles" in out
    assert "21 collected events" in out
    assert "7 profiles from" in out and "2 merges" in out
    assert "ada.lovelace@example.com: 2 orders, revenue 369.00" in out
    assert "high-value=3, newsletter=3, repeat-buyers=5" in out
    assert "thank-repeat-buyers: 5 emails sent" in out


def _start_up(data_dir: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    process = subprocess.Popen(
        [CDP, "up", "--data-dir", str(data_dir)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, stdin=subprocess.DEVNULL,
    )
    addresses: dict[str, str] = {}
    assert process.stdout is not None
    for line in process.stdout:
        found = re.match(r"\s+(\S+)\s+grpc (\S+)(?:\s+http (\S+))?", line)
        if found:
            addresses[found.group(1)] = found.group(2)
            if found.group(3):
                addresses["http"] = found.group(3)
            metrics = re.search(r"\smetrics (\S+)", line)
            if metrics:
                addresses[f"{found.group(1)}.metrics"] = metrics.group(1)
        if line.startswith("Press Ctrl-C"):
            return process, addresses
    process.wait(10)
    raise AssertionError(f"cdp up exited with {process.returncode}: {process.stderr.read() if process.stderr else ''}")


def _stop(process: subprocess.Popen[str], sig: signal.Signals) -> tuple[str, str]:
    """Stops `cdp up`; what it printed to stdout and to stderr."""
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0
    return out, err


def _profile(address: str, email: str) -> profile_pb2.ProfileSnapshot | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return profile_pb2_grpc.ProfileServiceStub(channel).GetProfile(
                profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="email", value=email)), timeout=5
            )
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return None


def test_up_serves_stops_on_ctrl_c_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    process, addresses = _start_up(tmp_path)
    try:
        services = {"ingest", "identity", "profile", "segmentation", "activation", "dmp-bridge"}
        assert set(addresses) == {*services, "http", *(f"{name}.metrics" for name in services)}
        # The Segment-compatible HTTP collector is up too.
        request = urllib.request.Request(
            f"{addresses['http']}/v1/identify",
            data=json.dumps({"userId": "u-http", "traits": {"email": "http@example.com"}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["success"] is True
        with grpc.insecure_channel(addresses["ingest"]) as channel:
            ingest_pb2_grpc.IngestServiceStub(channel).Identify(
                ingest_pb2.IdentifyRequest(
                    event_id="keep-me", identifiers=event_pb2.Identifiers(user_id="u-keep", email="keep@example.com")
                ),
                timeout=10,
            )
        # Ingest's Prometheus endpoint, as printed, counts its calls (that one at least: a suite started
        # elsewhere on this machine at the same moment can end up on the same default ports).
        with urllib.request.urlopen(addresses["ingest.metrics"], timeout=10) as response:
            scraped = text_string_to_metric_families(response.read().decode())
        counted = [s.value for family in scraped for s in family.samples if s.name == "grpc_server_handled_total"
                   and s.labels.get("grpc_method") == "Identify" and s.labels["grpc_code"] == "OK"]
        assert len(counted) == 1 and counted[0] >= 1
        deadline = time.monotonic() + 30
        while _profile(addresses["profile"], "keep@example.com") is None or _profile(
            addresses["profile"], "http@example.com"
        ) is None:
            assert time.monotonic() < deadline, "the profile never appeared"
            time.sleep(0.2)
        # Rebuilding profile's read model while the suite runs: the service stays up and serves
        # the rebuilt one (`cdp up` exits if any service does).
        replay = subprocess.run([CDP, "replay", "profile", "--profile", addresses["profile"]], env=_env(),
                                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert replay.returncode == 0, replay.stderr
        assert "now serving from it" in replay.stderr
        time.sleep(2)
        assert _profile(addresses["profile"], "keep@example.com") is not None
    finally:
        out, err = _stop(process, signal.SIGINT)
    assert "stopped." in out
    assert "exited" not in err, "a service exited (after the rebuild?)"
    # Every service shut down gracefully (SIGTERM from `cdp`), not killed.
    for name in services:
        lines = (tmp_path / "logs" / f"{name}.log").read_text().splitlines()
        assert json.loads(lines[-1])["event"] == "service_stopped", lines[-3:]

    process, addresses = _start_up(tmp_path)
    try:
        kept = _profile(addresses["profile"], "keep@example.com")
        assert kept is not None and ("user_id", "u-keep") in {(i.type, i.value) for i in kept.identifiers}
    finally:
        _stop(process, signal.SIGTERM)


def test_up_restarts_a_service_that_dies(tmp_path: Path) -> None:
    """kill -9 of a service under `cdp up`: it is started again on the same address, and serves.
    Meanwhile `cdp status`, run where the suite keeps its data, finds it without flags."""
    process, addresses = _start_up(tmp_path)
    try:
        shown = subprocess.run([CDP, "status", "--json"], env={**_env(), "CDP_DATA_DIR": str(tmp_path)},
                               capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert {s["name"]: s["address"] for s in report["services"]} == {
            name: address for name, address in addresses.items() if "." not in name and name != "http"
        }
        assert {c["name"] for s in report["services"] for c in s["consumers"]} >= {"identity-resolve", "profile-project"}
        [victim] = [c for c in psutil.Process(process.pid).children(recursive=True)
                    if "cdp_segmentation" in " ".join(c.cmdline())]
        victim.kill()
        victim.wait(10)
        deadline = time.monotonic() + 60
        while not healthy(addresses["segmentation"]):
            assert time.monotonic() < deadline, "segmentation was not started again"
            time.sleep(0.2)
        [again] = [c for c in psutil.Process(process.pid).children(recursive=True)
                   if "cdp_segmentation" in " ".join(c.cmdline())]
        assert again.pid != victim.pid
    finally:
        out, err = _stop(process, signal.SIGTERM)
    assert "stopped." in out
    assert "service segmentation exited with code -9; restarting it" in err
    assert not (tmp_path / "endpoints.json").exists()


def test_a_stateless_service_runs_worker_processes_and_stops_them(tmp_path: Path) -> None:
    from cdp_cli import infra
    from cdp_cli.suite import healthy

    server = infra.start_nats(tmp_path / "nats")
    port, http_port = infra.free_port(), infra.free_port()
    env = {**_env(), "CDP_NATS_URL": server.url, "CDP_GRPC_LISTEN": f"127.0.0.1:{port}",
           "CDP_HTTP_LISTEN": f"127.0.0.1:{http_port}", "CDP_WORKERS": "2"}
    process = subprocess.Popen([sys.executable, "-m", "cdp_ingest"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not healthy(f"127.0.0.1:{port}"):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        workers = psutil.Process(process.pid).children()
        assert len(workers) == 1

        def listening(proc: psutil.Process) -> set[int]:
            return {c.laddr.port for c in proc.net_connections() if c.status == psutil.CONN_LISTEN}

        # Both processes share the gRPC and the HTTP port.
        while not all({port, http_port} <= listening(p) for p in (psutil.Process(process.pid), workers[0])):
            assert time.monotonic() < deadline, "the worker processes never both listened"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stderr is not None
        process.stderr.close()
        server.stop()


def test_a_service_with_a_read_model_refuses_several_workers() -> None:
    env = {**_env(), "CDP_NATS_URL": "nats://127.0.0.1:1", "CDP_DATABASE_URL": "postgresql://x@/y", "CDP_WORKERS": "2"}
    result = subprocess.run([sys.executable, "-m", "cdp_profile"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "CDP_WORKERS" in result.stderr
