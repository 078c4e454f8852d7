"""Hashed identifiers, audience members and imported conversions (schema `dmp`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

MIGRATIONS = (
    (
        """CREATE TABLE dmp.hashed_emails (
            email_sha256 text PRIMARY KEY,
            profile_id text NOT NULL)""",
        "CREATE INDEX hashed_emails_profile ON dmp.hashed_emails (profile_id)",
        """CREATE TABLE dmp.audience_members (
            segment_id text NOT NULL,
            profile_id text NOT NULL,
            PRIMARY KEY (segment_id, profile_id))""",
        """CREATE TABLE dmp.conversions (
            platform text NOT NULL,
            conversion_id text NOT NULL,
            event_id text NOT NULL,
            imported_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (platform, conversion_id))""",
    ),
)


async def set_owners(conn: AsyncConnection, owners: dict[str, str]) -> None:
    """Which profile each hashed email belongs to (one statement)."""
    if owners:
        await conn.execute(
            text(
                "INSERT INTO dmp.hashed_emails (email_sha256, profile_id) "
                "SELECT * FROM unnest(CAST(:hs AS text[]), CAST(:ps AS text[])) "
                # A row that already names the profile is not written again (most changes keep them).
                "ON CONFLICT (email_sha256) DO UPDATE SET profile_id = EXCLUDED.profile_id "
                "WHERE dmp.hashed_emails.profile_id <> EXCLUDED.profile_id"
            ),
            {"hs": list(owners), "ps": list(owners.values())},
        )


async def forget(conn: AsyncConnection, profile_ids: Sequence[str], hashes: Collection[str]) -> None:
    """Merged-away profiles: their hashed emails and audience rows go, and `hashes` (those they held
    whose rows may still name an earlier owner)."""
    if profile_ids:
        await conn.execute(
            text("DELETE FROM dmp.hashed_emails WHERE profile_id = ANY(:p) OR email_sha256 = ANY(:h)"),
            {"p": list(profile_ids), "h": list(hashes)},
        )
        await conn.execute(text("DELETE FROM dmp.audience_members WHERE profile_id = ANY(:p)"), {"p": list(profile_ids)})


async def set_members(conn: AsyncConnection, member: dict[tuple[str, str], bool]) -> None:
    """(segment, profile) pairs in (True) or out of (False) the segment's audience."""
    for wanted, statement in (
        (True, "INSERT INTO dmp.audience_members SELECT * FROM unnest(CAST(:s AS text[]), CAST(:p AS text[])) "
               "ON CONFLICT DO NOTHING"),
        (False, "DELETE FROM dmp.audience_members m USING unnest(CAST(:s AS text[]), CAST(:p AS text[])) "
                "AS d(s, p) WHERE m.segment_id = d.s AND m.profile_id = d.p"),
    ):
        pairs = [pair for pair, inside in member.items() if inside is wanted]
        if pairs:
            await conn.execute(text(statement), {"s": [s for s, _ in pairs], "p": [p for _, p in pairs]})


async def audience_hashes(conn: AsyncConnection, segment_id: str) -> list[str]:
    rows = await conn.execute(
        text(
            "SELECT h.email_sha256 FROM dmp.audience_members m JOIN dmp.hashed_emails h USING (profile_id) "
            "WHERE m.segment_id = :s"
        ),
        {"s": segment_id},
    )
    return list(rows.scalars())


async def already_imported(conn: AsyncConnection, platform: str, conversion_ids: Sequence[str]) -> set[str]:
    rows = await conn.execute(
        text("SELECT conversion_id FROM dmp.conversions WHERE platform = :pl AND conversion_id = ANY(:ids)"),
        {"pl": platform, "ids": list(conversion_ids)},
    )
    return set(rows.scalars())


async def record_imported(conn: AsyncConnection, platform: str, rows: Sequence[tuple[str, str]]) -> None:
    await conn.execute(
        text(
            "INSERT INTO dmp.conversions (platform, conversion_id, event_id) "
            "SELECT :pl, c, e FROM unnest(CAST(:cs AS text[]), CAST(:es AS text[])) AS r(c, e) ON CONFLICT DO NOTHING"
        ),
        {"pl": platform, "cs": [r[0] for r in rows], "es": [r[1] for r in rows]},
    )


async def known_hashes(conn: AsyncConnection, hashes: Sequence[str]) -> set[str]:
    rows = await conn.execute(
        text("SELECT email_sha256 FROM dmp.hashed_emails WHERE email_sha256 = ANY(:hs)"), {"hs": list(hashes)}
    )
    return set(rows.scalars())
