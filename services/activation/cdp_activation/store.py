"""Campaigns and the send ledger (schema `activation`), keyed so a trigger sends at most once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from sqlalchemy import Result, Row, text
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_activation.core import Campaign

MIGRATIONS = (
    (
        """CREATE TABLE activation.campaigns (
            campaign_id text PRIMARY KEY,
            segment_id text NOT NULL,
            channel text NOT NULL,
            from_address text NOT NULL,
            subject_template text NOT NULL,
            body_template text NOT NULL)""",
        "CREATE INDEX campaigns_segment ON activation.campaigns (segment_id)",
        """CREATE TABLE activation.sends (
            send_id text PRIMARY KEY,
            campaign_id text NOT NULL,
            profile_id text NOT NULL,
            trigger_event_id text NOT NULL,
            segment_id text NOT NULL,
            recipient text NOT NULL,
            subject text NOT NULL,
            body text NOT NULL,
            status text NOT NULL DEFAULT 'pending',
            attempts int NOT NULL DEFAULT 0,
            last_error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            sent_at timestamptz,
            UNIQUE (campaign_id, trigger_event_id))""",
        "CREATE INDEX sends_pending ON activation.sends (created_at) WHERE status = 'pending'",
    ),
)


@dataclass(frozen=True)
class Send:
    send_id: str
    campaign_id: str
    profile_id: str
    segment_id: str
    recipient: str
    from_address: str
    subject: str
    body: str
    attempts: int


async def put_campaign(conn: AsyncConnection, c: Campaign) -> None:
    await conn.execute(
        text(
            "INSERT INTO activation.campaigns (campaign_id, segment_id, channel, from_address, subject_template, "
            "body_template) VALUES (:id, :seg, :ch, :fr, :st, :bt) ON CONFLICT (campaign_id) DO UPDATE SET "
            "segment_id = EXCLUDED.segment_id, channel = EXCLUDED.channel, from_address = EXCLUDED.from_address, "
            "subject_template = EXCLUDED.subject_template, body_template = EXCLUDED.body_template"
        ),
        {"id": c.campaign_id, "seg": c.segment_id, "ch": c.channel, "fr": c.from_address,
         "st": c.subject_template, "bt": c.body_template},
    )


async def campaigns(conn: AsyncConnection, segment_id: str | None = None) -> list[Campaign]:
    rows: Result[str, str, str, str, str, str] = await conn.execute(
        text(
            "SELECT campaign_id, segment_id, channel, from_address, subject_template, body_template "
            "FROM activation.campaigns WHERE CAST(:seg AS text) IS NULL OR segment_id = :seg ORDER BY campaign_id"
        ),
        {"seg": segment_id},
    )
    return [Campaign(*row) for row in rows]


async def sent_counts(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(
        text("SELECT campaign_id, count(*) AS n FROM activation.sends WHERE status = 'sent' GROUP BY campaign_id")
    )
    return {r.campaign_id: int(r.n) for r in rows}


async def campaigns_on(conn: AsyncConnection, segment_ids: Iterable[str]) -> dict[str, list[Campaign]]:
    """The campaigns of these segments, by segment (in campaign id order)."""
    rows: Result[str, str, str, str, str, str] = await conn.execute(
        text(
            "SELECT campaign_id, segment_id, channel, from_address, subject_template, body_template "
            "FROM activation.campaigns WHERE segment_id = ANY(:segs) ORDER BY campaign_id"
        ),
        {"segs": sorted(set(segment_ids))},
    )
    found: dict[str, list[Campaign]] = {}
    for row in rows:
        campaign = Campaign(*row)
        found.setdefault(campaign.segment_id, []).append(campaign)
    return found


@dataclass(frozen=True)
class Queued:
    """A send to queue (`status` pending, or why it is skipped, with `error`)."""

    send_id: str
    campaign_id: str
    profile_id: str
    trigger_event_id: str
    segment_id: str
    recipient: str
    subject: str
    body: str
    status: str = "pending"
    error: str | None = None


async def queue(conn: AsyncConnection, sends: Sequence[Queued]) -> set[str]:
    """Queues sends in one statement; returns the ids queued now (a trigger that already queued its
    campaign's send, e.g. a redelivered entry, queues nothing new)."""
    if not sends:
        return set()
    columns = [f.name for f in fields(Queued)]
    result = await conn.execute(
        text(
            "INSERT INTO activation.sends (send_id, campaign_id, profile_id, trigger_event_id, segment_id, "
            "recipient, subject, body, status, last_error) SELECT * FROM unnest("
            + ", ".join(f"CAST(:{c} AS text[])" for c in columns)
            + ") ON CONFLICT DO NOTHING RETURNING send_id"
        ),
        {c: [getattr(s, c) for s in sends] for c in columns},
    )
    return set(result.scalars())


async def pending_ids(conn: AsyncConnection, limit: int) -> list[str]:
    rows = await conn.execute(
        text("SELECT send_id FROM activation.sends WHERE status = 'pending' ORDER BY created_at LIMIT :n"),
        {"n": limit},
    )
    return list(rows.scalars())


async def claim(conn: AsyncConnection, send_id: str) -> Send | None:
    """Marks one pending send `sending` (an attempt more); None if it is no longer pending (another
    sender claimed it). Committed before the message goes to the SMTP server."""
    row: Row[str, str, str, str, str, str, str, str, int] | None = (
        await conn.execute(
            text(
                "UPDATE activation.sends s SET status = 'sending', attempts = s.attempts + 1 "
                "FROM activation.campaigns c WHERE s.send_id = :id AND s.status = 'pending' "
                "AND c.campaign_id = s.campaign_id RETURNING s.send_id, s.campaign_id, s.profile_id, s.segment_id, "
                "s.recipient, c.from_address, s.subject, s.body, s.attempts"
            ),
            {"id": send_id},
        )
    ).first()
    return None if row is None else Send(*row)


async def finish(conn: AsyncConnection, send_id: str, status: str, error: str | None = None) -> None:
    await conn.execute(
        text(
            "UPDATE activation.sends SET status = :st, last_error = :e, "
            "sent_at = CASE WHEN :st = 'sent' THEN now() ELSE sent_at END WHERE send_id = :id"
        ),
        {"st": status, "e": error, "id": send_id},
    )


async def counts_by_status(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(text("SELECT status, count(*) AS n FROM activation.sends GROUP BY status"))
    return {r.status: int(r.n) for r in rows}


