"""The profile read model in PostgreSQL (schema `profile`), a projection of the log.

Queries name tables without their schema: the connection's search_path picks it, so a rebuild
(`rebuild.py`) fills a new schema with this same code while the service keeps reading the old one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import RowMapping, text

from cdp_common import convert
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_profile import search
from cdp_profile.core import ProfileState, Scores, Stamped, from_fields
from cdp_profile.scoring import Inputs, Models

MIGRATIONS = (
    (
        """CREATE TABLE {schema}.profiles (
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
        """CREATE TABLE {schema}.identifiers (
            id_type text NOT NULL,
            id_value text NOT NULL,
            profile_id text NOT NULL,
            PRIMARY KEY (id_type, id_value))""",
        "CREATE INDEX identifiers_profile ON {schema}.identifiers (profile_id)",
        """CREATE TABLE {schema}.events (
            event_id text PRIMARY KEY,
            profile_id text NOT NULL,
            type text NOT NULL,
            name text NOT NULL,
            occurred_at timestamptz NOT NULL,
            properties jsonb NOT NULL)""",
        "CREATE INDEX events_profile_time ON {schema}.events (profile_id, occurred_at DESC)",
    ),
    (
        # What a split needs to move an event and recompute a profile from its timeline.
        "ALTER TABLE {schema}.events ADD COLUMN traits jsonb NOT NULL DEFAULT '{}'",
        "ALTER TABLE {schema}.events ADD COLUMN id_keys text[] NOT NULL DEFAULT '{}'",
    ),
    (
        # Aggregates as columns (searchable, and read in one pass by the scoring job); the
        # last-writer-wins registers (consents, tickets, loyalty) and category counts as jsonb.
        """ALTER TABLE {schema}.profiles
            ADD COLUMN first_order_at timestamptz,
            ADD COLUMN last_seen_at timestamptz,
            ADD COLUMN categories jsonb NOT NULL DEFAULT '{}',
            ADD COLUMN refund_count bigint NOT NULL DEFAULT 0,
            ADD COLUMN refunded numeric(18, 2) NOT NULL DEFAULT 0,
            ADD COLUMN email_sends bigint NOT NULL DEFAULT 0,
            ADD COLUMN email_deliveries bigint NOT NULL DEFAULT 0,
            ADD COLUMN email_opens bigint NOT NULL DEFAULT 0,
            ADD COLUMN email_clicks bigint NOT NULL DEFAULT 0,
            ADD COLUMN email_bounces bigint NOT NULL DEFAULT 0,
            ADD COLUMN last_open_at timestamptz,
            ADD COLUMN last_click_at timestamptz,
            ADD COLUMN registers jsonb NOT NULL DEFAULT '{}',
            ADD COLUMN loyalty_tier text,
            ADD COLUMN loyalty_points bigint NOT NULL DEFAULT 0,
            ADD COLUMN open_tickets integer NOT NULL DEFAULT 0,
            ADD COLUMN scores jsonb NOT NULL DEFAULT '{}',
            ADD COLUMN lifecycle_stage text,
            ADD COLUMN frequency_falling boolean NOT NULL DEFAULT false,
            ADD COLUMN rfm_recency smallint,
            ADD COLUMN rfm_frequency smallint,
            ADD COLUMN rfm_monetary smallint,
            ADD COLUMN rfm_cell text,
            ADD COLUMN churn_risk double precision,
            ADD COLUMN churn_label text,
            ADD COLUMN next_best_offer text""",
        # The timeline keeps what a recompute needs (consent) and what a reader wants (source).
        "ALTER TABLE {schema}.events ADD COLUMN source text NOT NULL DEFAULT ''",
        "ALTER TABLE {schema}.events ADD COLUMN consent jsonb NOT NULL DEFAULT '{}'",
        "DROP INDEX {schema}.events_profile_time",
        "CREATE INDEX events_profile_time ON {schema}.events (profile_id, occurred_at DESC, event_id DESC)",
        "CREATE INDEX profiles_live ON {schema}.profiles (profile_id) WHERE merged_into IS NULL",
        """CREATE TABLE {schema}.models (
            name text PRIMARY KEY,
            params jsonb NOT NULL,
            computed_at timestamptz NOT NULL)""",
    ),
    (
        # Every event rewrites its profile's row; with room left on its page, PostgreSQL writes the
        # new version there without new index entries (a HOT update: no indexed column changes).
        "ALTER TABLE {schema}.profiles SET (fillfactor = 80)",
    ),
)


def id_key(id_type: str, value: str) -> str:
    """An identifier as one text ("type=value"; type names have no '=')."""
    return f"{id_type}={value}"


# --- profiles ----------------------------------------------------------------------------------

