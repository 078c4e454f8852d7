"""Conversions between protobuf well-known types and plain Python values (edge helper)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct)


def dict_to_struct(values: dict[str, Any]) -> Struct:
    struct = Struct()
    struct.update(values)
    return struct


def to_datetime(ts: Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def set_timestamp(target: Timestamp, moment: datetime | None) -> None:
    if moment is None:
        target.Clear()
    else:
        target.FromDatetime(moment)
