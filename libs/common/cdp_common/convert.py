"""Conversions between protobuf well-known types and plain Python values (edge helper).

Per-message Python overhead is this platform's ceiling, so these avoid json_format: reading a
Struct field by field is about twice as fast, and copying a Struct whole is a C-level copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

# JSON text for PostgreSQL jsonb and the log, several times faster than the json module. NaN and
# infinity become null (jsonb refuses them); non-text keys become text; U+0000, which jsonb and
# text refuse too (a gRPC client may put it in a Struct), becomes U+FFFD, the replacement character.
from_json = orjson.loads
# The escape of U+0000, not a literal backslash followed by "u0000" (an even number of backslashes).
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def to_json(value: Any) -> str:
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    return _NUL_ESCAPE.sub(r"\1\\ufffd", text) if "\\u0000" in text else text


def value_to_python(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: value_to_python(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [value_to_python(item) for item in value.list_value.values]
    return None


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    return {key: value_to_python(item) for key, item in struct.fields.items()}


def dict_to_struct(values: Mapping[str, Any]) -> Struct:
    struct = Struct()
    set_struct(struct, values)
    return struct


def set_struct(target: Struct, values: Mapping[str, Any]) -> None:
    """Fills `target`; a StructView is copied whole instead of converted value by value."""
    if isinstance(values, StructView):
        target.CopyFrom(values.struct)
    elif values:
        target.update(values)


class StructView(Mapping[str, Any]):
    """A read-only Mapping over a Struct that converts only the values it is asked for."""

    __slots__ = ("struct",)

    def __init__(self, struct: Struct) -> None:
        self.struct = struct

    def __getitem__(self, key: str) -> Any:
        if key not in self.struct.fields:
            raise KeyError(key)
        return value_to_python(self.struct.fields[key])

    def __contains__(self, key: object) -> bool:
        return key in self.struct.fields

    def get(self, key: str, default: Any = None) -> Any:
        fields = self.struct.fields
        return value_to_python(fields[key]) if key in fields else default

    def __iter__(self) -> Iterator[str]:
        return iter(self.struct.fields)

    def __len__(self) -> int:
        return len(self.struct.fields)


# Timestamp.ToDatetime and FromDatetime are pure Python and several times slower than the
# arithmetic below; every event goes through them a few times.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_datetime(ts: Timestamp) -> datetime | None:
    """The time in UTC; None for an unset Timestamp. ValueError or OverflowError outside
    Timestamp's range (years 1-9999, nanos 0 to 999,999,999)."""
    seconds, nanos = ts.seconds, ts.nanos
    if seconds == 0 and nanos == 0:
        return None
    if not 0 <= nanos < 1_000_000_000:
        raise ValueError(f"Timestamp nanos {nanos} outside 0 to 999,999,999")
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def set_timestamp(target: Timestamp, moment: datetime | None) -> None:
    """Sets `target` to `moment` (a naive one is taken as UTC, as FromDatetime does); clears it for None."""
    if moment is None:
        target.Clear()
        return
    delta = (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)) - _EPOCH
    target.seconds = delta.days * 86400 + delta.seconds
    target.nanos = delta.microseconds * 1000