COLUMNS = (
    "profile_id, merged_into, traits, trait_times, order_count, "
    "round(revenue * 100)::bigint AS revenue_cents, first_order_at, last_order_at, categories, refund_count, "
    "round(refunded * 100)::bigint AS refunded_cents, email_sends, email_deliveries, email_opens, email_clicks, "
    "email_bounces, last_open_at, last_click_at, event_count, first_seen_at, last_seen_at, merged_ids, "
    "registers, scores"
)
_SELECT = f"SELECT {COLUMNS} FROM profiles"


def _stamped(value: Any) -> Stamped | None:
    return None if not value else (str(value[0]), value[1])


def state_of(row: RowMapping | Mapping[str, Any], ids: frozenset[tuple[str, str]]) -> ProfileState:
    """A stored row (by column name: a SQLAlchemy row's `_mapping` or an asyncpg record) as state."""
    registers = row["registers"] or {}
    return from_fields({
        "profile_id": row["profile_id"],
        "traits": row["traits"],
        "trait_times": row["trait_times"],
        "identifiers": ids,
        "consents": {k: (str(v[0]), v[1]) for k, v in registers.get("consents", {}).items()},
        "tickets": {k: (str(v[0]), v[1]) for k, v in registers.get("tickets", {}).items()},
        "loyalty_tier": _stamped(registers.get("loyalty_tier")),
        "loyalty_balance": _stamped(registers.get("loyalty_balance")),
        "loyalty_earned": int(registers.get("loyalty_earned", 0)),
        **{name: row[name] for name in _AS_STORED},
        "merged_ids": tuple(row["merged_ids"]),
        "scores": Scores.from_dict(row["scores"] or {}),
    })


# The state's fields stored as they are, in columns of their own name.
_AS_STORED = (
    "order_count", "revenue_cents", "first_order_at", "last_order_at", "categories", "refund_count",
    "refunded_cents", "email_sends", "email_deliveries", "email_opens", "email_clicks", "email_bounces",
    "last_open_at", "last_click_at", "event_count", "first_seen_at", "last_seen_at",
)


@dataclass(frozen=True)
class Loaded:
    """Profiles as stored, and where merged-away ones went."""

    states: dict[str, ProfileState]
    merged_into: dict[str, str]


async def load_many(
    conn: AsyncConnection, profile_ids: Sequence[str], lock: bool = True, identifiers: bool = True,
    skip_locked: bool = False,
) -> Loaded:
    """One read of many profiles (locked in id order); without `identifiers`, their states hold
    none (a rebuild keeps who owns which on its own). `skip_locked`: leaves out the profiles another
    transaction holds, instead of waiting for them (a writer that locks in several statements could
    otherwise deadlock with this one)."""
    ids = sorted(set(profile_ids))
    if not ids:
        return Loaded({}, {})
    locking = (" FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE") if lock else ""
    rows = (
        await conn.execute(text(f"{_SELECT} WHERE profile_id = ANY(:p) ORDER BY profile_id{locking}"), {"p": ids})
    ).all()
    held: dict[str, set[tuple[str, str]]] = {}
    live = [r.profile_id for r in rows if r.merged_into is None]
    if live and identifiers:
        for r in await conn.execute(
            text("SELECT profile_id, id_type, id_value FROM identifiers WHERE profile_id = ANY(:p)"),
            {"p": live},
        ):
            held.setdefault(r.profile_id, set()).add((r.id_type, r.id_value))
    return Loaded(
        states={
            r.profile_id: state_of(r._mapping, frozenset(held.get(r.profile_id, ()))) for r in rows if r.merged_into is None
        },
        merged_into={r.profile_id: r.merged_into for r in rows if r.merged_into is not None},
    )


async def load(conn: AsyncConnection, profile_id: str, lock: bool = True) -> ProfileState | None:
    """A live profile (None if unknown or merged away)."""
    return (await load_many(conn, [profile_id], lock)).states.get(profile_id)


def _scores(s: ProfileState) -> dict[str, Any]:
    return s.scores.to_dict() if s.scores else {}


