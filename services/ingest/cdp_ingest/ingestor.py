"""Turns accepted events into envelopes and appends them to the log, reporting per event."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from cdp.v1 import event_pb2

from cdp_common import convert, eventlog, tracing
from cdp_common.settings import SettingsError
from cdp_ingest import core

log = structlog.get_logger("cdp.ingest")

OK, INVALID, UNAVAILABLE = "ok", "invalid", "unavailable"


@dataclass(frozen=True)
class Result:
    index: int
    event_id: str
    outcome: str
    error: str = ""
    field: str = ""
    sequence: int = 0
    duplicate: bool = False


class WriteKeys:
    """Write keys and the source each stands for, from CDP_WRITE_KEYS ("key=source,key2=source2").

    With none configured, ingest is open (for development) and the request's source is recorded.
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._keys = dict(keys)

    @classmethod
    def parse(cls, raw: str) -> WriteKeys:
        keys: dict[str, str] = {}
        for entry in filter(None, (part.strip() for part in raw.split(","))):
            key, sep, source = entry.partition("=")
            if not sep or not key.strip() or not source.strip():
                raise SettingsError(f"environment variable CDP_WRITE_KEYS: expected key=source, got {entry!r}")
            keys[key.strip()] = source.strip()
        return cls(keys)

    @property
    def open(self) -> bool:
        return not self._keys

    def source(self, key: str | None, fallback: str) -> str | None:
        """The source for a key; None when the key is unknown (the caller answers 401)."""
        if self.open:
            return fallback
        return self._keys.get(key or "")

    @staticmethod
    def from_basic(header: str | None) -> str | None:
        """The write key of an `Authorization: Basic base64(key:)` header."""
        if not header or not header.lower().startswith("basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0]


def envelope(
    accepted: core.Accepted, *, received_at: Timestamp, source: str, correlation_id: str,
    received_datetime: datetime | None = None,
) -> event_pb2.Event:
    """The stored form of an accepted event. `received_datetime` is the datetime `received_at`
    was made from: an event without a client time carries that very object as occurred_at."""
    event = event_pb2.Event(
        id=accepted.event_id,
        type=accepted.kind,
        name=accepted.name,
        source=source,
        correlation_id=correlation_id,
        identifiers=event_pb2.Identifiers(**accepted.ids, custom=accepted.custom),
        consent=accepted.consent,
    )
    event.received_at.CopyFrom(received_at)
    if accepted.occurred_at is received_datetime:
        event.occurred_at.CopyFrom(received_at)
    else:
        event.occurred_at.CopyFrom(eventlog.timestamp(accepted.occurred_at))
    convert.set_struct(event.properties, accepted.properties)
    convert.set_struct(event.traits, accepted.traits)
    convert.set_struct(event.context, accepted.context)
    return event


def build_event(
    item: core.Incoming, *, received_at: datetime, source: str, correlation_id: str = "",
    received_ts: Timestamp | None = None,
) -> event_pb2.Event:
    """The envelope of a valid item; InvalidField otherwise (including when it is too large)."""
    accepted = core.accept(item, received_at)
    event = envelope(accepted, received_at=received_ts or eventlog.timestamp(received_at), source=source,
                     correlation_id=correlation_id, received_datetime=received_at)
    if event.ByteSize() > core.MAX_EVENT_BYTES:
        raise core.InvalidField("event", f"larger than {core.MAX_EVENT_BYTES // 1024} KiB")
    return event


class Ingestor:
    def __init__(self, publisher: eventlog.Publisher, topology: eventlog.Topology) -> None:
        self._publisher = publisher
        self._topology = topology

    async def ingest(
        self, items: Sequence[core.Incoming | core.InvalidField], *, source: str, correlation_id: str,
        trace: tracing.Trace = tracing.NO_TRACE,
    ) -> list[Result]:
        """Stores every valid item (pipelined) and reports each by index; never half-reports.

        `source` is the write key's; an item's own source counts only when keys are open. `trace`
        (the request's trace context) is stamped on every event.
        """
        received_at = eventlog.now()
        received_ts = eventlog.timestamp(received_at)
        results: list[Result | None] = [None] * len(items)
        outgoing: list[tuple[int, eventlog.Outgoing]] = []
        for index, item in enumerate(items):
            try:
                if isinstance(item, core.InvalidField):
                    raise item
                event = build_event(item, received_at=received_at, source=item.source or source,
                                    correlation_id=correlation_id, received_ts=received_ts)
                tracing.stamp(event, trace)
            except core.InvalidField as error:
                event_id = item.event_id if isinstance(item, core.Incoming) else ""
                results[index] = Result(index, event_id, INVALID, str(error), error.field)
                continue
            outgoing.append((index, eventlog.Outgoing(self._topology.collected(event.type), event)))
        if outgoing:
            try:
                stored = await self._publisher.publish_events([o for _, o in outgoing])
            except eventlog.LOG_UNAVAILABLE as error:
                log.warning("log_unavailable", error=repr(error), events=len(outgoing))
                for index, o in outgoing:
                    results[index] = Result(
                        index, o.event.id, UNAVAILABLE, "the event log is unavailable; retry with the same event_id (messageId)"
                    )
            else:
                for (index, o), s in zip(outgoing, stored, strict=True):
                    results[index] = Result(index, o.event.id, OK, sequence=s.sequence, duplicate=s.duplicate)
        done = [r for r in results if r is not None]
        assert len(done) == len(items)
        return done
