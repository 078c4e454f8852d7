"""cdp_dmp.core: conversion files in, audience files out."""

from __future__ import annotations

import csv
import hashlib
import io
from datetime import UTC, datetime, timedelta

import pytest

from cdp_dmp.core import Conversion, InvalidFile, audience_csv, check_platform, parse_conversions

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
HEADER = "conversion_id,email_sha256,event,value,currency,occurred_at"
H1 = hashlib.sha256(b"ada@example.com").hexdigest()
H2 = hashlib.sha256(b"bob@example.com").hexdigest()
WHEN = "2024-05-30T10:00:00Z"


def csv_bytes(*rows: str, header: str = HEADER) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def error_of(data: bytes) -> str:
    with pytest.raises(InvalidFile) as caught:
        parse_conversions(data, NOW)
    return str(caught.value)


# --- parse_conversions -------------------------------------------------------------------------


def test_a_valid_file_parses_every_row() -> None:
    rows = parse_conversions(csv_bytes(
        f"c-1,{H1},Purchase,19.99,EUR,{WHEN}",
        f"c-2,{H2.upper()},,,,2024-05-31T08:30:00+02:00",
    ), NOW)
    assert rows == [
        Conversion("c-1", H1, "Purchase", 19.99, "EUR", datetime(2024, 5, 30, 10, tzinfo=UTC)),
        # Defaults: Order Completed, value 0, USD; digests are compared lower-case.
        Conversion("c-2", H2, "Order Completed", 0.0, "USD", datetime(2024, 5, 31, 6, 30, tzinfo=UTC)),
    ]


def test_columns_may_come_in_any_order_with_extras_and_a_bom() -> None:
    data = "\ufeffnote,occurred_at,currency,value,event,email_sha256,conversion_id\n" \
           f"hi,{WHEN},eur,5,Lead,{H1},c-9\n"
    [row] = parse_conversions(data.encode(), NOW)
    assert (row.conversion_id, row.email_sha256, row.currency, row.value, row.event) == ("c-9", H1, "EUR", 5.0, "Lead")


def test_a_time_without_zone_is_utc() -> None:
    [row] = parse_conversions(csv_bytes(f"c-1,{H1},,1,USD,2024-05-30T10:00:00"), NOW)
    assert row.occurred_at == datetime(2024, 5, 30, 10, tzinfo=UTC)


def test_values_and_ids_are_trimmed() -> None:
    [row] = parse_conversions(csv_bytes(f" c-1 , {H1} , Lead , 2.5 , gbp , {WHEN} "), NOW)
    assert (row.conversion_id, row.email_sha256, row.event, row.value, row.currency) == ("c-1", H1, "Lead", 2.5, "GBP")


GOOD = f"c-1,{H1},,1,USD,{WHEN}"


@pytest.mark.parametrize(
    ("bad_row", "column"),
    [
        (f",{H1},,1,USD,{WHEN}", "conversion_id"),
        (f"c 1,{H1},,1,USD,{WHEN}", "conversion_id"),
        (f"{'c' * 101},{H1},,1,USD,{WHEN}", "conversion_id"),
        (f"c-2,,,1,USD,{WHEN}", "email_sha256"),
        (f"c-2,ada@example.com,,1,USD,{WHEN}", "email_sha256"),
        (f"c-2,{H1[:-1]},,1,USD,{WHEN}", "email_sha256"),
        (f"c-2,{H1},,ten,USD,{WHEN}", "value"),
        (f"c-2,{H1},,-1,USD,{WHEN}", "value"),
        (f"c-2,{H1},,1,EURO,{WHEN}", "currency"),
        (f"c-2,{H1},,1,€,{WHEN}", "currency"),
        (f"c-2,{H1},,1,USD,", "occurred_at"),
        (f"c-2,{H1},,1,USD,yesterday", "occurred_at"),
        (f"c-2,{H1},,1,USD,{(NOW + timedelta(hours=25)).isoformat()}", "occurred_at"),
        (f"c-2,{H1},,1,USD,{(NOW - timedelta(days=91)).isoformat()}", "occurred_at"),
    ],
)
def test_a_bad_row_fails_the_whole_file_naming_line_and_column(bad_row: str, column: str) -> None:
    # The bad row is the second data row: line 3 of the file, after the header and a good row.
    message = error_of(csv_bytes(GOOD, bad_row, GOOD.replace("c-1", "c-3")))
    assert message.startswith(f"csv line 3, column {column}: ")


def test_the_first_bad_row_is_the_one_reported() -> None:
    message = error_of(csv_bytes(GOOD, GOOD, f"x,{H1},,-5,USD,{WHEN}", f"y,bad,,1,USD,{WHEN}"))
    assert message.startswith("csv line 4, column value: ")


def test_times_just_inside_the_limits_are_accepted() -> None:
    recent = (NOW + timedelta(hours=23)).isoformat()
    old = (NOW - timedelta(days=89)).isoformat()
    rows = parse_conversions(csv_bytes(f"a,{H1},,1,USD,{recent}", f"b,{H1},,1,USD,{old}"), NOW)
    assert len(rows) == 2


def test_a_header_lacking_columns_names_them() -> None:
    message = error_of(csv_bytes(f"c-1,{H1},1", header="conversion_id,email_sha256,value"))
    assert message.startswith("csv: header lacks column(s) event, currency, occurred_at")


@pytest.mark.parametrize("data", [csv_bytes(), b"", HEADER.encode()])
def test_a_file_without_rows_is_refused(data: bytes) -> None:
    assert error_of(data).startswith("csv: ")


def test_a_file_that_is_not_utf8_is_refused() -> None:
    assert error_of(csv_bytes(f"c-1,{H1},Café,1,USD,{WHEN}").replace(b"Caf\xc3\xa9", b"Caf\xe9")) == (
        "csv: not UTF-8 text"
    )


def test_line_numbers_count_blank_lines() -> None:
    # header = line 1, good = line 2, blank = line 3, bad = line 4.
    data = f"{HEADER}\n{GOOD}\n\nc-2,bad,,1,USD,{WHEN}\n".encode()
    assert error_of(data).startswith("csv line 4, column email_sha256")


@pytest.mark.parametrize("value", ["nan", "inf", "NaN"])
def test_a_non_finite_value_is_refused(value: str) -> None:
    assert error_of(csv_bytes(f"c-1,{H1},,{value},USD,{WHEN}")).startswith("csv line 2, column value")


# --- audience_csv ------------------------------------------------------------------------------


def test_audience_csv_is_a_sorted_deduplicated_list_of_hashes() -> None:
    data = audience_csv([H2, H1, H2, H1])
    assert data == f"email_sha256\n{min(H1, H2)}\n{max(H1, H2)}\n".encode()


def test_an_empty_audience_is_just_the_header() -> None:
    assert audience_csv([]) == b"email_sha256\n"


def test_audience_csv_reads_back_with_a_csv_reader() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(50)]
    rows = list(csv.DictReader(io.StringIO(audience_csv(iter(hashes)).decode())))
    assert [r["email_sha256"] for r in rows] == sorted(hashes)


# --- check_platform ----------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["meta", "google-ads", "tiktok_2", "x"])
def test_valid_platforms(platform: str) -> None:
    assert check_platform(platform) == platform


@pytest.mark.parametrize("platform", ["", "Meta", "-meta", "meta ads", "m" * 42, "../etc"])
def test_invalid_platforms(platform: str) -> None:
    with pytest.raises(InvalidFile, match="^platform: "):
        check_platform(platform)
