"""A rebuild's bulk projection (cdp_profile.bulk) against the live one, on PostgreSQL: the same log
gives the same read model, with merges (a chain of them, a replayed one), a split, redelivered
and unusable events in one big chunk, and with a chunk PostgreSQL refuses (it goes through the
live handlers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from google.protobuf import struct_pb2
from sqlalchemy import text

from cdp.v1 import event_pb2
from cdp_common import db, eventlog
from cdp_common.consumer import PermanentError, Planned, StalePlan, infrastructure_failure
from cdp_profile import core, handlers, store
from cdp_profile.bulk import Bulk

TOPOLOGY = eventlog.Topology("bulk")
START = datetime(2026, 3, 1, tzinfo=UTC)
# Scores read the clock; everything else must be identical.
SCORED = ["updated_at", "scores", "lifecycle_stage", "frequency_falling", "rfm_recency", "rfm_frequency",
          "rfm_monetary", "rfm_cell", "churn_risk", "churn_label", "next_best_offer"]


def resolved(n: int, profile_id: str, type_: str = "track", name: str = "", *, ids: dict[str, str],
             properties: dict[str, Any] | None = None, traits: dict[str, Any] | None = None,
             consent: dict[str, bool] | None = None, event_id: str = "") -> event_pb2.Event:
    event = event_pb2.Event(id=event_id or f"e{n}", type=type_, name=name, source="test", profile_id=profile_id)
    event.occurred_at.FromDatetime(START + timedelta(hours=n))
    for key, value in ids.items():
        setattr(event.identifiers, key, value)
    event.properties.CopyFrom(_struct(properties or {}))
    event.traits.CopyFrom(_struct(traits or {}))
    event.consent.update(consent or {})
    return event


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def merged(n: int, survivor: str, *others: str) -> event_pb2.Event:
    event = event_pb2.Event(id=f"m{n}", type="profiles_merged", source="identity", profile_id=survivor)
    event.profiles_merged.survivor_id = survivor
    event.profiles_merged.merged_ids.extend(others)
    return event


def split(n: int, source: str, new: str, ids: dict[str, str]) -> event_pb2.Event:
    event = event_pb2.Event(id=f"s{n}", type="profile_split", source="identity", profile_id=source)
    event.profile_split.source_profile_id = source
    event.profile_split.new_profile_id = new
    for key, value in ids.items():
        event.profile_split.identifiers.add(type=key, value=value)
    return event


def order(n: int, profile_id: str, amount: float, ids: dict[str, str], category: str = "hats") -> event_pb2.Event:
    return resolved(n, profile_id, name="Order Completed", ids=ids, properties={
        "revenue": amount, "products": [{"category": category, "quantity": 2}]})


ADA, VISIT, BOB, CY, PHONE = (
    {"user_id": "ada"}, {"anonymous_id": "v1", "device_id": "d1"}, {"user_id": "bob"}, {"anonymous_id": "c1"},
    {"anonymous_id": "v1"},
)
LOG = [
    resolved(1, "p-ada", "identify", ids={**ADA, "email": "ada@example.com"},
             traits={"name": "Ada", "plan": "free"}, consent={"email.marketing": True}),
    order(2, "p-ada", 30.0, ADA),
    resolved(3, "p-v", "page", "Home", ids=VISIT, properties={"path": "/"}),
    resolved(4, "p-v", name="Product Viewed", ids=VISIT, properties={"product_id": "p-1"}),
    resolved(5, "p-bob", "identify", ids={**BOB, "email": "bob@example.com"}, traits={"name": "Bob"}),
    merged(1, "p-ada", "p-v"),
    order(6, "p-v", 20.0, VISIT, "shoes"),  # addressed to the merged-away profile: lands on Ada's
    resolved(7, "p-ada", name="Ticket Opened", ids={**ADA, "device_id": "d1"}, properties={"ticket_id": "t-1"}),
    resolved(8, "p-cy", "page", "Sale", ids=CY),
    order(9, "p-cy", 5.5, CY),
    merged(2, "p-bob", "p-cy"),
    merged(3, "p-ada", "p-bob", "p-ada"),  # a chain: Cy's history goes to Ada's through Bob's
    resolved(10, "p-cy", name="Email Opened", ids=CY),
    split(1, "p-ada", "p-v2", VISIT),  # the visitor's device was not Ada's after all
    resolved(11, "p-v2", name="Product Viewed", ids=PHONE, properties={"product_id": "p-2"}),
    order(12, "p-ada", 12.25, ADA),
    resolved(2, "p-ada", name="Order Completed", ids=ADA, event_id="e2",
             properties={"revenue": 30.0}),  # redelivered
    resolved(13, "", name="Lost", ids=ADA),  # no profile: dead-lettered live, skipped here
    merged(1, "p-ada", "p-v"),  # a replayed merge changes nothing
    resolved(0, "p-ada", "identify", ids=ADA, traits={"plan": "pro", "city": "Berlin"},
             consent={"email.marketing": False}),  # older than e1: only the new trait sticks
    resolved(14, "p-eve", "identify", ids={"user_id": "eve"}, traits={"name": "Eve"}),
    merged(4, "p-eve", "p-ghost"),  # a profile the projection never saw
]


async def live(engine: Any, events: Sequence[event_pb2.Event], batch: int, pipelined: bool = False) -> int:
    """The live consumer's way: batches through the batch handler, one by one where one fails.
    `pipelined`: each batch is first planned by the pipeline, before the one ahead of it is written
    (so it reads that one's changes from the pipeline's overlay); one it declines goes the plain way."""
    one_by_one, whole_batch, pipeline = handlers.make_handlers(TOPOLOGY)
    failed = 0
    ahead: Planned | None = None

    async def write_ahead() -> None:
        nonlocal ahead
        if ahead is not None:
            async with engine.begin() as conn:
                await ahead.write(conn)
            pipeline.committed(ahead)
            ahead = None

    for start in range(0, len(events), batch):
        part = events[start:start + batch]
        planned = None
        if pipelined:
            try:
                async with engine.connect() as conn:
                    planned = await pipeline.plan(conn, part)
            except PermanentError:
                planned = None  # the consumer takes such a batch the plain way
        await write_ahead()
        if planned is not None:
            ahead = planned
            continue
        async with engine.begin() as conn:
            try:
                async with conn.begin_nested():
                    await whole_batch(conn, part)
            except Exception as error:
                assert not infrastructure_failure(error)
                for event in part:
                    try:
                        async with conn.begin_nested():
                            await one_by_one(conn, event)
                    except Exception:
                        failed += 1
    await write_ahead()
    return failed


async def read_model(url: str, schema: str) -> dict[str, Any]:
    conn = await asyncpg.connect(db.plain_url(url))
    try:
        profiles = {r[0]: r[1] for r in await conn.fetch(
            f"SELECT profile_id, (to_jsonb(p) - CAST($1 AS text[]))::text FROM {schema}.profiles p", SCORED)}
        identifiers = {(r[0], r[1]): r[2] for r in await conn.fetch(
            f"SELECT id_type, id_value, profile_id FROM {schema}.identifiers")}
        timeline = {r[0]: r[1] for r in await conn.fetch(
            f"SELECT event_id, to_jsonb(e)::text FROM {schema}.events e")}
        indexes = sorted(r[0] for r in await conn.fetch(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1", schema))
    finally:
        await conn.close()
    return {"profiles": profiles, "identifiers": identifiers, "timeline": timeline,
            "indexes": [i.replace(f" {schema}.", " ") for i in indexes]}


@pytest.mark.parametrize(("refused", "pipelined"), [(False, False), (True, False), (False, True)],
                         ids=["one chunk", "a refused chunk", "the live one pipelined"])
async def test_the_bulk_projection_builds_what_the_live_one_does(
    database_url: str, refused: bool, pipelined: bool
) -> None:
    live_engine = db.create_engine(database_url, pool_size=1, search_path="profile")
    bulk_engine = db.create_engine(database_url, pool_size=1, search_path="profile_next")
    try:
        await db.migrate(live_engine, "profile", store.MIGRATIONS)
        await db.migrate(bulk_engine, "profile_next", store.MIGRATIONS)
        dead_lettered = await live(live_engine, LOG, batch=4, pipelined=pipelined)

        bulk = Bulk(bulk_engine, TOPOLOGY, handlers.SPEC.durable)
        await bulk.prepare()
        if refused:
            # The second chunk starts with the first one's last event again, which is on the
            # timeline already: COPY refuses the chunk, and the live handlers apply it.
            skipped = await bulk.apply(LOG[:9], 9) + await bulk.apply(LOG[8:], len(LOG))
        else:
            skipped = await bulk.apply(LOG, len(LOG))
        await bulk.settle()

        want, got = await read_model(database_url, "profile"), await read_model(database_url, "profile_next")
        assert skipped == dead_lettered == 1
        for part in ("profiles", "identifiers", "timeline", "indexes"):
            assert got[part] == want[part], part
        # What the story is about, to be sure it happened.
        assert {p: '"merged_into": null' not in row for p, row in want["profiles"].items()} == {
            "p-ada": False, "p-v": True, "p-bob": True, "p-cy": True, "p-v2": False, "p-eve": False, "p-ghost": True}
        assert want["identifiers"][("anonymous_id", "v1")] == "p-v2"
        assert want["identifiers"][("anonymous_id", "c1")] == "p-ada"
    finally:
        await live_engine.dispose()
        await bulk_engine.dispose()


async def plain_and_pipelined(database_url: str, log: Sequence[event_pb2.Event]) -> dict[str, Any]:
    """The read model the live consumer builds from `log` in batches of 3 the plain way, after
    checking that the pipelined way builds the same."""
    models = {}
    for schema, pipelined in (("profile", False), ("profile_next", True)):
        engine = db.create_engine(database_url, pool_size=1, search_path=schema)
        try:
            await db.migrate(engine, schema, store.MIGRATIONS)
            assert await live(engine, log, batch=3, pipelined=pipelined) == 0
        finally:
            await engine.dispose()
        models[schema] = await read_model(database_url, schema)
    want, got = models["profile"], models["profile_next"]
    for part in ("profiles", "identifiers", "timeline"):
        assert got[part] == want[part], part
    return want


async def test_the_pipelined_live_projection_builds_what_the_plain_one_does(database_url: str) -> None:
    """Each batch planned before the one ahead of it is written: it must see that one's profiles
    (orders counted on top, traits by event time, identifiers) and its timeline (an event
    delivered again in the next batch is not counted twice)."""
    log = [
        order(1, "p-ada", 10.0, ADA), resolved(2, "p-ada", "identify", ids=ADA, traits={"plan": "pro"}),
        order(3, "p-bob", 5.0, BOB),
        order(4, "p-ada", 20.0, ADA), resolved(2, "p-ada", "identify", ids=ADA, traits={"plan": "pro"}),
        resolved(5, "p-ada", "identify", ids={**ADA, "email": "ada@example.com"}, traits={"plan": "max"}),
        order(6, "p-ada", 30.0, ADA, category="shoes"), order(4, "p-ada", 20.0, ADA),
        resolved(0, "p-ada", "identify", ids=ADA, traits={"plan": "free"}),  # older: "max" stays
    ]
    want = await plain_and_pipelined(database_url, log)
    ada = want["profiles"]["p-ada"]
    assert '"order_count": 3' in ada and '"plan": "max"' in ada and len(want["timeline"]) == 7


async def test_the_pipelined_projection_follows_merges_planned_but_not_written(database_url: str) -> None:
    """Merges are walked in the pipeline too: an event for a profile merged away in the batch ahead
    (planned, not written yet) lands on the survivor, through a chain of merges across batches."""
    log = [
        order(1, "p-ada", 10.0, ADA), resolved(2, "p-v", "page", "Home", ids=VISIT), merged(1, "p-ada", "p-v"),
        order(3, "p-v", 20.0, VISIT), resolved(4, "p-bob", "identify", ids=BOB, traits={"name": "Bob"}),
        merged(2, "p-bob", "p-cy"),
        order(5, "p-cy", 5.0, CY), merged(3, "p-ada", "p-bob"), resolved(6, "p-v", "page", "Sale", ids=VISIT),
        order(7, "p-cy", 7.0, CY), merged(1, "p-ada", "p-v"), order(3, "p-v", 20.0, VISIT),
    ]
    want = await plain_and_pipelined(database_url, log)
    assert '"order_count": 4' in want["profiles"]["p-ada"]
    assert {row for row in want["timeline"].values() if '"p-ada"' not in row} == set()
    assert want["identifiers"][("anonymous_id", "c1")] == "p-ada"


async def test_a_plan_whose_profiles_were_rescored_meanwhile_is_not_written(database_url: str) -> None:
    """The scoring job may rescore a profile between a batch's plan and its write: the plan's
    snapshot would carry the old scores, so the write refuses (the consumer then applies the batch
    the plain way, reading under lock)."""
    engine = db.create_engine(database_url, pool_size=1, search_path="profile")
    try:
        await db.migrate(engine, "profile", store.MIGRATIONS)
        assert await live(engine, [order(1, "p-ada", 10.0, ADA), order(2, "p-bob", 5.0, BOB)], batch=2) == 0
        _, _, pipeline = handlers.make_handlers(TOPOLOGY)
        async with engine.connect() as conn:
            planned = await pipeline.plan(conn, [order(3, "p-ada", 20.0, ADA), order(4, "p-bob", 7.0, BOB)])
        assert planned is not None
        async with engine.begin() as conn:  # the scoring job moves one of them to another lifecycle stage
            bob = await store.load(conn, "p-bob")
            assert bob is not None and bob.scores is not None
            stage = "active" if bob.scores.lifecycle.label != "active" else "at_risk"
            moved = replace(bob.scores, lifecycle=replace(bob.scores.lifecycle, label=stage))
            await store.save_scores(conn, [core.with_scores(bob, moved)])
        with pytest.raises(StalePlan, match="rescored 1 of the batch's profiles"):
            async with engine.begin() as conn:
                await planned.write(conn)
        async with engine.connect() as conn:
            counts = dict((await conn.execute(text("SELECT profile_id, order_count FROM profiles"))).all())
        assert counts == {"p-ada": 1, "p-bob": 1}  # nothing of the refused plan was written
    finally:
        await engine.dispose()
