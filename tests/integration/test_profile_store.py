"""cdp_profile.store against PostgreSQL: what one batch's write keeps and replaces."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client as NATS
from sqlalchemy import text

from cdp_common import db, eventlog
from cdp_profile import jobs, scoring, store, survey
from cdp_profile.core import ProfileState, Score, Scores
from cdp_profile.handlers import ModelsCache


def scores(label: str, churn: float) -> Scores:
    return Scores(lifecycle=Score(label, 1.0, (f"because {label}",)), churn=Score("high", churn, ("quiet",)))


async def test_a_batch_write_keeps_the_scores_it_did_not_recompute(database_url: str) -> None:
    """The scoring job moved the stored scores; a later event that changed no score input writes
    the profile's facts and must not put the older scores back, while a rescored profile's are replaced."""
    engine = db.create_engine(database_url, pool_size=1, search_path="profile")
    try:
        await db.migrate(engine, "profile", store.MIGRATIONS)
        ada = ProfileState("p-ada", traits={"name": "Ada"}, scores=scores("new", 0.1))
        bob = ProfileState("p-bob", traits={"name": "Bob"}, scores=scores("new", 0.2))
        async with engine.begin() as conn:
            await store.save_many(conn, [ada, bob], {})
            # The scoring job, in its own transaction.
            await store.save_scores(conn, [replace(ada, scores=scores("active", 0.7)),
                                           replace(bob, scores=scores("active", 0.8))])
        later = [replace(ada, traits={"name": "Ada L."}), replace(bob, traits={"name": "Bob B."}, scores=scores("lapsed", 0.9))]
        async with engine.begin() as conn:
            await store.save_many(conn, later, {"p-ada": ada, "p-bob": bob}, scores_of=["p-bob"])
        async with engine.connect() as conn:
            loaded = (await store.load_many(conn, ["p-ada", "p-bob"], lock=False)).states
        assert loaded["p-ada"].traits == {"name": "Ada L."}
        assert loaded["p-ada"].scores == scores("active", 0.7)
        assert loaded["p-bob"].traits == {"name": "Bob B."}
        assert loaded["p-bob"].scores == scores("lapsed", 0.9)
        async with engine.connect() as conn:
            columns = await conn.exec_driver_sql(
                "SELECT profile_id, lifecycle_stage, churn_risk FROM profile.profiles ORDER BY profile_id")
            assert [tuple(r) for r in columns] == [("p-ada", "active", 0.7), ("p-bob", "lapsed", 0.9)]
    finally:
        await engine.dispose()


async def test_the_scoring_job_leaves_a_profile_the_consumer_holds_to_its_next_round(
    database_url: str, nc: NATS, namespace: str
) -> None:
    """Waiting for the consumer's row lock could deadlock (a plain batch locks its profiles in
    several statements); the job skips the held profile, scores the others, and that one later."""
    engine = db.create_engine(database_url, search_path="profile")
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    publisher = eventlog.Publisher(nc)
    outbox = db.Outbox(engine, publisher, "profile")
    day = datetime(2026, 6, 1, tzinfo=UTC)
    try:
        await db.migrate(engine, "profile", store.MIGRATIONS)
        customers = [
            ProfileState(f"p-{name}", order_count=2, revenue_cents=5000, first_order_at=day,
                         last_order_at=day + timedelta(days=20), first_seen_at=day)
            for name in ("ada", "bob", "cyd")
        ]
        async with engine.begin() as conn:
            await store.save_many(conn, customers, {})
        async with engine.connect() as holder:
            await holder.execute(text("SELECT 1 FROM profiles WHERE profile_id = 'p-bob' FOR UPDATE"))
            first = await asyncio.wait_for(
                jobs.rescore(engine, outbox, topology, ModelsCache(), day + timedelta(days=60)), 10)
            await holder.rollback()
        assert first is not None and first.rescored == 3  # the scan found all three unscored
        async with engine.connect() as conn:
            scored = {p: s.scores is not None for p, s in (await store.load_many(conn, ["p-ada", "p-bob", "p-cyd"],
                                                                                  lock=False)).states.items()}
        assert scored == {"p-ada": True, "p-bob": False, "p-cyd": True}
        again = await jobs.rescore(engine, outbox, topology, ModelsCache(), day + timedelta(days=60))
        assert again is not None and again.rescored == 1
        async with engine.connect() as conn:
            bob = (await store.load_many(conn, ["p-bob"], lock=False)).states["p-bob"]
        assert bob.scores is not None and bob.scores.lifecycle.label
    finally:
        await publisher.close()
        await engine.dispose()


async def test_the_scoring_job_writes_no_profile_the_consumer_wrote_after_the_job_read_it(
    database_url: str, namespace: str
) -> None:
    """A round reads and rescores its chunk without locks (so the consumer never waits for the
    round's work), then writes only what nobody wrote since: a profile the consumer changed in
    between keeps the consumer's scores, gets no event from the round, and is left to the next."""
    engine = db.create_engine(database_url, search_path="profile")
    topology = eventlog.Topology(namespace)
    day = datetime(2026, 6, 1, tzinfo=UTC)
    now = day + timedelta(days=60)
    try:
        await db.migrate(engine, "profile", store.MIGRATIONS)
        customers = {
            name: ProfileState(f"p-{name}", order_count=2, revenue_cents=5000, first_order_at=day,
                               last_order_at=day + timedelta(days=20), first_seen_at=day)
            for name in ("ada", "bob", "cyd")
        }
        async with engine.begin() as conn:
            await store.save_many(conn, list(customers.values()), {})
        chunk = await survey.rescore_chunk(engine, ["p-ada", "p-bob", "p-cyd"], scoring.Models(), now, topology)
        assert len(chunk.states) == 3
        # Meanwhile the consumer applies Bob's third order, with the scores it computes.
        bob = replace(customers["bob"], order_count=3, revenue_cents=9000, last_order_at=now, scores=scores("active", 0.1))
        async with engine.begin() as conn:
            await store.save_many(conn, [bob], {"p-bob": customers["bob"]})
        assert await survey.write_chunk(engine, chunk) == 2
        async with engine.connect() as conn:
            stored = (await store.load_many(conn, ["p-ada", "p-bob", "p-cyd"], lock=False)).states
            outbox = [r.subject for r in await conn.execute(text("SELECT subject FROM profile.outbox"))]
        assert stored["p-bob"].order_count == 3 and stored["p-bob"].scores == scores("active", 0.1)
        by_id = {s.profile_id: s for s in chunk.states}
        assert stored["p-ada"].scores == by_id["p-ada"].scores and stored["p-cyd"].scores == by_id["p-cyd"].scores
        assert sorted(outbox) == sorted(topology.keyed("profile", p, "changed") for p in ("p-ada", "p-cyd"))
    finally:
        await engine.dispose()


async def test_after_a_round_over_no_customers_the_first_ones_are_scored_without_waiting_an_interval(
    database_url: str, nc: NATS, namespace: str
) -> None:
    """A fresh installation: the first round finds no customers; the first order brings the next
    round at once (not an hour later), and every profile gets its base-level scores then."""
    engine = db.create_engine(database_url, search_path="profile")
    topology = eventlog.Topology(namespace)
    await eventlog.provision_streams(nc.jetstream(), topology)
    publisher = eventlog.Publisher(nc)
    cache = ModelsCache()
    day = datetime(2026, 6, 1, tzinfo=UTC)
    job = None
    try:
        await db.migrate(engine, "profile", store.MIGRATIONS)
        async with engine.begin() as conn:
            await store.save_many(conn, [ProfileState("p-visitor", first_seen_at=day)], {})
        job = asyncio.create_task(jobs.run_scoring(engine, db.Outbox(engine, publisher, "profile"), topology, cache,
                                                   interval=3600, first_customers_poll=0.1))
        async with engine.connect() as conn:
            # The round stores the models, then finds and rescores the profiles they move.
            for _ in range(100):
                visitor = (await store.load_many(conn, ["p-visitor"], lock=False)).states["p-visitor"]
                if visitor.scores is not None:
                    break
                await asyncio.sleep(0.1)
            first = await store.models_version(conn)
        assert first is not None and visitor.scores is not None and visitor.scores.offer is None

        async with engine.begin() as conn:
            await store.save_many(conn, [ProfileState("p-buyer", order_count=1, revenue_cents=4000, first_order_at=day,
                                                      last_order_at=day, first_seen_at=day, categories={"shoes": 1})], {})
        async with engine.connect() as conn:
            for _ in range(100):
                if await store.models_version(conn) != first:
                    break
                await asyncio.sleep(0.1)
            assert await store.models_version(conn) != first
            for _ in range(100):
                visitor = (await store.load_many(conn, ["p-visitor"], lock=False)).states["p-visitor"]
                if visitor.scores is not None and visitor.scores.offer is not None:
                    break
                await asyncio.sleep(0.1)
        assert visitor.scores is not None and visitor.scores.offer is not None
        assert visitor.scores.offer.label == "shoes"
    finally:
        if job is not None:
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
        await publisher.close()
        await engine.dispose()


async def test_statistics_analyse_only_the_named_columns_once_the_table_has_doubled(database_url: str) -> None:
    """The planner's statistics of a growing table: the lookup columns are analysed once it has
    grown enough, not the jsonb ones (which made profile's batch wait seconds inside its transaction)."""
    engine = db.create_engine(database_url, pool_size=1, search_path="public")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE grown (id int PRIMARY KEY, profile_id text, doc jsonb)"))
            await conn.execute(text("INSERT INTO grown SELECT i, 'p-' || (i % 50), jsonb_build_object('i', i) "
                                    "FROM generate_series(1, 3000) AS i"))
            statistics = db.Statistics(["grown (profile_id)"], first=2000)
            await statistics.grew(conn, 1500)
            assert statistics.rows == 0  # not yet: fewer than `first` new rows
            await statistics.grew(conn, 1500)
            analysed = {r[0] for r in await conn.execute(
                text("SELECT attname FROM pg_stats WHERE schemaname = 'public' AND tablename = 'grown'"))}
        assert analysed == {"profile_id"}
        assert statistics.rows == 3000 and statistics.added == 0
    finally:
        await engine.dispose()
