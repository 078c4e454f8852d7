"""The services' collector clock (cdp_common.service.collect_on_a_clock): reference cycles such as
the one grpc.aio leaves behind every call are freed within a tick or two, not once 50,000 objects
have piled up (a 20-44 ms stop of the service); and never while a rebuild has paused the collector."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from cdp_common import service


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycles(count: int) -> list[weakref.ref[_Node]]:
    """`count` two-object cycles, unreachable once this returns; weak references to one side of each."""
    refs = []
    for _ in range(count):
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        refs.append(weakref.ref(a))
    return refs


@pytest.fixture
def service_thresholds() -> Iterator[None]:
    """The collector as a service sets it (the allocation thresholds alone would not collect here)."""
    was, enabled = gc.get_threshold(), gc.isenabled()
    gc.collect()
    gc.set_threshold(*service.GC_THRESHOLDS)
    gc.enable()
    try:
        yield
    finally:
        gc.set_threshold(*was)
        if not enabled:
            gc.disable()


async def _ticks(n: int) -> None:
    clock = asyncio.create_task(service.collect_on_a_clock())
    try:
        await asyncio.sleep(n * service.YOUNG_EVERY_SECONDS + 0.05)
    finally:
        clock.cancel()
        with pytest.raises(asyncio.CancelledError):
            await clock


@pytest.mark.usefixtures("service_thresholds")
async def test_cycles_are_freed_within_a_few_ticks() -> None:
    refs = _cycles(1000)
    assert gc.get_count()[0] < service.GC_THRESHOLDS[0]  # left alone, they would stay
    await _ticks(3)
    assert sum(ref() is not None for ref in refs) == 0


@pytest.mark.usefixtures("service_thresholds")
async def test_a_paused_collector_stays_paused() -> None:
    refs = _cycles(1000)
    gc.disable()
    try:
        await _ticks(3)
        assert sum(ref() is not None for ref in refs) == 1000
    finally:
        gc.enable()
    await _ticks(3)
    assert sum(ref() is not None for ref in refs) == 0
