"""convert's Timestamp arithmetic against protobuf's own (slower) conversions, over Timestamp's range."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from cdp_common import convert

FIRST, LAST = -62_135_596_800, 253_402_300_799  # 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z


@given(st.integers(FIRST, LAST), st.integers(0, 999_999_999))
def test_a_timestamp_reads_as_protobuf_reads_it(seconds: int, nanos: int) -> None:
    ts = Timestamp(seconds=seconds, nanos=nanos)
    expected = ts.ToDatetime(tzinfo=UTC) if seconds or nanos else None
    assert convert.to_datetime(ts) == expected


@given(st.datetimes(timezones=st.one_of(st.none(), st.timezones())))
def test_a_time_is_written_as_protobuf_writes_it(moment: datetime) -> None:
    ours, theirs = Timestamp(), Timestamp()
    try:
        theirs.FromDatetime(moment)
    except (ValueError, OverflowError):
        return  # outside Timestamp's range once in UTC: protobuf refuses it, and so does the reader
    convert.set_timestamp(ours, moment)
    assert ours == theirs


@pytest.mark.parametrize(("seconds", "nanos"), [(LAST + 1, 0), (FIRST - 1, 0), (5, -1), (5, 1_000_000_000)])
def test_a_timestamp_outside_the_range_is_refused(seconds: int, nanos: int) -> None:
    with pytest.raises((ValueError, OverflowError)):
        convert.to_datetime(Timestamp(seconds=seconds, nanos=nanos))


def test_an_offset_is_kept_and_none_clears() -> None:
    ts = Timestamp()
    convert.set_timestamp(ts, datetime(2026, 1, 2, 8, 0, tzinfo=timezone(timedelta(hours=5))))
    assert convert.to_datetime(ts) == datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    convert.set_timestamp(ts, None)
    assert not ts.ByteSize()
