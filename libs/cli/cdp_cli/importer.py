"""`cdp import FILE`: bulk-load a JSON-lines or CSV file of Segment-spec events through ingest.

The file is read record by record and streamed through ingest's gRPC `Import` call; each result
comes back in order, and the lines acknowledged contiguously from the start are saved in
`FILE.cdp-import.json` as they come, so an interrupted import (Ctrl-C, a crash, ingest or its log
unavailable) resumes where it stopped. A record without a `messageId` gets one derived from the
file's first 64 KiB and its line number, so sending a line twice (a resume's overlap, a re-run
with --restart) stores it once: ingest deduplicates event ids for 24 hours. (So a --restart more
than 24 hours later stores the records again, and editing the first 64 KiB gives every record
without a messageId a new id; a plain re-run never sends acknowledged lines again.)

Formats (by the file's suffix):
  .jsonl / .ndjson  one Segment message per line, the JSON the HTTP collector takes
  .csv              a header row naming the fields: type, messageId, userId, anonymousId, event,
                    name, timestamp, ... as text; `properties.<key>`, `traits.<key>`,
                    `context.<key>` (dots nest further) typed: a cell that is a JSON number or
                    true/false becomes one, anything else is text; empty cells are left out.

`sentAt` is not forwarded: the records are sent now, so ingest's clock-skew correction would move
every historical event to the present. `timestamp` (or `originalTimestamp`) is kept as written.

The conversions here are pure; `run` does the I/O and `command` is the CLI around it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import itertools
import json
import math
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn, Progress, ProgressColumn, Task, TaskID, TaskProgressColumn, TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp.v1 import event_pb2
from cdp_cli.options import add_address_option, default_address, service_address
from cdp_common import convert, eventlog
from cdp_ingest import core

DEFAULT_ADDRESS = default_address("ingest")
STATE_SUFFIX = ".cdp-import.json"
ERRORS_SUFFIX = ".cdp-import-errors.jsonl"
STATE_VERSION = 1
HEAD_BYTES = 64 * 1024
PRINTED_ERRORS = 20
SAVE_EVERY_SECONDS = 0.5
PROBE_TIMEOUT_SECONDS = 10.0
# Events sent and not yet answered. gRPC's flow control alone lets a fast reader run far ahead of
# a slow log; ingest answers a chunk once it has cdp_ingest.api.IMPORT_CHUNK events (or the
# stream's end), so the window must hold several chunks (a unit test checks it does).
WINDOW = 5000
# Larger items are refused here: ingest refuses events over core.MAX_EVENT_BYTES (measured on
# what it stores, which is about the item's size), and gRPC refuses messages over 4 MiB.
MAX_ITEM_BYTES = 1024 * 1024

# Exit status of `cdp import` (sysexits.h for the temporary failure).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REJECTED = 2
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}

_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "cdp:import")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
# Segment fields read as text even when nested columns would type them.
_TEXT_OBJECTS = ("externalIds",)
_OK, _INVALID, _UNAVAILABLE = (grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0],
                               grpc.StatusCode.UNAVAILABLE.value[0])
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ABORTED)


class ImportFailed(Exception):
    """The import cannot start or go on (exit 1); the message says what to do."""


# --- the file: identity, records --------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """What a file was when its import began: a resume needs the very same bytes."""

    size: int
    lines: int
    sha256: str
    # The hash of the first 64 KiB: the file's identity in derived message ids.
    head_sha256: str


def fingerprint(path: Path) -> Fingerprint:
    """One pass over the file: its size, hash and line count (a last line without newline counts)."""
    whole, size, lines, last = hashlib.sha256(), 0, 0, b"\n"
    head = bytearray()
    try:
        with path.open("rb") as f:
            while block := f.read(1024 * 1024):
                whole.update(block)
                if len(head) < HEAD_BYTES:
                    head += block[: HEAD_BYTES - len(head)]
                size += len(block)
                lines += block.count(b"\n")
                last = block[-1:]
    except OSError as error:
        raise ImportFailed(f"cannot read {path}: {error.strerror or error}") from None
    if last != b"\n":
        lines += 1
    return Fingerprint(size, lines, whole.hexdigest(), hashlib.sha256(head).hexdigest())


def derived_message_id(file_id: str, line: int) -> str:
    """The id of a record that has no messageId: the same file and line always give the same id."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{file_id}:{line}"))


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImportFailed(f"{path}: unknown format {path.suffix or '(no suffix)'!r}; use .jsonl, .ndjson or .csv")
    return fmt


