"""`cdp replay profile`: the read model rebuilt from the log while the service keeps answering,
with events still arriving, ends exactly where the live one would have."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from cdp.profile.v1 import profile_pb2
from cdp.v1 import event_pb2
from processes import children, running
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


async def rebuild_until_first_step(suite: Any) -> tuple[Any, list[int]]:
    """A rebuild started, and the process that projects it (cdp_profile.replay, a child of the
    service: this process) as it runs when the first progress step arrives."""
    call = suite.profile.Rebuild(profile_pb2.RebuildRequest())
    first = await call.read()
    assert first.phase == "rebuilding"
    return call, children("cdp_profile.replay")


async def gone(pids: list[int]) -> bool:
    for _ in range(100):
        if not any(running(pid) for pid in pids):
            return True
        await asyncio.sleep(0.05)
    return False


async def still_applying(suite: Any, db: Any) -> None:
    """The live read model is the one it was, and the live consumer still applies the log to it."""
    orders = int((await profile(suite, "bob")).order_count)
    await send(suite, order("after-the-rebuild", "bob", 0.1, 10.0, "hats"))
    await suite.settle()
    assert int((await profile(suite, "bob")).order_count) == orders + 1
    assert await db.fetchval("SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'profile_%'") == 0


async def test_a_cancelled_rebuild_ends_its_process_and_leaves_the_live_model(start_suite, db, no_scoring_rounds) -> None:
    async with start_suite(CORE) as suite:
        await send(suite, *STORY)
        await suite.settle()
        before = await everything(suite)
        call, projecting = await rebuild_until_first_step(suite)
        assert len(projecting) == 1, "the rebuild is not projected in a process of its own"
        call.cancel()  # the operator's Ctrl-C: `cdp replay profile` drops the call
        assert await gone(projecting), "the rebuild's process outlived the cancelled rebuild"
        assert await everything(suite) == before
        await still_applying(suite, db)


async def test_a_rebuild_whose_process_dies_fails_with_the_reason_and_leaves_the_live_model(
    start_suite, db, no_scoring_rounds,
) -> None:
    async with start_suite(CORE) as suite:
        await send(suite, *STORY)
        await suite.settle()
        before = await everything(suite)
        call, projecting = await rebuild_until_first_step(suite)
        os.kill(projecting[0], signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            while await call.read() != grpc.aio.EOF:
                pass
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "the rebuild failed: cdp_profile.replay exited with code -9" in (failed.value.details() or "")
        assert await everything(suite) == before
        await still_applying(suite, db)
        # The next rebuild works.
        phases = [step.phase async for step in suite.profile.Rebuild(profile_pb2.RebuildRequest())]
        assert phases[-2:] == ["swapping", "done"] and children("cdp_profile.replay") == []
