"""cdp_profile.store against PostgreSQL: what one batch's write keeps and replaces."""

from __future__ import annotations

from dataclasses import replace

from cdp_common import db
from cdp_profile import store
from cdp_profile.core import ProfileState, Score, Scores


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
