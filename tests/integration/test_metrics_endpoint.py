"""The /metrics endpoint's listener: an address asked for must be free; a busy default is skipped."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from cdp_common.metrics import ServiceMetrics
from cdp_common.settings import SettingsError


async def test_a_busy_port_stops_the_service_only_if_it_was_asked_for() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(SettingsError, match=f"CDP_METRICS_LISTEN: cannot listen on {busy}"):
            await ServiceMetrics().serve(busy, required=True)
        assert await ServiceMetrics().serve(busy, required=False) is None

    metrics = ServiceMetrics()
    url = await metrics.serve("127.0.0.1:0")
    try:
        assert url is not None and url.endswith("/metrics")
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 200
            assert "process_resident_memory_bytes" in await response.text()
    finally:
        await metrics.stop()