# What a profile row is written from: its columns' values as JSON, a function for the state and
# one for the scores (a dict literal each: called per changed profile). Rows go to PostgreSQL as
# one JSON array read by json_populate_recordset: a parameter per column and row costs asyncpg more
# (type checks of every array element) than PostgreSQL spends parsing the JSON.
def _state_row(s: ProfileState) -> dict[str, Any]:
    loyalty_tier = s.loyalty_tier
    return {
        "profile_id": s.profile_id,
        "traits": dict(s.traits),
        "trait_times": dict(s.trait_times),
        "order_count": s.order_count,
        "revenue": s.revenue_cents / 100,
        "first_order_at": s.first_order_at,
        "last_order_at": s.last_order_at,
        "categories": dict(s.categories),
        "refund_count": s.refund_count,
        "refunded": s.refunded_cents / 100,
        "email_sends": s.email_sends,
        "email_deliveries": s.email_deliveries,
        "email_opens": s.email_opens,
        "email_clicks": s.email_clicks,
        "email_bounces": s.email_bounces,
        "last_open_at": s.last_open_at,
        "last_click_at": s.last_click_at,
        "event_count": s.event_count,
        "first_seen_at": s.first_seen_at,
        "last_seen_at": s.last_seen_at,
        "merged_ids": list(s.merged_ids),
        "registers": {
            "consents": s.consents, "tickets": s.tickets, "loyalty_tier": loyalty_tier,
            "loyalty_balance": s.loyalty_balance, "loyalty_earned": s.loyalty_earned,
        },
        "loyalty_tier": loyalty_tier[1] if loyalty_tier else None,
        "loyalty_points": s.loyalty_points,
        "open_tickets": len(s.open_tickets),
    }


def _score_key(s: ProfileState) -> dict[str, Any]:
    """The score columns a scoring round changes (`Scores.key`); the scoring job writes a profile
    only when they differ from what it computes (`survey.rescored`)."""
    scores = s.scores
    rfm = scores.rfm if scores else None
    churn = scores.churn if scores else None
    offer = scores.offer if scores else None
    return {
        "lifecycle_stage": scores.lifecycle.label if scores else None,
        "frequency_falling": bool(scores and scores.frequency_falling),
        "rfm_recency": rfm.recency if rfm else None,
        "rfm_frequency": rfm.frequency if rfm else None,
        "rfm_monetary": rfm.monetary if rfm else None,
        "rfm_cell": rfm.cell if rfm else None,
        "churn_label": churn.label if churn else None,
        "next_best_offer": offer.label if offer else None,
    }


def _score_row(s: ProfileState) -> dict[str, Any]:
    churn = s.scores.churn if s.scores else None
    return {"scores": _scores(s), **_score_key(s), "churn_risk": churn.value if churn else None}


_STATE_COLUMNS = tuple(_state_row(ProfileState("")))[1:]  # profile_id aside
_SCORE_COLUMNS = tuple(_score_row(ProfileState("")))


async def save_many(
    conn: AsyncConnection, states: Sequence[ProfileState], previous: Mapping[str, ProfileState],
    scores_of: Sequence[str] | None = None,
) -> None:
    """Writes whole profiles and their new identifiers, in one statement each (see `save_profiles`)."""
    await save_profiles(conn, states, scores_of)
    # One row per identifier even if two profiles of the batch claim it (identity decides; the last wins).
    await claim_identifiers(conn, list({
        key: s.profile_id for s in states
        for key in s.identifiers - (previous[s.profile_id].identifiers if s.profile_id in previous else frozenset())
    }.items()))


_KEY_TYPES = {"frequency_falling": "boolean", "rfm_recency": "smallint", "rfm_frequency": "smallint",
              "rfm_monetary": "smallint"}
_KEY_COLUMNS = tuple(_score_key(ProfileState("")))
_STORED_KEY = ", ".join(f"p.{c}" for c in _KEY_COLUMNS)
_READ_KEY = ", ".join(f"r.{c}" for c in _KEY_COLUMNS)
_READ_COLUMNS = ", ".join(f"{c} {_KEY_TYPES.get(c, 'text')}" for c in _KEY_COLUMNS)
_RESCORED_SINCE = (
    f"SELECT p.profile_id, ({_STORED_KEY}) IS DISTINCT FROM ({_READ_KEY}) AS moved FROM profiles p "
    f"JOIN json_to_recordset(CAST(:read AS json)) AS r(profile_id text, {_READ_COLUMNS}) "
    "ON p.profile_id = r.profile_id ORDER BY p.profile_id FOR UPDATE OF p"
)


async def rescored_since(conn: AsyncConnection, read: Sequence[ProfileState]) -> list[str]:
    """Of profiles read earlier, the ones the scoring job rescored meanwhile: their stored score
    key (`_score_key`) is not the one read any more. The key's columns are compared, not the scores
    with their reasons, which cost PostgreSQL a JSON parse per row. Locks their rows, so the job
    waits until commit."""
    if not read:
        return []
    keys = [{"profile_id": s.profile_id, **_score_key(s)} for s in read]
    rows = await conn.execute(text(_RESCORED_SINCE), {"read": convert.to_json(keys)})
    return [r.profile_id for r in rows if r.moved]


