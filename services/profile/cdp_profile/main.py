"""Composition root of the profile service."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_common.service import Runtime, ServiceDefinition
from cdp_common.settings import SettingsError, optional
from cdp_profile import handlers, jobs, store
from cdp_profile.reader import Reader
from cdp_profile.rebuild import Rebuilder
from cdp_profile.api import ProfileServicer

SCORES_INTERVAL = "CDP_PROFILE_SCORES_INTERVAL_SECONDS"


def scores_interval(raw: str) -> float:
    """How often the base-level models are refitted and every profile rescored (seconds)."""
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise SettingsError(f"environment variable {SCORES_INTERVAL} must be a number of seconds above 0, got {raw!r}")
    return seconds


async def build(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    interval = scores_interval(optional(SCORES_INTERVAL, "300"))
    cache = handlers.ModelsCache()
    one_by_one, whole_batch, pipeline = handlers.make_handlers(runtime.topology, cache)
    live = runtime.consumer(handlers.SPEC, one_by_one, whole_batch, pipeline)
    schema = runtime.schema or "profile"
    reader = Reader(runtime.settings.database_url, schema)
    await reader.start()
    runtime.on_stop.append(reader.close)
    servicer = ProfileServicer(runtime.engine, reader, Rebuilder(runtime, live, swapped=reader.reset))
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(servicer, server)
    runtime.background.append(asyncio.create_task(
        jobs.run_scoring(runtime.engine, runtime.outbox, runtime.topology, cache, interval, schema=schema),
        name="profile-scores",
    ))
    return [profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name]


DEFINITION = ServiceDefinition(
    name="profile", schema="profile", default_port=50053, migrations=store.MIGRATIONS, build=build
)
