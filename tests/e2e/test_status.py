"""`cdp status` as an operator runs it, against the running suite, before and after a service stops."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cdp.ingest.v1 import ingest_pb2
from cdp.v1 import event_pb2
from cdp_activation.main import DEFINITION as ACTIVATION
from cdp_cli.options import address_variable
from cdp_common import eventlog
from cdp_dmp.main import DEFINITION as DMP
from cdp_identity.main import DEFINITION as IDENTITY
from cdp_ingest.main import DEFINITION as INGEST
from cdp_profile.main import DEFINITION as PROFILE
from cdp_segmentation.main import DEFINITION as SEGMENTATION

pytestmark = pytest.mark.timeout(120)

CDP = str(Path(sys.executable).parent / "cdp")
SERVICES = ["ingest", "identity", "profile", "segmentation", "activation", "dmp-bridge"]


def visit(event_id: str, user_id: str) -> ingest_pb2.TrackRequest:
    return ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(user_id=user_id), event="Product Viewed")


async def status(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Runs `cdp status ARGS` as a process (without blocking the services in this event loop)."""
    process = await asyncio.create_subprocess_exec(
        CDP, "status", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_status_shows_health_lag_and_dead_letters_and_fails_when_a_service_stops(
    start_suite: Any, launch_services: Any, nats_url: str, database_url: str, namespace: str
) -> None:
    async with start_suite((INGEST, IDENTITY, PROFILE, ACTIVATION, DMP)) as suite:
        async with launch_services((SEGMENTATION,), nats_url=nats_url, database_url=database_url,
                                   namespace=namespace, log_level="warning") as segmentation:
            addresses = {**suite.addresses, **segmentation.addresses}
            env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
            env.update({address_variable(name): address for name, address in addresses.items()},
                       CDP_NATS_URL=nats_url, CDP_NAMESPACE=namespace, COLUMNS="200")
            for i in range(4):
                await suite.ingest.Track(visit(f"s-{i}", f"u-{i}"))
            # One the pipeline gives up on: only junk identifiers.
            poison = eventlog.new_event("track", event_id="poison-1", source="test")
            poison.identifiers.user_id = "null"
            await suite.js.publish(suite.topology.collected("track"), eventlog.encode(poison))
            await suite.settle()

            code, out, err = await status(env, "--json")
            assert code == 0, err
            report = json.loads(out)
            assert report["serving"] is True and report["namespace"] == namespace
            services = {s["name"]: s for s in report["services"]}
            assert list(services) == SERVICES
            assert {name: s["health"] for name, s in services.items()} == dict.fromkeys(SERVICES, "SERVING")
            assert {name: s["address"] for name, s in services.items()} == addresses
            consumers = {c["name"]: c for s in report["services"] for c in s["consumers"]}
            assert set(consumers) == {"identity-resolve", "profile-project", "segmentation-evaluate",
                                      "activation-trigger", "dmp-identities", "dmp-audiences"}
            assert [c["name"] for c in services["dmp-bridge"]["consumers"]] == ["dmp-audiences", "dmp-identities"]
            assert all(c["lag"] == 0 for c in consumers.values())
            assert consumers["identity-resolve"]["dead_letters"] == 1
            assert sum(c["dead_letters"] for c in consumers.values()) == 1

        # Segmentation has stopped; what profile publishes now waits for it.
        for i in range(3):
            await suite.ingest.Track(visit(f"t-{i}", f"v-{i}"))
        loop = asyncio.get_running_loop()
        deadline, last, quiet_since = loop.time() + 30, None, loop.time()
        while True:
            info = await suite.js.consumer_info(suite.topology.stream("profile"), "segmentation-evaluate")
            if info.num_pending != last:
                last, quiet_since = info.num_pending, loop.time()
            elif last >= 3 and loop.time() - quiet_since > 0.5:
                break
            assert loop.time() < deadline, "profile never published the changes"
            await asyncio.sleep(0.1)

        code, out, err = await status(env)
        assert code == 1
        rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in SERVICES}
        assert set(rows) == set(SERVICES)
        assert "unreachable" in rows["segmentation"] and "segmentation-evaluate" in rows["segmentation"]
        assert rows["segmentation"].split()[-2] == str(info.num_pending + info.num_ack_pending)
        assert all(rows[name].split()[1] == "SERVING" for name in SERVICES if name != "segmentation")
        assert rows["identity"].split()[-2:] == ["0", "1"]  # no lag, one dead letter
        assert "5 of 6 services serving; not serving: segmentation (unreachable" in err

        code, out, _ = await status(env, "--json")
        assert code == 1
        report = json.loads(out)
        assert report["serving"] is False
        down = {s["name"]: s for s in report["services"]}["segmentation"]
        assert down["health"] == "unreachable"
        assert down["consumers"][0]["lag"] == info.num_pending + info.num_ack_pending


async def test_without_nats_status_still_shows_health(start_suite: Any) -> None:
    async with start_suite((INGEST,)) as suite:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
        env.update(CDP_INGEST_ADDRESS=suite.addresses["ingest"])
        code, out, err = await status(env, "--json", "--identity", "127.0.0.1:1")
        report = json.loads(out)
        health = {s["name"]: s["health"] for s in report["services"]}
        assert health["ingest"] == "SERVING" and health["identity"] == "unreachable"
        assert code == 1
        assert report["log_error"].startswith("no NATS server")
