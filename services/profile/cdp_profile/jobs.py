"""The scoring job: keeps scores relative to the whole base as the base changes.

Every interval (and once at start) it reads every customer in one pass and fits the base-level
models (RFM boundaries, BG/NBD parameters, the co-purchase table), stores them in
`profile.models`, then rescores every live profile and saves and publishes (through the outbox,
in the same transaction) those whose RFM scores, churn label, offer, lifecycle stage or
purchase-frequency flag changed. One replica at a time runs it (an advisory lock).

The round's work runs in a child process started for it (survey.py): the fit, the pass that finds
the profiles whose scores moved, and their rescoring. It takes seconds per 100,000 profiles, and
in the service's process it would take the interpreter from the live consumer and the gRPC calls
for that long. The service stores the models, and publishes the profile_changed events the child
leaves in the outbox as its chunks commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_common import db, eventlog
from cdp_profile import child, scoring, store
from cdp_profile.handlers import ModelsCache

log = structlog.get_logger("cdp.profile.scores")

LOCK = "cdp-profile-scores"
# After a round over no customers: how often the job asks whether the first ones have come.
FIRST_CUSTOMERS_POLL_SECONDS = 10.0
# How often the events of the child's committed chunks are published during a round.
_PUBLISH_EVERY_SECONDS = 0.5


@dataclass(frozen=True)
class Rescored:
    customers: int
    rescored: int


async def rescore(
    engine: AsyncEngine, outbox: db.Outbox, topology: eventlog.Topology, cache: ModelsCache, now: datetime,
    schema: str = "profile",
) -> Rescored | None:
    """One round; None when another replica holds the job. `schema`: the engine's search path."""
    async with engine.connect() as lock:
        if not (await lock.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": LOCK})).scalar():
            return None
        try:
            async with Survey.started(engine.url.render_as_string(hide_password=False), schema) as surveyed:
                models, customers = await surveyed.fit(now)
                async with engine.begin() as conn:
                    await store.save_models(conn, models)
                # The consumer scores with the new models from here on; the second pass finds
                # the profiles it has not touched since.
                cache.put(models)
                moved = await _published_meanwhile(outbox, surveyed.rescore(models, now, topology))
            return Rescored(customers=customers, rescored=moved)
        finally:
            try:
                await lock.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": LOCK})
            except BaseException:
                # A session lock would outlive this round on the pooled connection: drop the connection.
                await lock.invalidate()
                raise


class PassFailed(Exception):
    """A pass over the base failed in the round's child process (the message names the error)."""


async def _published_meanwhile(outbox: db.Outbox, rescoring: Awaitable[int]) -> int:
    """Publishes the events of the chunks the child commits as it goes: a round that moves
    thousands of profiles would otherwise hand segmentation all their profile_changed at once.
    The last flush follows the child's answer, so it also publishes what a failed pass committed."""
    task = asyncio.ensure_future(rescoring)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=_PUBLISH_EVERY_SECONDS)
            await outbox.flush()
        return task.result()
    finally:
        if not task.done():  # cancelled, or a publish failed: the child is killed
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Survey:
    """The round's child process (`python -m cdp_profile.survey`). Started for one round; killed if
    the round is cancelled (the service stops)."""

    def __init__(self, process: child.Child) -> None:
        self._process = process

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, database_url: str, schema: str) -> AsyncIterator[Survey]:
        env = {"CDP_DATABASE_URL": database_url, "CDP_PROFILE_SCHEMA": schema}
        async with child.Child.started("cdp_profile.survey", env) as process:
            yield cls(process)

    async def fit(self, now: datetime) -> tuple[scoring.Models, int]:
        """The models over every customer, and how many customers there were."""
        rows, customers = await self._ask(("fit", now))
        return scoring.Models.from_rows(rows, now), customers

    async def rescore(self, models: scoring.Models, now: datetime, topology: eventlog.Topology) -> int:
        """Rescores the profiles whose stored scores differ from what `models` give them now, and
        leaves their profile_changed events in the outbox; returns how many it found."""
        found: int = await self._ask(("rescore", models.to_rows(), now, topology))
        return found

    async def _ask(self, request: tuple[Any, ...]) -> Any:
        try:
            await self._process.send(request)
            _, value = await self._process.receive()
        except child.ChildFailed as failed:
            raise PassFailed(f"the {request[0]!r} pass failed: {failed}") from None
        return value


async def run_scoring(
    engine: AsyncEngine, outbox: db.Outbox, topology: eventlog.Topology, cache: ModelsCache, interval: float,
    first_customers_poll: float = FIRST_CUSTOMERS_POLL_SECONDS, schema: str = "profile",
) -> None:
    """Rescores now and then every `interval` seconds until cancelled; a failed round is retried.
    After a round over no customers (a fresh installation), the next comes as soon as there are
    some (checked every `first_customers_poll` seconds): the round that gives every profile its
    first base-level scores (an offer for each prospect, RFM for each customer) then runs while
    the base is small, instead of on the whole base an interval later."""
    while True:
        began = time.perf_counter()
        result = None
        try:
            result = await rescore(engine, outbox, topology, cache, eventlog.now(), schema)
            if result is not None:
                log.info("rescored", customers=result.customers, profiles=result.rescored,
                         seconds=round(time.perf_counter() - began, 3))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the next round tries again
            log.warning("scoring_failed", error=repr(error))
        if result is not None and result.customers == 0:
            await _first_customers(engine, interval, first_customers_poll)
        else:
            await asyncio.sleep(interval)


async def _first_customers(engine: AsyncEngine, interval: float, poll: float) -> None:
    """Returns once a live profile has an order, or after `interval` seconds."""
    deadline = time.monotonic() + interval
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(poll, left))
        try:
            async with engine.connect() as conn:
                if await store.has_customers(conn):
                    return
        except Exception as error:  # noqa: BLE001 - the database is down: ask again later
            log.warning("scoring_poll_failed", error=repr(error))
