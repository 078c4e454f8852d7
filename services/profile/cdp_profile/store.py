"""The profile read model in PostgreSQL (schema `profile`), a projection of the log."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_profile.core import ProfileState

MIGRATIONS = (
    (
        """CREATE TABLE profile.profiles (
            profile_id text PRIMARY KEY,
            traits jsonb NOT NULL DEFAULT '{}',
            trait_times jsonb NOT NULL DEFAULT '{}',
            order_count bigint NOT NULL DEFAULT 0,
            revenue numeric(18, 2) NOT NULL DEFAULT 0,
            last_order_at timestamptz,
            first_seen_at timestamptz,
            event_count bigint NOT NULL DEFAULT 0,
            merged_ids text[] NOT NULL DEFAULT '{}',
            merged_into text,
            updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE profile.identifiers (
            id_type text NOT NULL,
            id_value text NOT NULL,
            profile_id text NOT NULL,
            PRIMARY KEY (id_type, id_value))""",
        "CREATE INDEX identifiers_profile ON profile.identifiers (profile_id)",
        """CREATE TABLE profile.events (
            event_id text PRIMARY KEY,
            profile_id text NOT NULL,
            type text NOT NULL,
            name text NOT NULL,
            occurred_at timestamptz NOT NULL,
            properties jsonb NOT NULL)""",
        "CREATE INDEX events_profile_time ON profile.events (profile_id, occurred_at DESC)",
    ),
    (
        # What a split needs to move an event and recompute a profile from its timeline.
        "ALTER TABLE profile.events ADD COLUMN traits jsonb NOT NULL DEFAULT '{}'",
        "ALTER TABLE profile.events ADD COLUMN id_keys text[] NOT NULL DEFAULT '{}'",
    ),
)


def id_key(id_type: str, value: str) -> str:
    """An identifier as one text ("type=value"; type names have no '=')."""
    return f"{id_type}={value}"


async def load(conn: AsyncConnection, profile_id: str, lock: bool = True) -> ProfileState | None:
    row = (
        await conn.execute(
            text(
                "SELECT profile_id, traits, trait_times, order_count, revenue, last_order_at, first_seen_at, "
                "event_count, merged_ids FROM profile.profiles WHERE profile_id = :p"
                + (" FOR UPDATE" if lock else "")
            ),
            {"p": profile_id},
        )
    ).first()
    if row is None:
        return None
    ids = await conn.execute(
        text("SELECT id_type, id_value FROM profile.identifiers WHERE profile_id = :p"), {"p": profile_id}
    )
    return ProfileState(
        profile_id=row.profile_id,
        traits=row.traits,
        trait_times=row.trait_times,
        identifiers=frozenset((r.id_type, r.id_value) for r in ids),
        order_count=row.order_count,
        revenue=float(row.revenue),
        last_order_at=row.last_order_at,
        first_seen_at=row.first_seen_at,
        event_count=row.event_count,
        merged_ids=tuple(row.merged_ids),
    )


async def save(conn: AsyncConnection, state: ProfileState, previous: ProfileState | None) -> None:
    await conn.execute(
        text(
            "INSERT INTO profile.profiles (profile_id, traits, trait_times, order_count, revenue, "
            "last_order_at, first_seen_at, event_count, merged_ids, updated_at) VALUES (:p, CAST(:t AS jsonb), "
            "CAST(:tt AS jsonb), :oc, :rev, :lo, :fs, :ec, :m, now()) ON CONFLICT (profile_id) DO UPDATE SET "
            "traits = EXCLUDED.traits, trait_times = EXCLUDED.trait_times, order_count = EXCLUDED.order_count, "
            "revenue = EXCLUDED.revenue, last_order_at = EXCLUDED.last_order_at, "
            "first_seen_at = EXCLUDED.first_seen_at, event_count = EXCLUDED.event_count, "
            "merged_ids = EXCLUDED.merged_ids, updated_at = now()"
        ),
        {
            "p": state.profile_id,
            "t": json.dumps(dict(state.traits)),
            "tt": json.dumps(dict(state.trait_times)),
            "oc": state.order_count,
            "rev": state.revenue,
            "lo": state.last_order_at,
            "fs": state.first_seen_at,
            "ec": state.event_count,
            "m": list(state.merged_ids),
        },
    )
    added = state.identifiers - (previous.identifiers if previous else frozenset())
    if added:
        await conn.execute(
            text(
                "INSERT INTO profile.identifiers (id_type, id_value, profile_id) "
                "SELECT t, v, :p FROM unnest(CAST(:types AS text[]), CAST(:vals AS text[])) AS k(t, v) "
                "ON CONFLICT (id_type, id_value) DO UPDATE SET profile_id = EXCLUDED.profile_id"
            ),
            {"p": state.profile_id, "types": [k[0] for k in added], "vals": [k[1] for k in added]},
        )


async def record_event(
    conn: AsyncConnection, *, event_id: str, profile_id: str, type_: str, name: str,
    occurred_at: datetime, properties: dict[str, Any], traits: dict[str, Any] | None = None,
    identifiers: Sequence[tuple[str, str]] = (),
) -> bool:
    """Adds the event to the timeline; False if it was already there."""
    result = await conn.execute(
        text(
            "INSERT INTO profile.events (event_id, profile_id, type, name, occurred_at, properties, traits, id_keys) "
            "VALUES (:e, :p, :t, :n, :at, CAST(:props AS jsonb), CAST(:traits AS jsonb), :keys) "
            "ON CONFLICT (event_id) DO NOTHING"
        ),
        {"e": event_id, "p": profile_id, "t": type_, "n": name, "at": occurred_at, "props": json.dumps(properties),
         "traits": json.dumps(traits or {}), "keys": [id_key(t, v) for t, v in identifiers]},
    )
    return bool(result.rowcount)


async def move_split(conn: AsyncConnection, source: str, new: str, keys: Sequence[tuple[str, str]]) -> int:
    """Moves the split-off identifiers and every event that came through one of them."""
    params = {"s": source, "n": new, "keys": [id_key(t, v) for t, v in keys]}
    await conn.execute(
        text(
            "UPDATE profile.identifiers SET profile_id = :n WHERE profile_id = :s "
            "AND (id_type || '=' || id_value) = ANY(:keys)"
        ),
        params,
    )
    result = await conn.execute(
        text("UPDATE profile.events SET profile_id = :n WHERE profile_id = :s AND id_keys && CAST(:keys AS text[])"),
        params,
    )
    return int(result.rowcount)


async def timeline(conn: AsyncConnection, profile_id: str) -> list[Any]:
    """Every event of a profile, oldest first: what a profile is recomputed from."""
    rows = await conn.execute(
        text(
            "SELECT name, occurred_at, properties, traits, id_keys FROM profile.events WHERE profile_id = :p "
            "ORDER BY occurred_at, event_id"
        ),
        {"p": profile_id},
    )
    return list(rows)


async def identifiers_of(conn: AsyncConnection, profile_id: str) -> frozenset[tuple[str, str]]:
    rows = await conn.execute(
        text("SELECT id_type, id_value FROM profile.identifiers WHERE profile_id = :p"), {"p": profile_id}
    )
    return frozenset((r.id_type, r.id_value) for r in rows)


async def retire(conn: AsyncConnection, merged_ids: Sequence[str], survivor_id: str) -> None:
    """Merged-away profiles point at the survivor; their history moves with them."""
    params = {"m": list(merged_ids), "s": survivor_id}
    await conn.execute(
        text("UPDATE profile.profiles SET merged_into = :s, updated_at = now() WHERE profile_id = ANY(:m)"),
        params,
    )
    await conn.execute(text("UPDATE profile.events SET profile_id = :s WHERE profile_id = ANY(:m)"), params)
    await conn.execute(text("UPDATE profile.identifiers SET profile_id = :s WHERE profile_id = ANY(:m)"), params)


async def current_id(conn: AsyncConnection, profile_id: str) -> str | None:
    """Follows merges to the live profile."""
    for _ in range(100):
        row = (
            await conn.execute(
                text("SELECT merged_into FROM profile.profiles WHERE profile_id = :p"), {"p": profile_id}
            )
        ).first()
        if row is None:
            return None
        if row.merged_into is None:
            return profile_id
        profile_id = row.merged_into
    return None


async def by_identifier(conn: AsyncConnection, id_type: str, value: str) -> str | None:
    row = (
        await conn.execute(
            text("SELECT profile_id FROM profile.identifiers WHERE id_type = :t AND id_value = :v"),
            {"t": id_type, "v": value},
        )
    ).first()
    return None if row is None else str(row.profile_id)
