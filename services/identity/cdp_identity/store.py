"""The identity graph in PostgreSQL (schema `identity`), a projection of the log."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_common import convert
from cdp_identity.core import Key, Known

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
    (
        "ALTER TABLE identity.profiles ADD COLUMN merge_count int NOT NULL DEFAULT 0",
        "CREATE INDEX merges_survivor ON identity.merges (survivor_id)",
        """CREATE TABLE identity.splits (
            new_profile_id text PRIMARY KEY,
            source_profile_id text NOT NULL,
            identifiers jsonb NOT NULL,
            event_id text NOT NULL,
            reason text NOT NULL,
            split_at timestamptz NOT NULL)""",
        "CREATE INDEX splits_source ON identity.splits (source_profile_id)",
    ),
    (
        # Most writes move an identifier's last_seen only: with room left on its page, PostgreSQL
        # updates the row in place without touching the indexes (a HOT update).
        "ALTER TABLE identity.identifiers SET (fillfactor = 80)",
    ),
)


# The graph is written by one process at a time (the consumer's advisory lock, and its checkpoint
# row locked first in every transaction), so its reads take no row locks: a lock on every row read
# costs a write and a WAL record each.


async def owners(conn: AsyncConnection, keys: Sequence[Key]) -> dict[Key, str]:
    rows = await conn.execute(
        text(
            "SELECT i.id_type, i.id_value, i.profile_id FROM identity.identifiers i "
            "JOIN json_to_recordset(CAST(:keys AS json)) AS k(t text, v text) "
            "ON i.id_type = k.t AND i.id_value = k.v"
        ),
        {"keys": convert.to_json([{"t": t, "v": v} for t, v in keys])},
    )
    # Rows unpacked as tuples: cheaper than attribute access, a few rows per event.
    return {(t, v): p for t, v, p in cast(Iterable[tuple[str, str, str]], rows)}


async def known(conn: AsyncConnection, profile_ids: Sequence[str]) -> dict[str, Known]:
    """The profiles with every identifier they hold."""
    if not profile_ids:
        return {}
    rows = await conn.execute(
        text(
            "SELECT profile_id, created_at, merge_count FROM identity.profiles "
            "WHERE profile_id = ANY(:ids)"
        ),
        {"ids": list(profile_ids)},
    )
    profiles = {p: (created, merges) for p, created, merges in cast(Iterable[tuple[str, datetime, int]], rows)}
    held: dict[str, dict[Key, datetime]] = {p: {} for p in profiles}
    rows = await conn.execute(
        text("SELECT id_type, id_value, profile_id, last_seen FROM identity.identifiers WHERE profile_id = ANY(:ids)"),
        {"ids": list(profiles)},
    )
    for id_type, id_value, profile_id, last_seen in cast(Iterable[tuple[str, str, str, datetime]], rows):
        held[profile_id][(id_type, id_value)] = last_seen
    return {
        p: Known(p, created, merges, held[p])
        for p, (created, merges) in profiles.items()
    }


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


async def live_profiles(conn: AsyncConnection, profile_ids: Sequence[str]) -> set[str]:
    rows = await conn.execute(
        text("SELECT profile_id FROM identity.profiles WHERE profile_id = ANY(:ids) AND merged_into IS NULL"),
        {"ids": list(profile_ids)},
    )
    return set(rows.scalars())


async def current(conn: AsyncConnection, profile_id: str) -> str | None:
    """Follows merges to the live profile."""
    row = (
        await conn.execute(
            text(
                "WITH RECURSIVE chain(id, next, depth) AS ("
                " SELECT profile_id, merged_into, 0 FROM identity.profiles WHERE profile_id = :p"
                " UNION ALL SELECT p.profile_id, p.merged_into, c.depth + 1 FROM identity.profiles p"
                " JOIN chain c ON p.profile_id = c.next WHERE c.depth < 1000)"
                " SELECT id FROM chain WHERE next IS NULL"
            ),
            {"p": profile_id},
        )
    ).first()
    return None if row is None else str(row.id)


async def split(
    conn: AsyncConnection, *, source: str, new: str, keys: Sequence[Key], event_id: str, reason: str, at: datetime
) -> None:
    await conn.execute(
        text("INSERT INTO identity.profiles (profile_id, created_at) VALUES (:p, :at)"), {"p": new, "at": at}
    )
    await conn.execute(
        text(
            "UPDATE identity.identifiers i SET profile_id = :new "
            "FROM unnest(CAST(:types AS text[]), CAST(:vals AS text[])) AS k(t, v) "
            "WHERE i.id_type = k.t AND i.id_value = k.v AND i.profile_id = :source"
        ),
        {"new": new, "source": source, "types": [k[0] for k in keys], "vals": [k[1] for k in keys]},
    )
    for profile in (source, new):
        await conn.execute(
            text(
                "UPDATE identity.profiles SET user_id = (SELECT min(id_value) FROM identity.identifiers "
                "WHERE profile_id = :p AND id_type = 'user_id') WHERE profile_id = :p"
            ),
            {"p": profile},
        )
    await conn.execute(
        text(
            "INSERT INTO identity.splits (new_profile_id, source_profile_id, identifiers, event_id, reason, split_at) "
            "VALUES (:new, :source, CAST(:ids AS jsonb), :e, :r, :at)"
        ),
        {"new": new, "source": source, "ids": json.dumps([list(k) for k in keys]), "e": event_id, "r": reason,
         "at": at},
    )


@dataclass(frozen=True)
class GraphRow:
    profile_id: str
    created_at: datetime
    identifiers: list[tuple[str, str, datetime, datetime]]
    merges: list[tuple[str, str, str, str, datetime]]
    splits: list[tuple[str, str, list[list[str]], str, str, datetime]]


async def graph(conn: AsyncConnection, profile_id: str) -> GraphRow | None:
    row = (
        await conn.execute(
            text("SELECT profile_id, created_at FROM identity.profiles WHERE profile_id = :p"), {"p": profile_id}
        )
    ).first()
    if row is None:
        return None
    identifiers = [
        (r.id_type, r.id_value, r.first_seen, r.last_seen)
        for r in await conn.execute(
            text(
                "SELECT id_type, id_value, first_seen, last_seen FROM identity.identifiers WHERE profile_id = :p "
                "ORDER BY id_type, id_value"
            ),
            {"p": profile_id},
        )
    ]
    merges = [
        (r.merged_id, r.survivor_id, r.event_id, r.reason, r.merged_at)
        for r in await conn.execute(
            text(
                "WITH RECURSIVE tree(id, depth) AS (SELECT CAST(:p AS text), 0 UNION ALL "
                " SELECT m.merged_id, t.depth + 1 FROM identity.merges m JOIN tree t ON m.survivor_id = t.id "
                " WHERE t.depth < 1000) "
                "SELECT m.* FROM identity.merges m JOIN tree t ON m.survivor_id = t.id ORDER BY m.merged_at, m.merged_id"
            ),
            {"p": profile_id},
        )
    ]
    splits = [
        (r.source_profile_id, r.new_profile_id, r.identifiers, r.event_id, r.reason, r.split_at)
        for r in await conn.execute(
            text(
                "SELECT * FROM identity.splits WHERE source_profile_id = :p OR new_profile_id = :p ORDER BY split_at"
            ),
            {"p": profile_id},
        )
    ]
    return GraphRow(row.profile_id, row.created_at, identifiers, merges, splits)


async def applied_sequence(conn: AsyncConnection, consumer: str) -> int:
    value = (
        await conn.execute(
            text("SELECT stream_sequence FROM identity.checkpoints WHERE consumer = :c"), {"c": consumer}
        )
    ).scalar()
    return int(value or 0)


async def merged_into(conn: AsyncConnection, profile_ids: Sequence[str]) -> dict[str, str | None]:
    rows = await conn.execute(
        text("SELECT profile_id, merged_into FROM identity.profiles WHERE profile_id = ANY(:ids)"),
        {"ids": list(profile_ids)},
    )
    return {r.profile_id: r.merged_into for r in rows}
