"""`cdp replay profile`: the read model rebuilt from the log while the service keeps answering,
with events still arriving, ends exactly where the live one would have."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from cdp.profile.v1 import profile_pb2
from cdp.v1 import event_pb2
from test_profile import CORE, STORY, order, profile, send

pytestmark = pytest.mark.timeout(180)

CDP = str(Path(sys.executable).parent / "cdp")
USERS = ("ada", "bob", "cy", "dee", "eve", "vic")


# Scores read the clock (days since the last order...): a rebuild computes them anew, at its own
# time, and the scoring job keeps them current from there. Everything else must be identical.
SCORED_AT_A_TIME = ("updatedAt", "rfm", "churnRisk", "lifecycle", "nextBestOffer", "purchaseFrequencyFalling")


def comparable(snapshot: event_pb2.ProfileSnapshot) -> dict[str, Any]:
    """A profile as a reader sees it, without what depends on when it was computed."""
    value = json_format.MessageToDict(snapshot)
    for key in SCORED_AT_A_TIME:
        value.pop(key, None)
    return value


async def everything(suite: Any) -> dict[str, Any]:
    views = {user: comparable(await profile(suite, user)) for user in USERS}
    for user in USERS:
        timeline = await suite.profile.GetTimeline(profile_pb2.GetTimelineRequest(
            identifier=event_pb2.Identifier(type="user_id", value=user), page_size=500))
        views[f"{user} timeline"] = [e.event_id for e in timeline.events]
    return views


async def test_rebuild_swaps_in_an_identical_read_model_while_serving(start_suite, db, no_scoring_rounds) -> None:
    async with start_suite(CORE) as suite:
        await send(suite, *STORY)
        await suite.settle()
        before = await everything(suite)

        served, failures = 0, []
        done = asyncio.Event()

        async def keep_reading() -> None:
            nonlocal served
            while not done.is_set():
                try:
                    await profile(suite, "ada")
                    served += 1
                except grpc.aio.AioRpcError as error:
                    failures.append(error.details())
                await asyncio.sleep(0.005)

        async def more_orders() -> None:
            # Events keep arriving while the rebuild runs: the swap must lose none of them.
            for i in range(5):
                await send(suite, order(f"late-{i}", "bob", 0.1, 10.0, "hats"))
                await asyncio.sleep(0.05)

        reader = asyncio.create_task(keep_reading())
        writer = asyncio.create_task(more_orders())
        phases = [step.phase async for step in suite.profile.Rebuild(profile_pb2.RebuildRequest())]
        await writer
        done.set()
        await reader

        assert phases[0] == "rebuilding" and phases[-2:] == ["swapping", "done"]
        assert failures == [] and served > 0
        await suite.settle()
        after = await everything(suite)
        bob_before, bob_after = before.pop("bob"), after.pop("bob")
        assert after == {k: v for k, v in before.items() if k != "bob timeline"} | {"bob timeline": after["bob timeline"]}
        assert int(bob_after["orderCount"]) == int(bob_before["orderCount"]) + 5
        assert sorted(after["bob timeline"]) == sorted([*before["bob timeline"], *(f"late-{i}" for i in range(5))])
        assert await db.fetchval("SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'profile_%'") == 0
        # No event twice in the timeline, whatever was applied around the swap.
        assert await db.fetchval("SELECT count(*) - count(DISTINCT event_id) FROM profile.events") == 0


async def test_cdp_replay_profile_reports_progress_and_the_result(start_suite, no_scoring_rounds) -> None:
    async with start_suite(CORE) as suite:
        await send(suite, *STORY)
        await suite.settle()
        ada = comparable(await profile(suite, "ada"))
        result = await asyncio.to_thread(
            subprocess.run, [CDP, "replay", "profile",
                             "--profile", suite.addresses["profile"]],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        assert f"{len(STORY):,} events" in result.stderr and "now serving from it" in result.stderr
        assert comparable(await profile(suite, "ada")) == ada

        unreachable = subprocess.run(
            [CDP, "replay", "profile", "--profile", "127.0.0.1:9"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr
