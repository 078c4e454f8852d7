"""Ingest when NATS is down: UNAVAILABLE, never a silent drop; a retry with the same id is stored once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import nats
import pytest

from cdp.ingest.v1 import ingest_pb2
from cdp.v1 import event_pb2
from cdp_cli import infra
from cdp_common import eventlog
from cdp_ingest.main import DEFINITION as INGEST

pytestmark = pytest.mark.timeout(90)


async def test_ingest_answers_unavailable_and_a_retry_is_stored_once(start_suite, tmp_path: Path, namespace: str) -> None:
    server = infra.start_nats(tmp_path / "nats")
    request = ingest_pb2.TrackRequest(
        event_id="retry-me", identifiers=event_pb2.Identifiers(user_id="u1"), event="Product Viewed"
    )
    try:
        async with start_suite((INGEST,), url=server.url) as suite:
            server.stop()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await suite.ingest.Track(request)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "retry with the same event_id" in caught.value.details()

            server = infra.start_nats(tmp_path / "nats", port=server.port)
            for _ in range(100):
                try:
                    reply = await suite.ingest.Track(request)
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.2)
            again = await suite.ingest.Track(request)
            assert again.duplicate and again.stream_sequence == reply.stream_sequence
            nc = await nats.connect(server.url)
            try:
                info = await nc.jetstream().stream_info(eventlog.Topology(namespace).stream("collected"))
                assert info.state.messages == 1
            finally:
                await nc.close()
    finally:
        server.stop()
