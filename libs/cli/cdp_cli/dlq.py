"""`cdp dlq`: list, show and re-drive the dead letters, read straight from JetStream.

A consumer dead-letters a message it cannot apply (consumer.py): a `dead_lettered` event on
`<root>.deadletter.<consumer>` in the DEADLETTER stream, carrying the original subject, stream
sequence, bytes, error and attempts. Re-driving one, once its cause is fixed, has to append a NEW
message to the original subject: the consumer skips everything at or below the stream sequence it
has applied, and the original has been passed. So the original bytes (the same event, so the
handlers' idempotence by event id still holds) are published with the original headers but a fresh
`Nats-Msg-Id` derived from the event id and the dead letter: re-driving the same letter twice, or
after a crash half-way, is dropped by JetStream's duplicate window.

A re-driven letter is then marked, not deleted: a small `dead_letter_redriven` event on
`<dead-letter subject>.redriven` names the letter and where its copy went. The log stays
append-only, `list` can show what was re-driven, when and as which message, and a letter is never
re-driven twice by accident (its marker is checked first; its id is derived from the letter, so a
marker written twice is dropped too). A copy that fails again is dead-lettered again as a new
letter, which can be re-driven in its turn.

Every durable consumer whose filter takes the original subject sees the copy, not only the one
that dead-lettered it. Handlers that are idempotent by event id are safe; others (e.g. those that
store a profile snapshot, which an old copy would roll back) are not, so `redrive` refuses when
another consumer would receive the copy, unless `--force`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from google.protobuf import json_format
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rich import box
from rich.console import Console
from rich.table import Table

from cdp.v1 import event_pb2
from cdp_cli import options
from cdp_common import convert, eventlog
from cdp_common.settings import SettingsError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 75
EXIT_INTERRUPTED = 130

MARKER_TYPE = "dead_letter_redriven"
MARKER_SUFFIX = "redriven"
REDRIVE_HEADER = "Cdp-Redrive-Of"
ERROR_WIDTH = 60
# Shown of a payload that is not a CDP event.
RAW_PREVIEW_BYTES = 4096
# Headers that belong to one publish, not to the event: never copied onto the re-driven message.
_PUBLISH_HEADERS = ("nats-msg-id", "nats-expected-", "nats-rollup", "nats-ttl")
_FETCH = 500
_TIMEOUT_SECONDS = 5.0


class DlqError(Exception):
    """What the operator asked for cannot be done (the message names why)."""


@dataclass(frozen=True)
class Marker:
    dead_letter_sequence: int
    stream: str
    stream_sequence: int
    at: datetime | None


@dataclass(frozen=True)
class Letter:
    """One dead letter: where it is in the DEADLETTER stream, and what failed where."""

    sequence: int
    at: datetime | None
    event_id: str
    consumer: str
    stream: str
    stream_sequence: int
    original_subject: str
    payload: bytes
    error: str
    attempts: int

    def original(self) -> event_pb2.Event | None:
        try:
            return eventlog.decode(self.payload)
        except Exception:  # noqa: BLE001 - any bytes that are not an event are shown raw
            return None


# Pure parts: names, parsing and rendering.


def letter_subjects(topology: eventlog.Topology, consumer: str | None) -> tuple[str, str]:
    """(dead letters, redrive markers) of one consumer, or of all."""
    letters = topology.deadletter(consumer or "*")
    return letters, f"{letters}.{MARKER_SUFFIX}"


def check_consumer(name: str) -> str:
    if not name or any(c in name for c in ".*> \t"):
        raise DlqError(f"--consumer {name!r}: a durable consumer name, e.g. identity-resolve")
    return name


def is_letter_subject(topology: eventlog.Topology, subject: str) -> bool:
    prefix = f"{topology.root}.deadletter."
    return subject.startswith(prefix) and "." not in subject[len(prefix):]


def parse_letter(sequence: int, subject: str, data: bytes, at: datetime | None,
                 topology: eventlog.Topology) -> Letter | None:
    """The dead letter stored at `sequence`, or None if that message is not one."""
    if not is_letter_subject(topology, subject):
        return None
    try:
        event = eventlog.decode(data)
    except Exception:  # noqa: BLE001 - not ours: not a dead letter
        return None
    if event.type != "dead_lettered":
        return None
    detail = event.dead_lettered
    return Letter(
        sequence=sequence, at=at, event_id=event.id, consumer=detail.consumer, stream=detail.stream,
        stream_sequence=detail.stream_sequence, original_subject=detail.original_subject,
        payload=detail.original_payload, error=detail.error, attempts=detail.attempts,
    )


def parse_marker(data: bytes, at: datetime | None) -> Marker | None:
    try:
        event = eventlog.decode(data)
        props = convert.struct_to_dict(event.properties)
        return Marker(int(props["dead_letter_sequence"]), str(props["stream"]), int(props["stream_sequence"]), at)
    except Exception:  # noqa: BLE001 - a malformed marker marks nothing
        return None


def redrive_id(letter: Letter, original: event_pb2.Event) -> str:
    """The re-driven copy's Nats-Msg-Id: new for the log, the same for every attempt at this letter."""
    return eventlog.derived_id(original.id, f"redrive:{letter.event_id}:{letter.sequence}")


