"""Audience files and conversion files: their formats and validation. Pure."""

from __future__ import annotations

import csv
import math
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

CONVERSION_COLUMNS = ("conversion_id", "email_sha256", "event", "value", "currency", "occurred_at")
MAX_CONVERSIONS = 100_000
# Ad platforms keep conversions for weeks, not months (Meta's API takes 7 days); older rows are a mistake.
MAX_CONVERSION_AGE = timedelta(days=90)
# As ingest limits event names (the conversions become track events on the same log).
MAX_EVENT_NAME = 200
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PLATFORM = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
_CONVERSION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class InvalidFile(ValueError):
    """The file is malformed; the message names the line and column."""


@dataclass(frozen=True)
class Conversion:
    conversion_id: str
    email_sha256: str
    event: str
    value: float
    currency: str
    occurred_at: datetime


def audience_csv(hashes: Iterable[str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["email_sha256"])
    for digest in sorted(set(hashes)):
        writer.writerow([digest])
    return out.getvalue().encode()


def check_platform(platform: str) -> str:
    if not _PLATFORM.fullmatch(platform):
        raise InvalidFile("platform: must be 1-41 lower-case letters, digits, '-' or '_'")
    return platform


def parse_conversions(data: bytes, now: datetime) -> list[Conversion]:
    """Every row or none: the first bad row fails the whole file, naming line and column."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidFile("csv: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    rows: list[Conversion] = []
    try:
        missing = [c for c in CONVERSION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InvalidFile(f"csv: header lacks column(s) {', '.join(missing)}; expected {','.join(CONVERSION_COLUMNS)}")
        for row in reader:
            if len(rows) >= MAX_CONVERSIONS:
                raise InvalidFile(f"csv: more than {MAX_CONVERSIONS} rows; split the file")
            rows.append(_conversion(reader.line_num, row, now))
    except csv.Error as error:  # a NUL byte, a field over the csv module's limit (128 KiB), ...
        raise InvalidFile(f"csv line {reader.line_num}: {error}") from None
    if not rows:
        raise InvalidFile("csv: no conversion rows")
    return rows


def _conversion(line: int, row: dict[str, str], now: datetime) -> Conversion:
    def bad(column: str, reason: str) -> InvalidFile:
        return InvalidFile(f"csv line {line}, column {column}: {reason}")

    conversion_id = (row.get("conversion_id") or "").strip()
    if not _CONVERSION_ID.fullmatch(conversion_id):
        raise bad("conversion_id", "1-100 letters, digits, '.', '_', ':' or '-' required")
    digest = (row.get("email_sha256") or "").strip().lower()
    if not _HEX64.fullmatch(digest):
        raise bad("email_sha256", "must be a SHA-256 hex digest (64 hex characters)")
    event = (row.get("event") or "").strip() or "Order Completed"
    if len(event) > MAX_EVENT_NAME:
        raise bad("event", f"longer than {MAX_EVENT_NAME} characters")
    try:
        value = float((row.get("value") or "0").strip() or "0")
    except ValueError:
        raise bad("value", f"not a number: {row.get('value')!r}") from None
    if not math.isfinite(value) or value < 0:
        raise bad("value", "must be a finite, non-negative number")
    currency = (row.get("currency") or "").strip().upper() or "USD"
    if not _CURRENCY.fullmatch(currency):
        raise bad("currency", "must be an ISO 4217 code such as EUR")
    raw_time = (row.get("occurred_at") or "").strip()
    try:
        occurred = datetime.fromisoformat(raw_time.replace("Z", "+00:00"))
    except ValueError:
        raise bad("occurred_at", f"not an RFC 3339 time: {raw_time!r}") from None
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    if occurred > now + timedelta(hours=24):
        raise bad("occurred_at", "is in the future")
    if now - occurred > MAX_CONVERSION_AGE:
        raise bad("occurred_at", "is more than 90 days old")
    return Conversion(conversion_id, digest, event, value, currency, occurred)
