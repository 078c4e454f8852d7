"""Waiting until the pipeline has nothing left to do: every consumer caught up and the log quiet."""

from __future__ import annotations

import asyncio
import time

from nats.js import JetStreamContext

from cdp_common import eventlog


async def log_state(js: JetStreamContext, topology: eventlog.Topology) -> tuple[int, int]:
    """(messages in all streams, messages not yet handled by some consumer)."""
    total, behind = 0, 0
    for area in eventlog.AREAS:
        stream = topology.stream(area)
        info = await js.stream_info(stream)
        total += info.state.messages
        for consumer in await js.consumers_info(stream):
            behind += (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
    return total, behind


async def settle(
    js: JetStreamContext, topology: eventlog.Topology, timeout: float = 60.0, quiet_seconds: float = 1.0
) -> int:
    """Returns the number of messages in the log once nothing has changed for `quiet_seconds`."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int] | None = None
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        state = await log_state(js, topology)
        if state != last or state[1] != 0:
            last, quiet_since = state, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_seconds:
            return state[0]
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the pipeline did not settle within {timeout:.0f}s (last state {last})")


async def subject_count(js: JetStreamContext, stream: str, subject_filter: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())