@dataclass(frozen=True)
class Record:
    """One record of the file: the lines it spans, what it says, or why it cannot be read."""

    line: int
    end: int
    # The line's text or the CSV row (header -> cell), for the errors file.
    raw: Any
    payload: Any = None
    error: str = ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_line(line: int, text: str) -> Record:
    """A JSON line as a record; an unparseable one carries the reason."""
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        return Record(line, line, text, error=f"not JSON: {error.msg} (column {error.colno})")
    except ValueError as error:
        return Record(line, line, text, error=f"not JSON: {error}")
    except RecursionError:
        return Record(line, line, text, error="not JSON: nested too deeply")
    return Record(line, line, text, payload)


def read_jsonl(path: Path, after: int = 0) -> Iterator[Record]:
    """The records on the lines after `after`; blank lines are skipped."""
    with path.open("rb") as f:
        for number, data in enumerate(f, 1):
            if number <= after:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                yield Record(number, number, data.decode("utf-8", "replace").strip(), error="not UTF-8 text")
                continue
            text = (text.removeprefix("\ufeff") if number == 1 else text).strip()
            if text:
                yield json_line(number, text)


def csv_value(cell: str) -> Any:
    """A JSON number or boolean typed; anything else (including '007', 'NaN', 'null') as text."""
    if cell == "true":
        return True
    if cell == "false":
        return False
    number = _JSON_NUMBER.fullmatch(cell)
    if number is None:
        return cell
    if number.group(1) is None and number.group(2) is None:
        return int(cell)
    value = float(cell)
    return value if math.isfinite(value) else cell


def csv_header(row: list[str]) -> list[str]:
    """The column names, checked: `type` is needed, names are unique and nest without clashing."""
    names = [name.strip() for name in row]
    if names:
        names[0] = names[0].removeprefix("\ufeff").strip()
    if "type" not in names:
        raise ImportFailed("the CSV header has no 'type' column (track, identify, page, screen, group or alias)")
    seen: set[str] = set()
    for name in filter(None, names):
        if name in seen:
            raise ImportFailed(f"the CSV header names column {name!r} twice")
        if "" in name.split("."):
            raise ImportFailed(f"the CSV header's column {name!r} has an empty part")
        seen.add(name)
    for name in seen:
        parts = name.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix in seen:
                raise ImportFailed(f"the CSV header's columns {prefix!r} and {name!r} clash")
    return names


def csv_record(header: list[str], cells: list[str]) -> dict[str, Any]:
    """A row as a Segment message; ValueError when it does not fit the header."""
    record: dict[str, Any] = {}
    for position, (name, cell) in enumerate(itertools.zip_longest(header, cells), 1):
        if not cell:
            continue
        if name is None:
            raise ValueError(f"{len(cells)} cells but the header has {len(header)} columns")
        if not name:
            raise ValueError(f"a value in column {position}, which has no name in the header")
        first, *path = name.split(".")
        if not path:
            record[name] = cell
            continue
        target = record.setdefault(first, {})
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = cell if first in _TEXT_OBJECTS else csv_value(cell)
    return record


def read_csv(path: Path, after: int = 0) -> Iterator[Record]:
    """The rows starting after line `after` (a quoted cell may span lines); blank rows skipped."""
    with path.open("rb") as f:
        lines = (data.decode("utf-8", "surrogateescape") for data in f)
        reader = csv.reader(lines)
        header: list[str] | None = None
        previous = 0
        try:
            for row in reader:
                start, previous = previous + 1, reader.line_num
                if not any(row):
                    continue
                if header is None:
                    header = csv_header(row)
                    continue
                if start <= after:
                    continue
                raw = {(name or str(i)): cell for i, (name, cell) in enumerate(zip(header, row), 1) if cell}
                if any(_has_surrogates(cell) for cell in row):
                    yield Record(start, previous, _printable(raw), error="not UTF-8 text")
                    continue
                try:
                    yield Record(start, previous, raw, csv_record(header, row))
                except ValueError as error:
                    yield Record(start, previous, raw, error=str(error))
        except csv.Error as error:
            raise ImportFailed(f"{path}: line {reader.line_num}: not readable as CSV ({error})") from None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(raw: dict[str, str]) -> dict[str, str]:
    return {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for k, v in raw.items()}