async def save_profiles(
    conn: AsyncConnection, states: Sequence[ProfileState], scores_of: Sequence[str] | None = None
) -> None:
    """Writes whole profiles in one statement; the scores too, of all or of `scores_of` (scores
    with their reasons are the bulk of a row: most events do not change them, and the others keep
    the stored ones, which the scoring job may have moved meanwhile)."""
    if not states:
        return
    scored = {s.profile_id for s in states} if scores_of is None else set(scores_of)
    columns = ("profile_id", *_STATE_COLUMNS, *_SCORE_COLUMNS)
    names = ", ".join(columns)
    rows = convert.to_json([_state_row(s) | _score_row(s) if s.profile_id in scored else _state_row(s) for s in states])
    # A row without scores keeps the stored ones (JSON null marks it: the column is NOT NULL, and
    # PostgreSQL checks that before it finds the conflict); a new profile always comes scored.
    kept = "EXCLUDED.scores = 'null'::jsonb"
    updates = ", ".join([
        *(f"{c} = EXCLUDED.{c}" for c in _STATE_COLUMNS),
        *(f"{c} = CASE WHEN {kept} THEN p.{c} ELSE EXCLUDED.{c} END" for c in _SCORE_COLUMNS),
    ])
    not_null = {"scores": "'null'::jsonb", "frequency_falling": "false"}
    select = ", ".join(f"COALESCE({c}, {not_null[c]})" if c in not_null else c for c in columns)
    await conn.execute(
        text(
            f"INSERT INTO profiles AS p ({names}) SELECT {select} "
            "FROM json_populate_recordset(NULL::profiles, CAST(:rows AS json)) "
            f"ON CONFLICT (profile_id) DO UPDATE SET {updates}, updated_at = now()"
        ),
        {"rows": rows},
    )


def _exact(amount: float) -> Decimal:
    """An amount of money (cents / 100) as the numeric the JSON number would have become."""
    return Decimal(round(amount * 100)).scaleb(-2)


# How `copy_profiles` hands these columns' values to COPY, where JSON would carry them as they are.
_COPIED_AS: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(("traits", "trait_times", "categories", "registers", "scores"), convert.to_json),
    "revenue": _exact, "refunded": _exact,
}


async def copy_profiles(conn: AsyncConnection, states: Sequence[ProfileState]) -> None:
    """Writes new profiles, scored, with COPY: the rows `save_profiles` would write, for a table only
    the caller fills (a rebuild's), where none of them is yet. The transaction must have begun."""
    if not states:
        return
    columns = ("profile_id", *_STATE_COLUMNS, *_SCORE_COLUMNS)
    adapted = [_COPIED_AS.get(name) for name in columns]
    records = []
    for state in states:
        record = [*_state_row(state).values(), *_score_row(state).values()]
        for i, adapt in enumerate(adapted):
            if adapt is not None:
                record[i] = adapt(record[i])
        records.append(record)
    await _copy(conn, "profiles", records, columns)


async def claim_identifiers(conn: AsyncConnection, owners: Sequence[tuple[tuple[str, str], str]]) -> None:
    """Identifiers ((type, value), profile id) to their profiles, wherever they were."""
    if owners:
        await conn.execute(
            text(
                "INSERT INTO identifiers (id_type, id_value, profile_id) "
                "SELECT * FROM unnest(CAST(:t AS text[]), CAST(:v AS text[]), CAST(:p AS text[])) "
                "ON CONFLICT (id_type, id_value) DO UPDATE SET profile_id = EXCLUDED.profile_id "
                "WHERE identifiers.profile_id <> EXCLUDED.profile_id"
            ),
            {"t": [k[0] for k, _ in owners], "v": [k[1] for k, _ in owners], "p": [p for _, p in owners]},
        )


async def save(conn: AsyncConnection, state: ProfileState, previous: ProfileState | None) -> None:
    await save_many(conn, [state], {state.profile_id: previous} if previous else {})


async def versions(conn: AsyncConnection, profile_ids: Sequence[str]) -> dict[str, datetime]:
    """When each profile was last written (`updated_at`: every write of a profile row sets it)."""
    rows = await conn.execute(text("SELECT profile_id, updated_at FROM profiles WHERE profile_id = ANY(:p)"),
                              {"p": list(profile_ids)})
    return {r.profile_id: r.updated_at for r in rows}


_SCORE_NAMES = ", ".join(("profile_id", *_SCORE_COLUMNS))
_SCORE_UPDATES = ", ".join(f"{c} = n.{c}" for c in _SCORE_COLUMNS)
_NEW_SCORES = (f"(SELECT {_SCORE_NAMES} FROM json_populate_recordset(NULL::profiles, CAST(:rows AS json))) "
               f"AS n({_SCORE_NAMES})")


def score_rows(states: Sequence[ProfileState]) -> str:
    """Profiles' scores as the scoring job writes them (one JSON array)."""
    return convert.to_json([{"profile_id": s.profile_id, **_score_row(s)} for s in states])


