"""GetProfile's read path: one prepared statement on a plain asyncpg pool.

Through SQLAlchemy a read took a pool ping, BEGIN, a look-up, the row, its identifiers and a
ROLLBACK: about 2 ms of this process's CPU, so one process could not serve 1,000 reads a second.
Here the merge chain, the row and its identifiers come back in one prepared statement.

The pool does not reset a connection it takes back: by default asyncpg sends `RESET ALL`,
`UNLISTEN *`, ... after every read, a second round trip. A read here changes no session state
(asyncpg still rolls back a transaction left open), and PostgreSQL's CPU per GetProfile fell from
about 204 to 178 µs (bench/profile.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships neither stubs nor py.typed

from cdp_common import convert, db
from cdp_profile import store
from cdp_profile.core import ProfileState

# How long a stopping service waits for reads in progress to finish.
CLOSE_SECONDS = 5.0
_FROM_ID = "$1::text"
_FROM_IDENTIFIER = "(SELECT profile_id FROM identifiers WHERE id_type = $1 AND id_value = $2)"


def _statement(start: str) -> str:
    """The live profile a merge chain starting at `start` ends at, with its identifiers."""
    return (
        "WITH RECURSIVE chain(id, next, depth) AS ("
        f" SELECT profile_id, merged_into, 0 FROM profiles WHERE profile_id = {start}"
        " UNION ALL SELECT p.profile_id, p.merged_into, c.depth + 1 FROM profiles p JOIN chain c ON p.profile_id = c.next"
        " WHERE c.depth < 100) "
        f"SELECT {store.COLUMNS}, ARRAY(SELECT i.id_type || '=' || i.id_value FROM identifiers i "
        "WHERE i.profile_id = profiles.profile_id) AS id_keys "
        "FROM profiles WHERE profile_id = (SELECT id FROM chain WHERE next IS NULL LIMIT 1)"
    )


_BY_ID, _BY_IDENTIFIER = _statement(_FROM_ID), _statement(_FROM_IDENTIFIER)


async def _codecs(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=convert.to_json, decoder=convert.from_json, schema="pg_catalog")


async def _unchanged(conn: asyncpg.Connection) -> None:
    """A read leaves nothing to reset."""


class Reader:
    def __init__(self, database_url: str, schema: str, size: int = 4) -> None:
        self._url, self._schema, self._size = db.plain_url(database_url), schema, size
        self._pool: Any = None

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._url, min_size=1, max_size=self._size, init=_codecs, reset=_unchanged,
            server_settings=db.session_settings(self._schema, "cdp-profile-reader"),
        )

    async def by_id(self, profile_id: str) -> ProfileState | None:
        return self._state(await self._pool.fetchrow(_BY_ID, profile_id))

    async def by_identifier(self, id_type: str, value: str) -> ProfileState | None:
        return self._state(await self._pool.fetchrow(_BY_IDENTIFIER, id_type, value))

    async def reset(self) -> None:
        """After the read model was swapped: prepared statements point at the old tables."""
        await self._pool.expire_connections()

    async def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Closes the pool. asyncpg waits for every read to hand its connection back; one stuck in
        its statement (on a server that went away, or behind a lock) would hold a stopping service
        forever, so after `timeout` the pool's connections are cut off (asyncpg terminates the pool
        when its close is cancelled)."""
        if self._pool is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool.close(), timeout)

    @staticmethod
    def _state(row: Any) -> ProfileState | None:
        if row is None:
            return None
        ids = frozenset(tuple(k.split("=", 1)) for k in row["id_keys"])
        return store.state_of(row, ids)