def marker_event(letter: Letter, original: event_pb2.Event, stream: str, sequence: int) -> event_pb2.Event:
    marker = eventlog.new_event(
        MARKER_TYPE, event_id=eventlog.derived_id(f"{letter.event_id}:{letter.sequence}", MARKER_SUFFIX),
        source="cdp-dlq",
    )
    marker.correlation_id = original.correlation_id or original.id
    marker.causation_id = letter.event_id
    marker.properties.CopyFrom(convert.dict_to_struct({
        "dead_letter_sequence": letter.sequence, "consumer": letter.consumer, "subject": letter.original_subject,
        "stream": stream, "stream_sequence": sequence, "event_id": original.id,
    }))
    return marker


def redrive_headers(original: event_pb2.Event, stored: dict[str, str] | None, letter: Letter) -> dict[str, str]:
    """The original message's headers (rebuilt from the event if it is gone), with a new message id."""
    if stored:
        headers = {k: v for k, v in stored.items() if not k.lower().startswith(_PUBLISH_HEADERS)}
    else:
        headers = {k: v for k, v in eventlog.Outgoing("", original).headers().items() if k != eventlog.MSG_ID_HEADER}
    headers[eventlog.MSG_ID_HEADER] = redrive_id(letter, original)
    headers[REDRIVE_HEADER] = str(letter.sequence)
    return headers


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` the rest (at least one token)."""
    tokens, wanted = pattern.split("."), subject.split(".")
    for i, token in enumerate(tokens):
        if token == ">":
            return len(wanted) > i
        if i >= len(wanted) or token not in ("*", wanted[i]):
            return False
    return len(tokens) == len(wanted)


def _when(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at else ""


def _shorten(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def status(marker: Marker | None) -> str:
    if marker is None:
        return "dead"
    return f"redriven {_when(marker.at)} as {marker.stream} #{marker.stream_sequence}"


def letters_table(letters: Sequence[Letter], markers: dict[int, Marker]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("seq", "right"), ("consumer", "left"), ("original", "left"), ("attempts", "right"),
                          ("error", "left"), ("dead-lettered", "left"), ("status", "left")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for letter in letters:
        table.add_row(
            str(letter.sequence), letter.consumer,
            f"{letter.original_subject} ({letter.stream} #{letter.stream_sequence})", str(letter.attempts),
            _shorten(letter.error, ERROR_WIDTH), _when(letter.at), status(markers.get(letter.sequence)),
        )
    return table


def describe(letter: Letter, marker: Marker | None) -> list[str]:
    """`show`: every field, the full error, and the original event as JSON (or its raw bytes)."""
    lines = [
        f"dead letter   {letter.sequence} (event {letter.event_id})",
        f"consumer      {letter.consumer}",
        f"dead-lettered {_when(letter.at)} after {letter.attempts} attempt(s)",
        f"original      {letter.original_subject} ({letter.stream} #{letter.stream_sequence})",
        f"status        {status(marker)}",
        "error",
        *("  " + line for line in letter.error.splitlines() or [""]),
    ]
    original = letter.original()
    if original is None:
        shown = letter.payload[:RAW_PREVIEW_BYTES]
        more = f" (first {RAW_PREVIEW_BYTES} shown)" if len(letter.payload) > RAW_PREVIEW_BYTES else ""
        lines += [f"original payload: {len(letter.payload)} bytes, not a CDP event{more}", repr(shown)]
    else:
        lines += ["original event", json_format.MessageToJson(original, preserving_proto_field_name=True, indent=2)]
    return lines


# The log.


class DeadLetters:
    """The DEADLETTER stream of one namespace."""

    def __init__(self, js: JetStreamContext, topology: eventlog.Topology) -> None:
        self._js = js
        self.topology = topology
        self.stream = topology.stream("deadletter")

    async def check(self) -> None:
        try:
            await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            raise DlqError(
                f"no stream {self.stream}: no service has run in namespace {self.topology.namespace!r} "
                "(set CDP_NAMESPACE as the services have it)"
            ) from None

    async def _scan(self, subjects: Sequence[str]) -> list[Any]:
        """Every message on these subjects, in order, through a short-lived unacknowledged consumer."""
        count = 0
        for subject in subjects:
            info = await self._js.stream_info(self.stream, subjects_filter=subject)
            count += sum((info.state.subjects or {}).values())
        if not count:
            return []
        name = f"cdp-dlq-{os.getpid()}-{id(self)}"
        await self._js.add_consumer(self.stream, ConsumerConfig(
            name=name, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True,
            inactive_threshold=60.0, filter_subjects=list(subjects),
        ))
        try:
            sub = await self._js.pull_subscribe_bind(name, stream=self.stream)
            found: list[Any] = []
            while True:
                try:
                    msgs = await sub.fetch(_FETCH, timeout=_TIMEOUT_SECONDS)
                except nats.errors.TimeoutError:
                    break
                found.extend(msgs)
                if not msgs or msgs[-1].metadata.num_pending == 0:
                    break
            await sub.unsubscribe()
            return found
        finally:
            try:
                await self._js.delete_consumer(self.stream, name)
            except nats.js.errors.NotFoundError:
                pass

    async def load(self, consumer: str | None = None) -> tuple[list[Letter], dict[int, Marker]]:
        letters_subject, markers_subject = letter_subjects(self.topology, consumer)
        letters: list[Letter] = []
        markers: dict[int, Marker] = {}
        for msg in await self._scan([letters_subject, markers_subject]):
            sequence, at = msg.metadata.sequence.stream, msg.metadata.timestamp
            if msg.subject.endswith(f".{MARKER_SUFFIX}") and not is_letter_subject(self.topology, msg.subject):
                marker = parse_marker(msg.data, at)
                if marker is not None:
                    markers.setdefault(marker.dead_letter_sequence, marker)
            else:
                letter = parse_letter(sequence, msg.subject, msg.data, at, self.topology)
                if letter is not None:
                    letters.append(letter)
        return letters, markers

    async def get(self, sequence: int) -> Letter:
        try:
            raw = await self._js.get_msg(self.stream, sequence)
        except nats.js.errors.NotFoundError:
            raw = None
        letter = (
            parse_letter(sequence, raw.subject or "", raw.data or b"", raw.time, self.topology) if raw else None
        )
        if letter is None:
            raise DlqError(f"no dead letter at sequence {sequence} of {self.stream}")
        return letter

    async def marker(self, letter: Letter) -> Marker | None:
        _, markers = await self.load(letter.consumer)
        return markers.get(letter.sequence)

    async def other_consumers(self, letter: Letter) -> list[str]:
        """Durable consumers other than the letter's that would also receive a copy."""
        others = []
        for info in await self._js.consumers_info(letter.stream):
            durable = info.config.durable_name
            if not durable or durable == letter.consumer:
                continue
            filters = info.config.filter_subjects or ([info.config.filter_subject] if info.config.filter_subject else [])
            if not filters or any(subject_matches(f, letter.original_subject) for f in filters):
                others.append(durable)
        return sorted(others)

    async def redrive(self, letter: Letter, force: bool = False) -> tuple[int, bool]:
        """Appends the original again under a fresh message id and marks the letter; returns the
        copy's stream sequence and whether JetStream had it already (a repeat within its window)."""
        original = letter.original()
        if original is None:
            raise DlqError(f"dead letter {letter.sequence}: the original payload is not a CDP event, "
                           "so a copy would fail the same way")
        if not force:
            others = await self.other_consumers(letter)
            if others:
                raise DlqError(
                    f"dead letter {letter.sequence}: a copy on {letter.original_subject} would also reach "
                    f"{', '.join(others)}, not only {letter.consumer}; pass --force if their handlers take "
                    "the same event twice safely"
                )
        payload, stored_headers = letter.payload, None
        try:
            stored = await self._js.get_msg(letter.stream, letter.stream_sequence)
        except nats.js.errors.NotFoundError:
            stored = None
        if stored is not None and stored.subject == letter.original_subject and stored.data:
            # The stream's copy is whole (the letter's may be cut at the size limit), and has the headers.
            payload, stored_headers = stored.data, stored.headers
        ack = await self._js.publish(
            letter.original_subject, payload, timeout=_TIMEOUT_SECONDS, stream=letter.stream,
            headers=redrive_headers(original, stored_headers, letter),
        )
        marker = eventlog.Outgoing(
            f"{self.topology.deadletter(letter.consumer)}.{MARKER_SUFFIX}",
            marker_event(letter, original, ack.stream, ack.seq),
        )
        await self._js.publish(marker.subject, eventlog.encode(marker.event), timeout=_TIMEOUT_SECONDS,
                               stream=self.stream, headers=marker.headers())
        return ack.seq, bool(ack.duplicate)


# The command.


def _sequence(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a stream sequence (1, 2, ...)")
    return number


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "dlq", help="list, show and re-drive dead-lettered messages",
        description="Dead letters are messages a consumer gave up on (the error and the original bytes "
        "are kept in the DEADLETTER stream). Once the cause is fixed, `redrive` appends the original "
        "again so the consumer retries it.",
    )
    options.add_log_options(parser)
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="a table of dead letters, oldest first")
    listing.add_argument("--consumer", metavar="NAME", help="only this durable consumer's, e.g. identity-resolve")
    show = actions.add_parser("show", help="one dead letter in full, with its original event")
    show.add_argument("sequence", type=_sequence, metavar="SEQ", help="its sequence in the DEADLETTER stream")
    redrive = actions.add_parser("redrive", help="append the originals again so their consumers retry them")
    redrive.add_argument("sequences", type=_sequence, nargs="*", metavar="SEQ", help="dead letters to re-drive")
    redrive.add_argument("--all", action="store_true", help="every dead letter not re-driven yet")
    redrive.add_argument("--consumer", metavar="NAME", help="with --all: only this consumer's")
    redrive.add_argument("--force", action="store_true",
                         help="re-drive even where other consumers of the subject receive the copy too")
    return parser


async def _list(letters_log: DeadLetters, consumer: str | None, out: Console, err: Console) -> int:
    letters, markers = await letters_log.load(consumer)
    if not letters:
        err.print(f"no dead letters{f' of {consumer}' if consumer else ''} in {letters_log.stream}")
        return EXIT_OK
    out.print(letters_table(letters, markers))
    dead = sum(1 for letter in letters if letter.sequence not in markers)
    err.print(f"{len(letters)} dead letter(s), {dead} not re-driven")
    return EXIT_OK


async def _show(letters_log: DeadLetters, sequence: int, out: Console) -> int:
    letter = await letters_log.get(sequence)
    for line in describe(letter, await letters_log.marker(letter)):
        out.print(line)
    return EXIT_OK


async def _redrive(letters_log: DeadLetters, args: argparse.Namespace, out: Console, err: Console) -> int:
    chosen: Iterable[Letter]
    if args.all:
        letters, markers = await letters_log.load(args.consumer)
        chosen = [letter for letter in letters if letter.sequence not in markers]
    else:
        letters, markers = [], {}
        for sequence in dict.fromkeys(args.sequences):
            letter = await letters_log.get(sequence)
            letters.append(letter)
            marker = await letters_log.marker(letter)
            if marker is not None:
                markers[sequence] = marker
        chosen = letters
    failed = done = 0
    for letter in chosen:
        if letter.sequence in markers:
            out.print(f"dead letter {letter.sequence} ({letter.consumer}): already {status(markers[letter.sequence])}")
            continue
        try:
            sequence, repeated = await letters_log.redrive(letter, force=args.force)
        except DlqError as error:
            err.print(f"cdp dlq: {error}")
            failed += 1
            continue
        done += 1
        again = " (already appended by an earlier attempt)" if repeated else ""
        out.print(f"dead letter {letter.sequence} ({letter.consumer}): redriven to {letter.original_subject} "
                  f"as {letter.stream} #{sequence}{again}")
    if args.all and not done and not failed:
        err.print("nothing to re-drive")
    return EXIT_FAILED if failed else EXIT_OK


async def run(args: argparse.Namespace, url: str, topology: eventlog.Topology, out: Console, err: Console) -> int:
    nc = await options.connect(url, "cdp-dlq")
    try:
        letters_log = DeadLetters(nc.jetstream(timeout=_TIMEOUT_SECONDS), topology)
        await letters_log.check()
        if args.action == "list":
            return await _list(letters_log, args.consumer, out, err)
        if args.action == "show":
            return await _show(letters_log, args.sequence, out)
        return await _redrive(letters_log, args, out, err)
    finally:
        await nc.close()


def command(args: argparse.Namespace) -> int:
    # Subjects and errors are shown as they are: no markup, no highlighting, no wrapping of lines.
    out = Console(highlight=False, markup=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    try:
        if args.action == "redrive" and args.all == bool(args.sequences):
            raise DlqError("redrive: name dead letters by sequence, or pass --all")
        if args.action == "redrive" and args.consumer and not args.all:
            raise DlqError("redrive: --consumer goes with --all")
        if getattr(args, "consumer", None):
            check_consumer(args.consumer)
        url, topology = options.log_settings(args)
        return asyncio.run(run(args, url, topology, out, err))
    except (DlqError, SettingsError) as error:
        err.print(f"cdp dlq: {error}")
        return EXIT_FAILED
    except eventlog.LOG_UNAVAILABLE as error:
        err.print(f"cdp dlq: NATS is unavailable ({type(error).__name__}: {error}); try again")
        return EXIT_UNAVAILABLE
    except nats.js.errors.APIError as error:
        err.print(f"cdp dlq: JetStream refused the request: {error}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.print("cdp dlq: interrupted")
        return EXIT_INTERRUPTED