async def save_scores(conn: AsyncConnection, states: Sequence[ProfileState]) -> None:
    """Writes only the scores: what the scoring job changes."""
    if states:
        await conn.execute(
            text(f"UPDATE profiles p SET {_SCORE_UPDATES}, updated_at = now() FROM {_NEW_SCORES} "
                 "WHERE p.profile_id = n.profile_id"),
            {"rows": score_rows(states)},
        )


# One statement: run on its own (autocommit), it holds the rows it locks only while PostgreSQL runs
# it, never while the process that sent it waits for a CPU.
_SAVE_SCORES_IF_UNCHANGED = (
    "WITH kept AS (SELECT p.profile_id FROM profiles p "
    "JOIN unnest(CAST(:p AS text[]), CAST(:at AS timestamptz[])) AS r(profile_id, updated_at) "
    "ON p.profile_id = r.profile_id AND p.updated_at = r.updated_at "
    "ORDER BY p.profile_id FOR UPDATE OF p SKIP LOCKED), "
    f"scored AS (UPDATE profiles p SET {_SCORE_UPDATES}, updated_at = now() FROM {_NEW_SCORES} "
    "WHERE p.profile_id = n.profile_id AND p.profile_id IN (SELECT profile_id FROM kept) RETURNING p.profile_id), "
    "published AS (INSERT INTO outbox (subject, msg_id, headers, payload) SELECT o.s, o.m, '{}', o.b "
    "FROM unnest(CAST(:owner AS text[]), CAST(:s AS text[]), CAST(:m AS text[]), CAST(:b AS bytea[])) "
    "AS o(owner, s, m, b) WHERE o.owner IN (SELECT profile_id FROM scored)) "
    "SELECT count(*) FROM scored"
)


async def save_scores_if_unchanged(
    conn: AsyncConnection, versions: Mapping[str, datetime], scores: str,
    events: Sequence[tuple[str, str, str, bytes]],
) -> int:
    """Writes `scores` (`score_rows`) and the outbox rows (profile id, subject, message id, payload) of
    the profiles read at `versions` that nothing wrote since (`updated_at`: every write of a profile
    row sets it) and no other transaction holds right now (skipped, not waited for), in one
    statement; returns how many profiles it wrote."""
    if not versions:
        return 0
    written = await conn.execute(text(_SAVE_SCORES_IF_UNCHANGED), {
        "p": list(versions), "at": list(versions.values()), "rows": scores,
        "owner": [e[0] for e in events], "s": [e[1] for e in events], "m": [e[2] for e in events],
        "b": [e[3] for e in events]})
    return int(written.scalar_one())


# --- the timeline ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """An event as the timeline keeps it."""

    event_id: str
    profile_id: str
    type: str
    name: str
    occurred_at: datetime
    source: str
    properties: Mapping[str, Any]
    traits: Mapping[str, Any]
    consent: Mapping[str, bool]
    identifiers: Sequence[tuple[str, str]]


async def record_events(conn: AsyncConnection, events: Sequence[Recorded]) -> set[str]:
    """Adds events to the timeline; returns the ids that were not there yet."""
    if not events:
        return set()
    rows = await conn.execute(
        text(
            "INSERT INTO events (event_id, profile_id, type, name, occurred_at, source, properties, traits, "
            "consent, id_keys) SELECT event_id, profile_id, type, name, occurred_at, source, properties, traits, "
            "consent, id_keys FROM json_populate_recordset(NULL::events, CAST(:rows AS json)) "
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        ),
        {"rows": convert.to_json([
            {"event_id": e.event_id, "profile_id": e.profile_id, "type": e.type, "name": e.name,
             "occurred_at": e.occurred_at, "source": e.source, "properties": dict(e.properties),
             "traits": dict(e.traits), "consent": dict(e.consent),
             "id_keys": [id_key(t, v) for t, v in e.identifiers]}
            for e in events
        ])},
    )
    return {r.event_id for r in rows}


async def unrecorded(conn: AsyncConnection, event_ids: Sequence[str]) -> set[str]:
    """The ids not on the timeline yet (what `record_events` would add)."""
    if not event_ids:
        return set()
    rows = await conn.execute(text("SELECT event_id FROM events WHERE event_id = ANY(:ids)"), {"ids": list(event_ids)})
    return set(event_ids) - {r.event_id for r in rows}


_TIMELINE_COLUMNS = (
    "event_id", "profile_id", "type", "name", "occurred_at", "source", "properties", "traits", "consent", "id_keys",
)