def read_records(path: Path, fmt: str, after: int = 0) -> Iterator[Record]:
    return read_csv(path, after) if fmt == "csv" else read_jsonl(path, after)


# --- a Segment message as the gRPC request -----------------------------------------------------

_REQUESTS: dict[str, Any] = {
    "track": ingest_pb2.TrackRequest,
    "identify": ingest_pb2.IdentifyRequest,
    "alias": ingest_pb2.AliasRequest,
    "page": ingest_pb2.PageRequest,
    "screen": ingest_pb2.ScreenRequest,
    "group": ingest_pb2.GroupRequest,
}


def batch_item(incoming: core.Incoming, default_id: str, source: str = "") -> ingest_pb2.BatchItem:
    """The Import stream's item for a parsed message; InvalidField when it cannot be expressed."""
    for name, value in incoming.custom.items():
        if not isinstance(value, str):
            raise core.InvalidField(f"externalIds.{name}", "must be a string")
    try:
        request = _REQUESTS[incoming.kind](
            event_id=incoming.event_id or default_id,
            identifiers=event_pb2.Identifiers(**incoming.ids, custom=incoming.custom),
            consent=incoming.consent,
            source=source,
        )
        if incoming.timestamp is not None:
            request.timestamp.CopyFrom(eventlog.timestamp(incoming.timestamp))
        if incoming.context:
            request.context.CopyFrom(convert.dict_to_struct(incoming.context))
        properties: Mapping[str, Any] = incoming.properties
        if incoming.kind == "track":
            request.event = incoming.name
        elif incoming.kind == "page":
            request.name, request.category = incoming.name, incoming.category
        elif incoming.kind == "screen":
            request.name = incoming.name
            if incoming.category:
                # ScreenRequest has no category field; ingest keeps it as a property, so do we.
                properties = {**properties, "category": incoming.category}
        elif incoming.kind == "alias":
            request.previous_id = incoming.previous_id
        elif incoming.kind == "group":
            request.group_id = incoming.group_id
        if incoming.kind in ("track", "page", "screen") and properties:
            request.properties.CopyFrom(convert.dict_to_struct(properties))
        if incoming.kind in ("identify", "group") and incoming.traits:
            request.traits.CopyFrom(convert.dict_to_struct(incoming.traits))
    except (TypeError, ValueError, OverflowError, RecursionError) as error:
        raise core.InvalidField("event", f"cannot be converted: {error}") from None
    item = ingest_pb2.BatchItem(**{incoming.kind: request})
    if item.ByteSize() > MAX_ITEM_BYTES:
        # Ingest would refuse it anyway; sent, it would exceed gRPC's message limit and end the stream.
        raise core.InvalidField("event", f"larger than {core.MAX_EVENT_BYTES // 1024} KiB")
    return item


def to_batch_item(payload: Any, default_id: str, source: str = "") -> ingest_pb2.BatchItem:
    """One Segment-spec message (parsed JSON) as a BatchItem; InvalidField when it is malformed."""
    return batch_item(core.from_segment(payload), default_id, source)


def event_id_of(item: ingest_pb2.BatchItem) -> str:
    kind = item.WhichOneof("kind")
    return str(getattr(item, kind).event_id) if kind else ""


def reason(error: core.InvalidField) -> str:
    """An InvalidField in the Segment spec's names, as the HTTP collector words it."""
    return f"{core.segment_field(error.field)}: {error.reason}"


def server_reason(error: str) -> str:
    """Ingest's "field: reason" with the field in the Segment spec's names."""
    name, sep, rest = error.partition(": ")
    if not sep or " " in name:
        return error
    return f"{core.segment_field(name)}: {rest}"


# --- progress kept beside the file ----------------------------------------------------------------


def state_path(path: Path) -> Path:
    return path.with_name(path.name + STATE_SUFFIX)


