"""What makes an incoming event acceptable; pure, no I/O."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from cdp_common.identifiers import valid_custom_type

MAX_ID_LENGTH = 256
MAX_NAME_LENGTH = 200
MAX_FIELDS = 500
MAX_FUTURE = timedelta(hours=24)
MAX_PAST = timedelta(days=365 * 5)
_EVENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class InvalidField(ValueError):
    """A request field is missing or malformed; `field` names it for the caller."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def event_id(requested: str, new_id: str | None = None) -> str:
    """The client's id (kept so a retry is deduplicated) or a new one."""
    if not requested:
        return new_id or str(uuid.uuid4())
    if not _EVENT_ID.fullmatch(requested):
        raise InvalidField("event_id", "must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    return requested


def check_identifiers(ids: Mapping[str, str], custom: Mapping[str, str]) -> None:
    """Segment's rule: every event names the user (user_id) or the visitor (anonymous_id)."""
    for name, value in [*ids.items(), *(("custom." + k, v) for k, v in custom.items())]:
        if len(value) > MAX_ID_LENGTH:
            raise InvalidField(f"identifiers.{name}", f"longer than {MAX_ID_LENGTH} characters")
        if value != value.strip():
            raise InvalidField(f"identifiers.{name}", "has leading or trailing whitespace")
    for name in custom:
        if not valid_custom_type(name):
            raise InvalidField(
                f"identifiers.custom.{name}", "custom id names are lower-case snake_case, not a built-in type"
            )
    if not ids.get("user_id") and not ids.get("anonymous_id"):
        raise InvalidField("identifiers", "user_id or anonymous_id is required")
    email = ids.get("email", "")
    if email and "@" not in email:
        raise InvalidField("identifiers.email", "is not an email address")


def check_name(name: str) -> str:
    if not name.strip():
        raise InvalidField("event", "is required")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidField("event", f"longer than {MAX_NAME_LENGTH} characters")
    return name.strip()


def check_fields(field: str, values: Mapping[str, Any]) -> None:
    if len(values) > MAX_FIELDS:
        raise InvalidField(field, f"more than {MAX_FIELDS} entries")


def occurred_at(client_time: datetime | None, received_at: datetime) -> datetime:
    """The client's time if plausible; the receive time when the client gave none."""
    if client_time is None:
        return received_at
    if client_time - received_at > MAX_FUTURE:
        raise InvalidField("timestamp", "is more than 24 hours in the future")
    if received_at - client_time > MAX_PAST:
        raise InvalidField("timestamp", "is more than 5 years in the past")
    return client_time


def email_from_traits(ids: Mapping[str, str], traits: Mapping[str, Any]) -> str:
    """Segment sends the email as a trait; it is also an identifier."""
    email = ids.get("email") or traits.get("email") or ""
    return email.strip() if isinstance(email, str) else ""
