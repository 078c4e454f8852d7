"""A service past its concurrency limit refuses further calls clearly (RESOURCE_EXHAUSTED, which
clients retry with backoff) and serves the ones it took; a burst never comes back as a bare CANCELLED."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_common.settings import Settings, SettingsError
from cdp_ingest.main import DEFINITION as INGEST
from cdp_profile.main import DEFINITION as PROFILE

pytestmark = pytest.mark.timeout(120)


async def test_calls_past_the_limit_are_refused_and_the_others_served(
    launch_services: Any, nats_url: str, database_url: str, namespace: str, db: Any
) -> None:
    async with launch_services((PROFILE,), nats_url=nats_url, database_url=database_url, namespace=namespace,
                               log_level="warning", grpc_max_concurrent_rpcs=2) as launched:
        stub = profile_pb2_grpc.ProfileServiceStub(launched.channels["profile"])
        # GetProfile waits on the lock in the middle of its read: two calls stay in progress.
        await db.execute("BEGIN")
        await db.execute("LOCK TABLE profile.profiles IN ACCESS EXCLUSIVE MODE")
        held = [asyncio.ensure_future(stub.GetProfile(profile_pb2.GetProfileRequest(profile_id=f"p-{i}"), timeout=30))
                for i in range(2)]
        await asyncio.sleep(0.5)
        assert not any(call.done() for call in held)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetProfile(profile_pb2.GetProfileRequest(profile_id="p-3"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in (refused.value.details() or "")

        await db.execute("ROLLBACK")
        for call in held:
            with pytest.raises(grpc.aio.AioRpcError) as answered:
                await call
            assert answered.value.code() == grpc.StatusCode.NOT_FOUND  # served: there is no such profile
        # Below the limit again, calls are served.
        health = health_pb2_grpc.HealthStub(launched.channels["profile"])
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
            health_pb2.HealthCheckResponse.SERVING


async def test_a_burst_is_served_or_refused_never_cancelled(
    launch_services: Any, nats_url: str, database_url: str, namespace: str
) -> None:
    """3,000 calls at once on one connection: gRPC's own queue for calls not taken up yet (1,000 by
    default) used to cancel the rest without a word."""
    async with launch_services((INGEST,), nats_url=nats_url, database_url=database_url, namespace=namespace,
                               log_level="warning", grpc_max_concurrent_rpcs=500) as launched:
        health = health_pb2_grpc.HealthStub(launched.channels["ingest"])

        async def check() -> str:
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=60)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

        outcomes = collections.Counter(await asyncio.gather(*(check() for _ in range(3000))))
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["OK"] >= 500


@pytest.mark.parametrize(("raw", "error"), [("0", "must be 1 to 100000, got 0"), ("many", "must be an integer")])
def test_a_bad_limit_names_the_variable(raw: str, error: str) -> None:
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_GRPC_MAX_CONCURRENT_RPCS": raw}
    with pytest.raises(SettingsError, match=f"CDP_GRPC_MAX_CONCURRENT_RPCS {error}"):
        Settings.from_env("profile", 50053, environ)
    assert Settings.from_env("profile", 50053, {"CDP_NATS_URL": "nats://x:4222"}).grpc_max_concurrent_rpcs == 1000