def timeline_record(e: Recorded, profile_id: str) -> tuple[Any, ...]:
    """An event as a timeline row for `copy_timeline`, on `profile_id`'s timeline."""
    return (
        e.event_id, profile_id, e.type, e.name, e.occurred_at, e.source, convert.to_json(dict(e.properties)),
        convert.to_json(dict(e.traits)), convert.to_json(dict(e.consent)), [id_key(t, v) for t, v in e.identifiers],
    )


async def copy_identifiers(conn: AsyncConnection, owners: Sequence[tuple[tuple[str, str], str]]) -> None:
    """`claim_identifiers` with COPY, for identifiers the table does not hold (a rebuild's)."""
    if owners:
        await _copy(conn, "identifiers", [(t, v, p) for (t, v), p in owners], ("id_type", "id_value", "profile_id"))


async def copy_timeline(conn: AsyncConnection, records: Sequence[tuple[Any, ...]]) -> None:
    """Adds timeline rows with COPY (a duplicate event id fails it: for a table only the caller
    fills, as a rebuild's). The connection's transaction must have begun (a statement ran in it)."""
    if records:
        await _copy(conn, "events", records, _TIMELINE_COLUMNS)


async def _copy(conn: AsyncConnection, table: str, records: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
    """COPY through the connection's asyncpg connection, in its transaction (begun by a statement)."""
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    await raw.copy_records_to_table(table, records=records, columns=list(columns))


def _recorded(row: Any) -> Recorded:
    return Recorded(
        event_id=row.event_id, profile_id=row.profile_id, type=row.type, name=row.name,
        occurred_at=row.occurred_at, source=row.source, properties=row.properties, traits=row.traits,
        consent=row.consent, identifiers=[(t, v) for t, _, v in (k.partition("=") for k in row.id_keys)],
    )


_TIMELINE = (
    "SELECT event_id, profile_id, type, name, occurred_at, source, properties, traits, consent, id_keys "
    "FROM events"
)


async def timeline(conn: AsyncConnection, profile_id: str) -> list[Recorded]:
    """Every event of a profile: what a profile is recomputed from."""
    rows = await conn.execute(text(f"{_TIMELINE} WHERE profile_id = :p ORDER BY occurred_at, event_id"),
                              {"p": profile_id})
    return [_recorded(r) for r in rows]


async def timeline_page(
    conn: AsyncConnection, profile_id: str, *, before: tuple[datetime, str] | None, limit: int,
    type_: str = "", name: str = "",
) -> list[Recorded]:
    """Newest first, strictly older than `before` (time, event id) when given."""
    where = ["profile_id = :p"]
    params: dict[str, Any] = {"p": profile_id, "n": limit}
    if before is not None:
        where.append("(occurred_at, event_id) < (:at, :e)")
        params.update(at=before[0], e=before[1])
    if type_:
        where.append("type = :type")
        params["type"] = type_
    if name:
        where.append("name = :name")
        params["name"] = name
    rows = await conn.execute(
        text(f"{_TIMELINE} WHERE {' AND '.join(where)} ORDER BY occurred_at DESC, event_id DESC LIMIT :n"), params
    )
    return [_recorded(r) for r in rows]


async def move_split(conn: AsyncConnection, source: str, new: str, keys: Sequence[tuple[str, str]]) -> int:
    """Moves the split-off identifiers and every event that came through one of them."""
    params = {"s": source, "n": new, "keys": [id_key(t, v) for t, v in keys]}
    await conn.execute(
        text(
            "UPDATE identifiers SET profile_id = :n WHERE profile_id = :s "
            "AND (id_type || '=' || id_value) = ANY(:keys)"
        ),
        params,
    )
    result = await conn.execute(
        text("UPDATE events SET profile_id = :n WHERE profile_id = :s AND id_keys && CAST(:keys AS text[])"),
        params,
    )
    return int(result.rowcount)


async def identifiers_of(conn: AsyncConnection, profile_id: str) -> frozenset[tuple[str, str]]:
    rows = await conn.execute(
        text("SELECT id_type, id_value FROM identifiers WHERE profile_id = :p"), {"p": profile_id}
    )
    return frozenset((r.id_type, r.id_value) for r in rows)


async def retire(conn: AsyncConnection, merged_ids: Sequence[str], survivor_id: str) -> None:
    """Merged-away profiles point at the survivor; their history moves with them."""
    params = {"m": list(merged_ids), "s": survivor_id}
    await mark_merged(conn, dict.fromkeys(merged_ids, survivor_id))
    await conn.execute(text("UPDATE events SET profile_id = :s WHERE profile_id = ANY(:m)"), params)
    await conn.execute(text("UPDATE identifiers SET profile_id = :s WHERE profile_id = ANY(:m)"), params)


async def mark_merged(conn: AsyncConnection, survivors: Mapping[str, str]) -> None:
    """Merged-away profiles (id -> survivor) point at their survivors; their rows keep the rest."""
    if survivors:
        await conn.execute(
            text(
                "INSERT INTO profiles (profile_id, merged_into) "
                "SELECT * FROM unnest(CAST(:m AS text[]), CAST(:s AS text[])) "
                "ON CONFLICT (profile_id) DO UPDATE SET merged_into = EXCLUDED.merged_into, updated_at = now()"
            ),
            {"m": list(survivors), "s": list(survivors.values())},
        )


async def move_history(conn: AsyncConnection, survivors: Mapping[str, str]) -> None:
    """Timeline rows and identifiers of merged-away profiles (id -> survivor) go to their survivors,
    in one statement per table (a join, for many at once: `retire` moves one merge's)."""
    params = {"m": list(survivors), "s": list(survivors.values())}
    for table in ("events", "identifiers"):
        await conn.execute(
            text(
                f"UPDATE {table} t SET profile_id = m.survivor "
                "FROM unnest(CAST(:m AS text[]), CAST(:s AS text[])) AS m(merged, survivor) WHERE t.profile_id = m.merged"
            ),
            params,
        )


async def current_id(conn: AsyncConnection, profile_id: str) -> str | None:
    """Follows merges to the live profile."""
    for _ in range(100):
        row = (
            await conn.execute(
                text("SELECT merged_into FROM profiles WHERE profile_id = :p"), {"p": profile_id}
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
            text("SELECT profile_id FROM identifiers WHERE id_type = :t AND id_value = :v"),
            {"t": id_type, "v": value},
        )
    ).first()
    return None if row is None else str(row.profile_id)


# --- models and scores -------------------------------------------------------------------------


async def models(conn: AsyncConnection) -> Models:
    rows = (await conn.execute(text("SELECT name, params, computed_at FROM models"))).all()
    return Models.from_rows({r.name: r.params for r in rows}, max((r.computed_at for r in rows), default=None))


async def models_version(conn: AsyncConnection) -> datetime | None:
    row = (await conn.execute(text("SELECT max(computed_at) FROM models"))).scalar()
    return row if isinstance(row, datetime) else None


async def save_models(conn: AsyncConnection, built: Models) -> None:
    rows = built.to_rows()
    await conn.execute(
        text(
            "INSERT INTO models (name, params, computed_at) SELECT n, p::jsonb, :at "
            "FROM unnest(CAST(:n AS text[]), CAST(:p AS text[])) AS u(n, p) "
            "ON CONFLICT (name) DO UPDATE SET params = EXCLUDED.params, computed_at = EXCLUDED.computed_at"
        ),
        {"n": list(rows), "p": [convert.to_json(v) for v in rows.values()], "at": built.computed_at},
    )


_INPUTS = (
    "SELECT profile_id, order_count, (revenue - refunded)::float8 AS monetary, first_order_at, last_order_at, "
    "first_seen_at, categories, lifecycle_stage, frequency_falling, rfm_recency, rfm_frequency, rfm_monetary, "
    "rfm_cell, churn_label, next_best_offer FROM profiles WHERE merged_into IS NULL"
)


def _inputs(row: Any) -> Inputs:
    return Inputs(row.order_count, row.monetary, row.first_order_at, row.last_order_at, row.first_seen_at,
                  row.categories)


def _stored_key(row: Any) -> tuple[Any, ...] | None:
    """The stored scores as Scores.key() gives them; None if never scored."""
    if row.lifecycle_stage is None:
        return None
    rfm = None if row.rfm_cell is None else (row.rfm_recency, row.rfm_frequency, row.rfm_monetary, row.rfm_cell)
    return (rfm, row.churn_label, row.next_best_offer, row.lifecycle_stage, row.frequency_falling)


async def has_customers(conn: AsyncConnection) -> bool:
    """Whether any live profile has an order."""
    return bool((await conn.execute(
        text("SELECT EXISTS (SELECT 1 FROM profiles WHERE order_count > 0 AND merged_into IS NULL)")
    )).scalar())


Scanned = list[tuple[str, Inputs, tuple[Any, ...] | None]]


async def scoring_base(conn: AsyncConnection, customers_only: bool = False, chunk: int = 500) -> AsyncIterator[Scanned]:
    """Every live profile's id, score inputs and stored scores, streamed (a server-side cursor) in
    lists of `chunk`: memory stays bounded whatever the base."""
    query = _INPUTS + (" AND order_count > 0" if customers_only else "")
    result = await conn.stream(text(query), execution_options={"yield_per": chunk})
    async for rows in result.partitions(chunk):
        yield [(row.profile_id, _inputs(row), _stored_key(row)) for row in rows]


# --- search ------------------------------------------------------------------------------------

_READS = "CASE WHEN email_deliveries > 0 THEN email_deliveries ELSE email_sends END"
_FIELD_SQL = {
    "order_count": "order_count", "revenue": "revenue",
    "average_order_value": "CASE WHEN order_count > 0 THEN revenue / order_count END",
    "first_order_at": "first_order_at", "last_order_at": "last_order_at",
    "days_since_last_order": "EXTRACT(EPOCH FROM (CAST(:now AS timestamptz) - last_order_at)) / 86400",
    "average_order_interval_days": (
        "CASE WHEN order_count > 1 THEN EXTRACT(EPOCH FROM (last_order_at - first_order_at)) / 86400 "
        "/ (order_count - 1) END"
    ),
    "purchase_frequency_falling": "frequency_falling",
    "refund_count": "refund_count", "refunded_amount": "refunded",
    "email_open_rate": f"CASE WHEN {_READS} > 0 THEN LEAST(1.0, email_opens::float8 / {_READS}) END",
    "email_click_rate": f"CASE WHEN {_READS} > 0 THEN LEAST(1.0, email_clicks::float8 / {_READS}) END",
    "last_email_open_at": "last_open_at", "last_email_click_at": "last_click_at",
    "loyalty_tier": "loyalty_tier", "loyalty_points": "loyalty_points", "open_tickets": "open_tickets",
    "lifecycle_stage": "lifecycle_stage", "rfm_recency": "rfm_recency", "rfm_frequency": "rfm_frequency",
    "rfm_monetary": "rfm_monetary", "rfm_cell": "rfm_cell", "churn_risk": "churn_risk",
    "churn_label": "churn_label", "next_best_offer": "next_best_offer",
    "event_count": "event_count", "first_seen_at": "first_seen_at", "last_seen_at": "last_seen_at",
}
_FIELD_SQL["aov"] = _FIELD_SQL["average_order_value"]
_COMPARE = {"eq": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_CAST = {search.NUMBER: "double precision", search.TEXT: "text", search.BOOL: "boolean",
         search.TIME: "timestamptz"}


def _condition(f: search.Filter, i: int, params: dict[str, Any]) -> str:
    p = f"v{i}"
    if f.kind == search.JSON:
        params[f"path{i}"] = f.path
        target = f"traits #> CAST(:path{i} AS text[])"
    elif f.field.startswith("consents."):
        params[f"path{i}"] = f.path[0]
        target = f"(registers -> 'consents' -> CAST(:path{i} AS text) ->> 1)::boolean"
    else:
        target = f"({_FIELD_SQL[f.field]})"
    if f.op == "exists":
        return f"COALESCE(jsonb_typeof({target}), 'null') <> 'null'" if f.kind == search.JSON else f"{target} IS NOT NULL"
    if f.kind == search.JSON:
        params[p] = convert.to_json(f.value)
        value = f"CAST(:{p} AS jsonb)"
        if f.op == "eq":
            return f"{target} = {value}"
        if f.op == "neq":
            return f"{target} IS DISTINCT FROM {value}"
        if f.op == "contains":
            within = f"(jsonb_typeof({target}) = 'array' AND {target} @> jsonb_build_array({value}))"
            if not isinstance(f.value, str):
                return within
            params[f"s{i}"] = f.value
            return f"((jsonb_typeof({target}) = 'string' AND strpos({target} #>> '{{}}', :s{i}) > 0) OR {within})"
        return f"(jsonb_typeof({target}) = jsonb_typeof({value}) AND {target} {_COMPARE[f.op]} {value})"
    params[p] = f.value
    value = f"CAST(:{p} AS {_CAST[f.kind]})"
    if f.kind == search.NUMBER:
        target = f"CAST({target} AS double precision)"
    if f.op == "neq":
        return f"{target} IS DISTINCT FROM {value}"
    if f.op == "contains":
        return f"strpos({target}, {value}) > 0"
    return f"{target} {_COMPARE[f.op]} {value}"


async def search_ids(
    conn: AsyncConnection, filters: Sequence[search.Filter], *, after: str, limit: int, now: datetime
) -> list[str]:
    """Live profile ids matching every filter, in id order, after `after`."""
    params: dict[str, Any] = {"after": after, "n": limit}
    if any(f.field == "days_since_last_order" for f in filters):
        params["now"] = now
    where = ["merged_into IS NULL", "profile_id > :after"]
    where += [_condition(f, i, params) for i, f in enumerate(filters)]
    rows = await conn.execute(
        text(f"SELECT profile_id FROM profiles WHERE {' AND '.join(where)} ORDER BY profile_id LIMIT :n"),
        params,
    )
    return [r.profile_id for r in rows]
