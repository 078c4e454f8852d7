"""Segments, the profile facts they are evaluated on, and memberships (schema `segmentation`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_common import convert
from cdp_segmentation.core import Condition, Segment

MIGRATIONS = (
    (
        """CREATE TABLE segmentation.segments (
            segment_id text PRIMARY KEY,
            name text NOT NULL,
            conditions jsonb NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE segmentation.profiles (
            profile_id text PRIMARY KEY,
            facts jsonb NOT NULL,
            snapshot bytea NOT NULL)""",
        """CREATE TABLE segmentation.memberships (
            segment_id text NOT NULL,
            profile_id text NOT NULL,
            entered_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (segment_id, profile_id))""",
        "CREATE INDEX memberships_profile ON segmentation.memberships (profile_id)",
    ),
    # When profile built the stored snapshot: an older one arriving later is ignored.
    ("ALTER TABLE segmentation.profiles ADD COLUMN snapshot_at timestamptz",),
)


async def lock(conn: AsyncConnection) -> None:
    """Serialises membership changes between the consumer and segment definition changes."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('segmentation.memberships'))"))


async def segments(conn: AsyncConnection) -> list[Segment]:
    rows = await conn.execute(text("SELECT segment_id, name, conditions FROM segmentation.segments ORDER BY segment_id"))
    return [
        Segment(r.segment_id, r.name, tuple(Condition(c["field"], c["op"], c.get("value")) for c in r.conditions))
        for r in rows
    ]


async def put_segment(conn: AsyncConnection, segment: Segment) -> None:
    conditions = [{"field": c.field, "op": c.op, "value": c.value} for c in segment.conditions]
    await conn.execute(
        text(
            "INSERT INTO segmentation.segments (segment_id, name, conditions) VALUES (:s, :n, CAST(:c AS jsonb)) "
            "ON CONFLICT (segment_id) DO UPDATE SET name = EXCLUDED.name, conditions = EXCLUDED.conditions, "
            "updated_at = now()"
        ),
        {"s": segment.segment_id, "n": segment.name, "c": convert.to_json(conditions)},
    )


async def save_profiles(
    conn: AsyncConnection, profiles: dict[str, tuple[dict[str, Any], bytes, datetime | None]]
) -> None:
    """Each profile's facts, snapshot and when profile built it, in one statement."""
    if not profiles:
        return
    ids = list(profiles)
    await conn.execute(
        text(
            "INSERT INTO segmentation.profiles (profile_id, facts, snapshot, snapshot_at) "
            "SELECT * FROM unnest(CAST(:p AS text[]), CAST(:f AS jsonb[]), CAST(:s AS bytea[]), "
            "CAST(:at AS timestamptz[])) "
            "ON CONFLICT (profile_id) DO UPDATE SET facts = EXCLUDED.facts, snapshot = EXCLUDED.snapshot, "
            "snapshot_at = EXCLUDED.snapshot_at"
        ),
        # NaN and infinity (legal in a profile's Struct traits) become null: jsonb refuses them.
        {"p": ids, "f": [convert.to_json(profiles[p][0]) for p in ids], "s": [profiles[p][1] for p in ids],
         "at": [profiles[p][2] for p in ids]},
    )


async def snapshot_times(conn: AsyncConnection, profile_ids: Sequence[str]) -> dict[str, datetime]:
    """When profile built each stored snapshot (profiles stored before this was kept: none)."""
    rows = await conn.execute(
        text("SELECT profile_id, snapshot_at FROM segmentation.profiles "
             "WHERE profile_id = ANY(:p) AND snapshot_at IS NOT NULL"),
        {"p": list(profile_ids)},
    )
    return {r.profile_id: r.snapshot_at for r in rows}


async def delete_profiles(conn: AsyncConnection, profile_ids: Sequence[str]) -> None:
    if profile_ids:
        await conn.execute(text("DELETE FROM segmentation.profiles WHERE profile_id = ANY(:p)"),
                           {"p": list(profile_ids)})


async def profiles(conn: AsyncConnection) -> list[tuple[str, dict[str, Any], bytes]]:
    rows = await conn.execute(text("SELECT profile_id, facts, snapshot FROM segmentation.profiles ORDER BY profile_id"))
    return [(r.profile_id, r.facts, bytes(r.snapshot)) for r in rows]


async def memberships_of(conn: AsyncConnection, profile_ids: Sequence[str]) -> dict[str, set[str]]:
    """The segments each of these profiles is in (only profiles in at least one)."""
    rows = await conn.execute(
        text("SELECT profile_id, segment_id FROM segmentation.memberships WHERE profile_id = ANY(:p)"),
        {"p": list(profile_ids)},
    )
    held: dict[str, set[str]] = {}
    for r in rows:
        held.setdefault(r.profile_id, set()).add(r.segment_id)
    return held


async def members(conn: AsyncConnection, segment_id: str) -> set[str]:
    rows = await conn.execute(
        text("SELECT profile_id FROM segmentation.memberships WHERE segment_id = :s"), {"s": segment_id}
    )
    return set(rows.scalars())


async def sizes(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(
        text("SELECT segment_id, count(*) AS n FROM segmentation.memberships GROUP BY segment_id")
    )
    return {r.segment_id: int(r.n) for r in rows}


async def enter_pairs(conn: AsyncConnection, pairs: Sequence[tuple[str, str]]) -> None:
    """(segment, profile) memberships, in one statement."""
    if pairs:
        await conn.execute(
            text(
                "INSERT INTO segmentation.memberships (segment_id, profile_id) "
                "SELECT * FROM unnest(CAST(:s AS text[]), CAST(:p AS text[])) ON CONFLICT DO NOTHING"
            ),
            {"s": [s for s, _ in pairs], "p": [p for _, p in pairs]},
        )


async def exit_pairs(conn: AsyncConnection, pairs: Sequence[tuple[str, str]]) -> None:
    if pairs:
        await conn.execute(
            text(
                "DELETE FROM segmentation.memberships m USING unnest(CAST(:s AS text[]), CAST(:p AS text[])) "
                "AS d(s, p) WHERE m.segment_id = d.s AND m.profile_id = d.p"
            ),
            {"s": [s for s, _ in pairs], "p": [p for _, p in pairs]},
        )