def errors_path(path: Path) -> Path:
    return path.with_name(path.name + ERRORS_SUFFIX)


@dataclass
class State:
    """How far the import of one file got: every line up to `acknowledged` is done."""

    fingerprint: Fingerprint
    acknowledged: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0

    @property
    def done(self) -> int:
        """Records done (stored, already there or rejected)."""
        return self.stored + self.duplicates + self.rejected

    def to_json(self, file: str = "") -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "file": file,
            "fingerprint": asdict(self.fingerprint),
            "acknowledged_lines": self.acknowledged,
            "counts": {"stored": self.stored, "duplicates": self.duplicates, "rejected": self.rejected},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
        counts = data["counts"]
        return cls(
            fingerprint=Fingerprint(**data["fingerprint"]),
            acknowledged=int(data["acknowledged_lines"]),
            stored=int(counts["stored"]),
            duplicates=int(counts["duplicates"]),
            rejected=int(counts["rejected"]),
        )


def save_state(path: Path, state: State) -> None:
    """Writes the state file beside `path` atomically (a crash leaves the old or the new one)."""
    target = state_path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps({**state.to_json(path.name), "updated_at": eventlog.now().isoformat()},
                                    indent=2) + "\n")
    os.replace(temporary, target)


def load_state(path: Path) -> State | None:
    """The saved state of `path`'s import, None when there is none."""
    target = state_path(path)
    try:
        return State.from_json(json.loads(target.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ImportFailed(f"cannot use {target} ({error}); run with --restart to import from the first line") from None


def begin(path: Path, current: Fingerprint, restart: bool = False) -> State:
    """Where this run starts: the saved state if it is for these very bytes, else the first line."""
    if restart:
        state_path(path).unlink(missing_ok=True)
        errors_path(path).unlink(missing_ok=True)
        return State(current)
    saved = load_state(path)
    if saved is None:
        errors_path(path).unlink(missing_ok=True)
        return State(current)
    if (saved.fingerprint.size, saved.fingerprint.sha256) != (current.size, current.sha256):
        raise ImportFailed(
            f"{path} has changed since its import began ({saved.acknowledged:,} of {saved.fingerprint.lines:,} "
            f"lines were done; progress in {state_path(path)}): refusing to resume. Run with --restart to "
            "import it from the first line"
        )
    _keep_errors_up_to(errors_path(path), saved.acknowledged)
    return saved


def _keep_errors_up_to(errors: Path, line: int) -> None:
    """Drops the errors of lines a resume reads again (they are reported again if still bad)."""
    try:
        entries = errors.read_text().splitlines()
    except FileNotFoundError:
        return
    kept = [entry for entry in entries if entry.strip() and json.loads(entry).get("line", 0) <= line]
    errors.write_text("".join(entry + "\n" for entry in kept))


# --- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    address: str = DEFAULT_ADDRESS
    write_key: str = ""
    source: str = ""
    restart: bool = False


@dataclass
class Summary:
    path: Path
    total_lines: int
    acknowledged: int
    # This run's records.
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    # Records done by earlier runs, not read again.
    skipped: int = 0
    # The whole file's (this run and earlier ones).
    total_rejected: int = 0
    # Why the run stopped before the end ("" when it got there): re-run to resume.
    unavailable: str = ""

    @property
    def complete(self) -> bool:
        return not self.unavailable and self.acknowledged >= self.total_lines

    @property
    def exit_code(self) -> int:
        if self.unavailable:
            return EXIT_TEMPFAIL
        return EXIT_REJECTED if self.total_rejected else EXIT_OK


ProgressCallback = Callable[[int, int], None]
ErrorCallback = Callable[[int, str], None]

STORED, DUPLICATE, REJECTED = "stored", "duplicate", "rejected"


@dataclass(slots=True)
class _Entry:
    line: int
    end: int
    raw: Any
    event_id: str = ""
    outcome: str = ""
    error: str = ""


@dataclass
class _Session:
    path: Path
    fmt: str
    state: State
    on_progress: ProgressCallback | None
    on_error: ErrorCallback | None
    summary: Summary
    # Records read and not yet done, in file order; those sent and awaiting their result.
    queue: deque[_Entry] = field(default_factory=deque)
    sent: deque[_Entry] = field(default_factory=deque)
    errors_file: Any = None
    saved_at: float = 0.0
    # The writer read the file to its end.
    read_all: bool = False
    window: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(WINDOW))

    def reject(self, entry: _Entry, why: str) -> None:
        entry.outcome, entry.error = REJECTED, why

    def report(self, entry: _Entry) -> None:
        """A rejected record into the errors file and to the caller, in file order."""
        if self.errors_file is None:
            self.errors_file = errors_path(self.path).open("a", encoding="utf-8")
        self.errors_file.write(json.dumps(
            {"line": entry.line, "messageId": entry.event_id, "error": entry.error, "record": entry.raw},
            ensure_ascii=False,
        ) + "\n")
        if self.on_error is not None:
            self.on_error(entry.line, entry.error)

    def drain(self) -> None:
        """Moves the acknowledged prefix into the state."""
        moved = False
        while self.queue and self.queue[0].outcome:
            entry = self.queue.popleft()
            self.state.acknowledged = entry.end
            if entry.outcome == STORED:
                self.state.stored += 1
                self.summary.stored += 1
            elif entry.outcome == DUPLICATE:
                self.state.duplicates += 1
                self.summary.duplicates += 1
            else:
                self.state.rejected += 1
                self.summary.rejected += 1
                self.report(entry)
            moved = True
        if moved:
            self.progressed()
            if time.monotonic() - self.saved_at >= SAVE_EVERY_SECONDS:
                self.save()

    def progressed(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.state.acknowledged, self.state.fingerprint.lines)

    def save(self) -> None:
        if self.errors_file is not None:
            self.errors_file.flush()
        save_state(self.path, self.state)
        self.saved_at = time.monotonic()

    def close(self) -> None:
        if self.read_all and not self.queue and not self.summary.unavailable:
            # Everything read is done: trailing blank lines are too.
            self.state.acknowledged = max(self.state.acknowledged, self.state.fingerprint.lines)
        self.save()
        if self.errors_file is not None:
            self.errors_file.close()
            self.errors_file = None
        self.summary.acknowledged = self.state.acknowledged
        self.summary.total_rejected = self.state.rejected

    async def write(self, call: Any, source: str) -> None:
        """Reads the file and sends its records; those that cannot be sent are rejected here."""
        file_id = self.state.fingerprint.head_sha256
        try:
            for count, record in enumerate(read_records(self.path, self.fmt, self.state.acknowledged), 1):
                entry = _Entry(record.line, record.end, record.raw)
                self.queue.append(entry)
                if not record.error:
                    try:
                        item = to_batch_item(record.payload, derived_message_id(file_id, record.line), source)
                    except core.InvalidField as error:
                        entry.event_id = _message_id(record.payload)
                        self.reject(entry, reason(error))
                    else:
                        entry.event_id = event_id_of(item)
                        await self.window.acquire()
                        self.sent.append(entry)
                        await call.write(item)
                        continue
                else:
                    self.reject(entry, record.error)
                self.drain()
                if count % 1000 == 0:
                    await asyncio.sleep(0)
            self.read_all = True
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call ended early: read() reports why
        except BaseException:
            call.cancel()  # read() would otherwise wait for results that never come
            raise

    async def read(self, call: Any) -> None:
        """Takes the results in order; stops at the first UNAVAILABLE one."""
        index = 0
        while True:
            result = await call.read()
            if result is grpc.aio.EOF:
                break
            if not self.sent:
                raise ImportFailed("ingest answered more results than events were sent")
            if result.index != index:
                raise ImportFailed(f"ingest answered out of order (result {result.index}, expected {index})")
            entry = self.sent.popleft()
            self.window.release()
            index += 1
            if result.code == _OK:
                entry.outcome = DUPLICATE if result.duplicate else STORED
            elif result.code == _INVALID:
                self.reject(entry, server_reason(result.error))
            elif result.code == _UNAVAILABLE:
                self.summary.unavailable = result.error or "ingest is unavailable"
                return
            else:
                raise ImportFailed(f"line {entry.line}: ingest answered code {result.code}: {result.error}")
            self.drain()
        self.drain()
        if self.sent:
            self.summary.unavailable = "ingest ended the import before answering every event"


def _message_id(payload: Any) -> str:
    value = payload.get("messageId") if isinstance(payload, Mapping) else None
    return value if isinstance(value, str) else ""


async def run(
    path: Path | str,
    options: Options = Options(),
    *,
    on_progress: ProgressCallback | None = None,
    on_error: ErrorCallback | None = None,
) -> Summary:
    """Imports `path` through ingest at `options.address`, resuming a saved state.

    Returns the summary (with `unavailable` set when ingest or its log was unavailable); raises
    ImportFailed when the import cannot start or go on. Progress is saved however it ends,
    cancellation included.
    """
    path = Path(path)
    fmt = file_format(path)
    current = fingerprint(path)
    if fmt == "csv":
        _check_csv_header(path)
    state = begin(path, current, options.restart)
    summary = Summary(path, current.lines, state.acknowledged, skipped=state.done)
    session = _Session(path, fmt, state, on_progress, on_error, summary)
    session.progressed()
    try:
        if state.acknowledged < current.lines:
            await _exchange(session, options)
    finally:
        session.close()
    return summary


def _check_csv_header(path: Path) -> None:
    """Fails early, before connecting, on a CSV file whose header cannot be used."""
    with path.open("rb") as f:
        reader = csv.reader(data.decode("utf-8", "surrogateescape") for data in f)
        try:
            for row in reader:
                if any(row):
                    csv_header(row)
                    return
        except csv.Error as error:
            raise ImportFailed(f"{path}: line {reader.line_num}: not readable as CSV ({error})") from None


async def _exchange(session: _Session, options: Options) -> None:
    metadata = (("x-write-key", options.write_key),) if options.write_key else None
    channel = grpc.aio.insecure_channel(options.address)
    try:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        try:
            # An empty batch stores nothing but checks the address and the write key first: a
            # stream the server refuses while the client writes reports INTERNAL instead of the
            # server's status (grpc/grpc#36066).
            await stub.Batch(ingest_pb2.BatchRequest(), metadata=metadata, timeout=PROBE_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            _rpc_failed(session, error, options.address)
            return
        call = stub.Import(metadata=metadata)
        writer = asyncio.create_task(session.write(call, options.source))
        try:
            await session.read(call)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Not cancelled from outside: the writer failed and cancelled the call.
        except grpc.aio.AioRpcError as error:
            _rpc_failed(session, error, options.address)
        finally:
            if not writer.done():
                writer.cancel()
            call.cancel()
            await asyncio.wait([writer])
            failure = None if writer.cancelled() else writer.exception()
        if failure is not None:
            raise failure
    finally:
        await channel.close()


def _rpc_failed(session: _Session, error: grpc.aio.AioRpcError, address: str) -> None:
    code, details = error.code(), error.details() or ""
    # A write failing as the stream breaks (ingest stopped mid-import) surfaces as this INTERNAL
    # (grpc/grpc#36066); the key was checked before, so it is the connection: retry.
    if code in _RETRYABLE or (code == grpc.StatusCode.INTERNAL and details == "Internal error from Core"):
        session.summary.unavailable = f"ingest at {address}: {code.name}: {details}"
        return
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        raise ImportFailed(f"ingest refused the write key ({details}); pass --write-key or set CDP_WRITE_KEY")
    raise ImportFailed(f"ingest at {address} failed the import: {code.name}: {details}")


# --- the command ----------------------------------------------------------------------------------

EPILOG = f"""\
FILE is JSON lines (.jsonl, .ndjson: one Segment-spec message per line) or CSV (.csv: a header
row naming type, messageId, userId, anonymousId, event, name, timestamp, ... and
properties.<key> / traits.<key> columns; a cell that is a JSON number or true/false is typed,
other cells are text, empty cells are left out).

Progress is saved in FILE{STATE_SUFFIX}: after an interruption, run the same command again and it
resumes after the last acknowledged line. A record without a messageId gets one derived from the
file and its line number, so a line sent twice is stored once. Rejected records are listed, with
their line numbers, in FILE{ERRORS_SUFFIX}.

exit status:
  {EXIT_OK}    every record was stored (or was already)
  {EXIT_REJECTED}    some records were rejected as invalid (argparse also uses 2 for a bad command line)
  {EXIT_TEMPFAIL}   ingest or its event log was unavailable: run the same command again to resume
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C): run the same command again to resume
  {EXIT_FAILED}    any other error (unreadable or changed file, refused write key, ...)
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The `import` subcommand's parser."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "import", help="bulk-load a JSON-lines or CSV file of Segment events through ingest (resumable)",
        description="Bulk-load a file of Segment-spec events through ingest's gRPC Import stream.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", metavar="FILE", type=Path, help="a .jsonl, .ndjson or .csv file")
    add_address_option(parser, "ingest")
    parser.add_argument("--write-key", metavar="KEY", default=None,
                        help="sent as x-write-key metadata (default: $CDP_WRITE_KEY)")
    parser.add_argument("--source", metavar="NAME", default="",
                        help="the source to record on each event when ingest has no write keys (with write keys, "
                             "the key's source is recorded)")
    parser.add_argument("--restart", action="store_true",
                        help=f"ignore the saved progress (FILE{STATE_SUFFIX}) and start from the first line")
    return parser


def command(args: argparse.Namespace) -> int:
    """`cdp import`: runs the import with a progress bar on stderr; returns the exit status."""
    path: Path = args.file
    options = Options(
        address=service_address("ingest", args.ingest),
        write_key=args.write_key if args.write_key is not None else os.environ.get("CDP_WRITE_KEY", ""),
        source=args.source,
        restart=args.restart,
    )
    console = Console(stderr=True, highlight=False)

    def say(text: str) -> None:
        console.print(text, markup=False, soft_wrap=True)

    printed = 0

    def on_error(line: int, why: str) -> None:
        nonlocal printed
        printed += 1
        if printed <= PRINTED_ERRORS:
            say(f"line {line}: {why}")
        elif printed == PRINTED_ERRORS + 1:
            say(f"(more rejected records are listed in {errors_path(path)})")

    fixed = Column(no_wrap=True)
    progress = Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=30)),
        BarColumn(bar_width=None), _CountColumn(table_column=fixed), TaskProgressColumn(table_column=fixed),
        _RateColumn(table_column=fixed), TextColumn("eta", table_column=fixed), TimeRemainingColumn(),
        console=console, expand=True,
    )
    task: TaskID | None = None

    def on_progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            # Shown once the file is checked; lines done by earlier runs are not part of the rate.
            task = progress.add_task(path.name, total=total, completed=done)
            progress.start()
        else:
            progress.update(task, completed=done)

    def stop_progress() -> None:
        if task is not None and progress.live.is_started:
            progress.stop()

    try:
        summary = asyncio.run(run(path, options, on_progress=on_progress, on_error=on_error))
    except ImportFailed as error:
        stop_progress()
        say(f"cdp import: {error}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        stop_progress()
        say(f"interrupted after {_saved(path)} (progress saved in {state_path(path)}); run the same command "
            "again to resume")
        return EXIT_INTERRUPTED
    finally:
        stop_progress()
    print(describe(summary), flush=True)
    if summary.unavailable:
        say(f"stopped: {summary.unavailable}")
        say(f"{summary.acknowledged:,} of {summary.total_lines:,} lines are done and saved; run the same command "
            "again to resume")
    return summary.exit_code


def _saved(path: Path) -> str:
    try:
        state = load_state(path)
    except ImportFailed:
        state = None
    if state is None:
        return "0 lines"
    return f"{state.acknowledged:,} of {state.fingerprint.lines:,} lines"


def describe(summary: Summary) -> str:
    lines = [
        f"{summary.path}: {summary.acknowledged:,} of {summary.total_lines:,} lines done"
        + ("" if summary.complete else " (incomplete)"),
        f"  stored      {summary.stored:,}",
        f"  duplicates  {summary.duplicates:,} (already in the log)",
        f"  rejected    {summary.rejected:,}"
        + (f" (all runs: {summary.total_rejected:,}; see {errors_path(summary.path)})" if summary.total_rejected else ""),
        f"  skipped     {summary.skipped:,} (done by an earlier run)",
    ]
    return "\n".join(lines)


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else f"{task.total:,.0f}"
        return Text(f"{task.completed:,.0f}/{total} lines", style="progress.download")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "-/s", style="progress.data.speed")
