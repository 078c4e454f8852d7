"""The identity graph in PostgreSQL (schema `identity`), a projection of the log."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_identity.core import Decision, Key, ProfileFacts

MIGRATIONS = (
    (
        """CREATE TABLE identity.profiles (
            profile_id text PRIMARY KEY,
            created_at timestamptz NOT NULL,
            user_id text,
            merged_into text)""",
        """CREATE TABLE identity.identifiers (
            id_type text NOT NULL,
            id_value text NOT NULL,
            profile_id text NOT NULL REFERENCES identity.profiles (profile_id),
            first_seen timestamptz NOT NULL,
            last_seen timestamptz NOT NULL,
            PRIMARY KEY (id_type, id_value))""",
        "CREATE INDEX identifiers_profile ON identity.identifiers (profile_id)",
        """CREATE TABLE identity.merges (
            merged_id text PRIMARY KEY,
            survivor_id text NOT NULL,
            event_id text NOT NULL,
            reason text NOT NULL,
            merged_at timestamptz NOT NULL)""",
    ),
)


async def owners(conn: AsyncConnection, keys: Sequence[Key]) -> dict[Key, str]:
    rows = await conn.execute(
        text(
            "SELECT i.id_type, i.id_value, i.profile_id FROM identity.identifiers i "
            "JOIN unnest(CAST(:types AS text[]), CAST(:vals AS text[])) AS k(t, v) "
            "ON i.id_type = k.t AND i.id_value = k.v FOR UPDATE OF i"
        ),
        {"types": [k[0] for k in keys], "vals": [k[1] for k in keys]},
    )
    return {(r.id_type, r.id_value): r.profile_id for r in rows}


async def facts(conn: AsyncConnection, profile_ids: Sequence[str]) -> dict[str, ProfileFacts]:
    rows = await conn.execute(
        text(
            "SELECT profile_id, created_at, user_id FROM identity.profiles "
            "WHERE profile_id = ANY(:ids) FOR UPDATE"
        ),
        {"ids": list(profile_ids)},
    )
    return {r.profile_id: ProfileFacts(r.profile_id, r.created_at, r.user_id) for r in rows}


async def apply(conn: AsyncConnection, decision: Decision, event_id: str, at: datetime) -> None:
    pid = decision.profile_id
    if decision.created:
        await conn.execute(
            text("INSERT INTO identity.profiles (profile_id, created_at) VALUES (:p, :at)"),
            {"p": pid, "at": at},
        )
    if decision.merged:
        await conn.execute(
            text("UPDATE identity.identifiers SET profile_id = :p WHERE profile_id = ANY(:m)"),
            {"p": pid, "m": list(decision.merged)},
        )
        await conn.execute(
            text(
                "UPDATE identity.profiles s SET user_id = COALESCE(s.user_id, "
                "(SELECT max(user_id) FROM identity.profiles WHERE profile_id = ANY(:m))) "
                "WHERE s.profile_id = :p"
            ),
            {"p": pid, "m": list(decision.merged)},
        )
        await conn.execute(
            text("UPDATE identity.profiles SET merged_into = :p, user_id = NULL WHERE profile_id = ANY(:m)"),
            {"p": pid, "m": list(decision.merged)},
        )
        await conn.execute(
            text(
                "INSERT INTO identity.merges (merged_id, survivor_id, event_id, reason, merged_at) "
                "SELECT m, :p, :e, :r, :at FROM unnest(CAST(:m AS text[])) AS m "
                "ON CONFLICT (merged_id) DO NOTHING"
            ),
            {"p": pid, "m": list(decision.merged), "e": event_id, "r": decision.reason, "at": at},
        )
    if decision.link:
        await conn.execute(
            text(
                "INSERT INTO identity.identifiers (id_type, id_value, profile_id, first_seen, last_seen) "
                "SELECT t, v, :p, :at, :at FROM unnest(CAST(:types AS text[]), CAST(:vals AS text[])) AS k(t, v) "
                "ON CONFLICT (id_type, id_value) DO UPDATE SET profile_id = EXCLUDED.profile_id, "
                "last_seen = GREATEST(identity.identifiers.last_seen, EXCLUDED.last_seen)"
            ),
            {"p": pid, "at": at, "types": [k[0] for k in decision.link], "vals": [k[1] for k in decision.link]},
        )
        user_ids = [v for t, v in decision.link if t == "user_id"]
        if user_ids:
            await conn.execute(
                text("UPDATE identity.profiles SET user_id = :u WHERE profile_id = :p"),
                {"u": user_ids[0], "p": pid},
            )


async def touch(conn: AsyncConnection, keys: Sequence[Key], at: datetime) -> None:
    await conn.execute(
        text(
            "UPDATE identity.identifiers i SET last_seen = GREATEST(i.last_seen, :at) "
            "FROM unnest(CAST(:types AS text[]), CAST(:vals AS text[])) AS k(t, v) "
            "WHERE i.id_type = k.t AND i.id_value = k.v"
        ),
        {"at": at, "types": [k[0] for k in keys], "vals": [k[1] for k in keys]},
    )


async def resolve(conn: AsyncConnection, key: Key) -> str | None:
    row = (
        await conn.execute(
            text("SELECT profile_id FROM identity.identifiers WHERE id_type = :t AND id_value = :v"),
            {"t": key[0], "v": key[1]},
        )
    ).first()
    return None if row is None else str(row.profile_id)


async def stats(conn: AsyncConnection) -> tuple[int, int, int]:
    row = (
        await conn.execute(
            text(
                "SELECT (SELECT count(*) FROM identity.profiles WHERE merged_into IS NULL) AS profiles, "
                "(SELECT count(*) FROM identity.identifiers) AS identifiers, "
                "(SELECT count(*) FROM identity.merges) AS merges"
            )
        )
    ).one()
    return int(row.profiles), int(row.identifiers), int(row.merges)
