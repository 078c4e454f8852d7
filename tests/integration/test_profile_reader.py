"""cdp_profile.reader against PostgreSQL: GetProfile's connections under concurrency, cancellation
and a swapped read model."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import text

from cdp_common import db
from cdp_profile import store
from cdp_profile.core import ProfileState
from cdp_profile.reader import Reader

pytestmark = pytest.mark.timeout(60)


async def _schema_with(database_url: str, schema: str, name: str) -> None:
    """`schema` made by the profile migrations, holding one profile `p-ada` named `name`."""
    engine = db.create_engine(database_url, pool_size=1, search_path=schema)
    try:
        await db.migrate(engine, schema, store.MIGRATIONS)
        ada = ProfileState("p-ada", traits={"name": name}, identifiers=frozenset({("email", "ada@example.com")}))
        async with engine.begin() as conn:
            await store.save_many(conn, [ada], {})
    finally:
        await engine.dispose()


async def test_more_concurrent_reads_than_connections_all_answer(database_url: str) -> None:
    await _schema_with(database_url, "profile", "Ada")
    reader = Reader(database_url, "profile", size=2)
    await reader.start()
    try:
        found = await asyncio.gather(*(
            reader.by_id("p-ada") if i % 2 else reader.by_identifier("email", "ada@example.com") for i in range(20)
        ))
        assert {state.traits["name"] for state in found if state is not None} == {"Ada"}
        assert None not in found
        assert await reader.by_id("p-nobody") is None
    finally:
        await reader.close()


async def test_reads_cancelled_mid_statement_leave_the_reader_serving(database_url: str, db: asyncpg.Connection) -> None:
    await _schema_with(database_url, "profile", "Ada")
    reader = Reader(database_url, "profile", size=2)
    await reader.start()
    try:
        # A lock holds every read in the middle of its statement (and more reads wait for a connection).
        await db.execute("BEGIN")
        await db.execute("LOCK TABLE profile.profiles IN ACCESS EXCLUSIVE MODE")
        stuck = [asyncio.create_task(reader.by_id("p-ada")) for _ in range(5)]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in stuck)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        await db.execute("ROLLBACK")
        state = await asyncio.wait_for(reader.by_id("p-ada"), 10)
        assert state is not None and state.traits["name"] == "Ada"
    finally:
        await reader.close()


async def test_after_a_swap_and_reset_reads_answer_from_the_new_read_model(database_url: str) -> None:
    await _schema_with(database_url, "profile", "Ada")
    await _schema_with(database_url, "profile_next", "Ada Lovelace")
    reader = Reader(database_url, "profile", size=2)
    await reader.start()
    try:
        assert (await reader.by_id("p-ada")).traits["name"] == "Ada"  # type: ignore[union-attr]
        # Lent out across the swap: it is closed when it comes back, not reused.
        in_flight = asyncio.create_task(reader.by_id("p-ada"))
        engine = db.create_engine(database_url, pool_size=1)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("ALTER SCHEMA profile RENAME TO profile_old"))
                await conn.execute(text("ALTER SCHEMA profile_next RENAME TO profile"))
        finally:
            await engine.dispose()
        await reader.reset()
        await in_flight
        names = {s.traits["name"] for s in await asyncio.gather(*(reader.by_id("p-ada") for _ in range(6))) if s}
        assert names == {"Ada Lovelace"}
        by_email = await reader.by_identifier("email", "ada@example.com")
        assert by_email is not None and by_email.traits["name"] == "Ada Lovelace"
    finally:
        await reader.close()


async def test_closing_does_not_wait_for_a_stuck_read(database_url: str, db: asyncpg.Connection) -> None:
    """A stopping service closes the reader whatever its reads are doing: a read stuck in its
    statement (here behind a lock; in production, on a server that went away) is cut off."""
    await _schema_with(database_url, "profile", "Ada")
    reader = Reader(database_url, "profile", size=2)
    await reader.start()
    await db.execute("BEGIN")
    await db.execute("LOCK TABLE profile.profiles IN ACCESS EXCLUSIVE MODE")
    try:
        stuck = asyncio.create_task(reader.by_id("p-ada"))
        await asyncio.sleep(0.3)
        assert not stuck.done()
        began = asyncio.get_running_loop().time()
        await reader.close(timeout=1.0)
        assert asyncio.get_running_loop().time() - began < 3.0
        with pytest.raises((asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError)):
            await asyncio.wait_for(stuck, 5.0)
    finally:
        await db.execute("ROLLBACK")
