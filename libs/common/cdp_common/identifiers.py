"""Identifier normalisation and hashing, the one place every service takes them from."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence

import phonenumbers

# Values sources send when they have nothing; they must never link two customers.
BLOCKED_VALUES = re.compile(r"^([0-]*|-1|null|none|nil|undefined|anonymous|unknown|n/a|nan)$", re.I)

TYPES = ("user_id", "email", "phone", "anonymous_id", "device_id")
_CUSTOM_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def nul_in(**fields: str | Sequence[str]) -> str | None:
    """The first named field holding U+0000 (PostgreSQL text refuses it), for an error to name."""
    for name, value in fields.items():
        if any("\x00" in v for v in ([value] if isinstance(value, str) else value)):
            return name
    return None


def valid_custom_type(name: str) -> bool:
    return bool(_CUSTOM_TYPE.fullmatch(name)) and name not in TYPES


def normalise_email(value: str) -> str:
    return value.strip().lower()


def normalise_phone(value: str, region: str = "US") -> str | None:
    """E.164 (+4420...), read with `region` when the number has no country code; None if it is
    not a possible number (too short, all zeros, letters...)."""
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number) or not str(number.national_number).strip("0"):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def email_sha256(email: str) -> str:
    """SHA-256 of the trimmed, lower-cased email, as ad platforms match on."""
    return sha256_hex(normalise_email(email))


@functools.lru_cache(maxsize=64)
def _any_of(blocked: tuple[re.Pattern[str], ...]) -> re.Pattern[str]:
    """One pattern that fully matches what any of `blocked` fully matches (one regex call, not N)."""
    if not blocked:
        return re.compile(r"(?!)")
    return re.compile("|".join(f"(?{'i' if p.flags & re.IGNORECASE else ''}:{p.pattern})" for p in blocked))


def normalise(
    id_type: str, value: str, blocked: Sequence[re.Pattern[str]] = (BLOCKED_VALUES,), phone_region: str = "US"
) -> str | None:
    """The matching form of an identifier, or None when it must not link anything."""
    if "\x00" in value or "\x00" in id_type:  # PostgreSQL text cannot hold U+0000
        return None
    junk = _any_of(tuple(blocked))
    value = value.strip()
    if junk.fullmatch(value):
        return None
    if id_type == "email":
        value = normalise_email(value)
        if "@" not in value:
            return None
    elif id_type == "phone":
        phone = normalise_phone(value, phone_region)
        if phone is None:
            return None
        value = phone
    elif id_type.endswith("_sha256"):
        value = value.lower()
        if not _HEX64.fullmatch(value):
            return None
    if junk.fullmatch(value):
        return None
    return value
