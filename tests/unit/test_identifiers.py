"""cdp_common.identifiers: the matching form of an identifier and the hashed email."""

from __future__ import annotations

import hashlib

import pytest

from cdp_common import identifiers as ids


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.parametrize(
    ("id_type", "raw", "expected"),
    [
        ("email", "  Ada.Lovelace@Example.COM \n", "ada.lovelace@example.com"),
        ("email", "ada@example.com", "ada@example.com"),
        ("phone", "+44 (20) 7946-0958", "+442079460958"),
        ("phone", "(415) 555-2671", "+14155552671"),
        ("user_id", "  u-42 ", "u-42"),
        ("user_id", "User-42", "User-42"),  # user ids keep their case
        ("anonymous_id", "anon-1", "anon-1"),
        ("email_sha256", " " + "AB" * 32 + " ", "ab" * 32),
    ],
)
def test_normalise_gives_the_matching_form(id_type: str, raw: str, expected: str) -> None:
    assert ids.normalise(id_type, raw) == expected


@pytest.mark.parametrize(
    "junk",
    ["", "   ", "null", "NULL", "Null", "none", "nil", "undefined", "anonymous", "Anonymous",
     "unknown", "n/a", "N/A", "nan", "NaN", "-1", "0", "0000", "00000000", "-", "--", " null "],
)
@pytest.mark.parametrize("id_type", ["user_id", "anonymous_id", "device_id", "loyalty_id"])
def test_junk_values_never_link(id_type: str, junk: str) -> None:
    assert ids.normalise(id_type, junk) is None


@pytest.mark.parametrize("junk", ["0000", "000-000", "  0 ", ""])
def test_junk_phone_numbers_never_link(junk: str) -> None:
    assert ids.normalise("phone", junk) is None


@pytest.mark.parametrize("not_email", ["null", "ada.example.com", "", "   ", "anonymous"])
def test_email_without_at_sign_never_links(not_email: str) -> None:
    assert ids.normalise("email", not_email) is None


@pytest.mark.parametrize("bad_hash", ["abc", "g" * 64, "a" * 63, "a" * 65, "null"])
def test_hashed_identifier_must_be_64_hex(bad_hash: str) -> None:
    assert ids.normalise("email_sha256", bad_hash) is None


@pytest.mark.parametrize("value", ["1", "10", "-12", "nullable", "anonymous-7", "0001"])
def test_real_values_resembling_junk_are_kept(value: str) -> None:
    assert ids.normalise("user_id", value) == value


@pytest.mark.parametrize(
    "email", ["ada@example.com", "  ADA@Example.com", "Ada@EXAMPLE.COM\t", "ĀDA@exämple.com"]
)
def test_email_sha256_hashes_the_trimmed_lower_cased_email(email: str) -> None:
    assert ids.email_sha256(email) == hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()


def test_email_sha256_matches_for_every_spelling_of_one_address() -> None:
    spellings = ["ada@example.com", " Ada@Example.com ", "ADA@EXAMPLE.COM"]
    assert {ids.email_sha256(s) for s in spellings} == {_sha("ada@example.com")}


def test_email_sha256_known_vector() -> None:
    # What ad platforms compute for "test@example.com".
    assert ids.email_sha256(" Test@Example.com ") == (
        "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
    )


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("loyalty_id", True),
        ("crm_id", True),
        ("email_sha256", True),
        ("a", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("Loyalty", False),
        ("1crm", False),
        ("crm-id", False),
        ("", False),
        ("email", False),  # built-in types are not custom names
        ("user_id", False),
        ("phone", False),
    ],
)
def test_valid_custom_type(name: str, valid: bool) -> None:
    assert ids.valid_custom_type(name) is valid


def test_custom_type_with_trailing_newline_is_invalid() -> None:
    assert not ids.valid_custom_type("loyalty_id\n")
