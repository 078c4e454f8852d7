"""`cdp import`'s pure parts: reading JSON lines and CSV, the gRPC items, ids, saved progress."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdp.ingest.v1 import ingest_pb2
from cdp_cli import importer
from cdp_common import convert
from cdp_ingest import core

ID = "00000000-0000-5000-8000-000000000000"


# --- CSV cells and rows ---------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "value"), [
    ("12", 12), ("-3", -3), ("0", 0), ("19.99", 19.99), ("1e3", 1000.0), ("-2.5E-1", -0.25),
    ("true", True), ("false", False),
])
def test_a_csv_cell_that_is_a_json_number_or_boolean_is_typed(cell: str, value: object) -> None:
    typed = importer.csv_value(cell)
    assert typed == value and type(typed) is type(value)


@pytest.mark.parametrize("cell", [
    "007", "abc", "NaN", "Infinity", "null", "True", " 1", "1 ", "1,5", "+1", ".5", "1.", "0x10", "1e999", "١٢",
])
def test_any_other_csv_cell_stays_text(cell: str) -> None:
    assert importer.csv_value(cell) == cell


def test_a_csv_row_becomes_a_segment_message() -> None:
    header = importer.csv_header(
        ["\ufefftype", "messageId", "userId", " event ", "properties.price", "properties.sku", "properties.gift",
         "traits.vip", "context.app.build", "externalIds.loyalty_id", "timestamp"]
    )
    row = ["track", "", "42", "Order Completed", "9.5", "007", "true", "", "12", "0012", "2026-01-02T03:04:05Z"]
    assert importer.csv_record(header, row) == {
        "type": "track", "userId": "42", "event": "Order Completed",
        "properties": {"price": 9.5, "sku": "007", "gift": True},
        "context": {"app": {"build": 12}},
        # Ids are text whatever they look like.
        "externalIds": {"loyalty_id": "0012"},
        "timestamp": "2026-01-02T03:04:05Z",
    }


def test_a_csv_row_longer_than_its_header_is_refused() -> None:
    header = importer.csv_header(["type", "userId"])
    assert importer.csv_record(header, ["track", "u1", ""]) == {"type": "track", "userId": "u1"}
    with pytest.raises(ValueError, match="3 cells but the header has 2 columns"):
        importer.csv_record(header, ["track", "u1", "extra"])


@pytest.mark.parametrize(("row", "message"), [
    (["userId", "event"], "no 'type' column"),
    (["type", "userId", "userId"], "'userId' twice"),
    (["type", "properties."], "empty part"),
    (["type", "properties", "properties.price"], "clash"),
])
def test_a_csv_header_that_cannot_work_is_refused(row: list[str], message: str) -> None:
    with pytest.raises(importer.ImportFailed, match=message):
        importer.csv_header(row)


def test_csv_records_know_the_lines_they_span(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(
        b"type,userId,properties.note\r\n"
        b"track,u1,\"two\r\nlines\"\r\n"
        b"\r\n"
        b"identify,u2,\r\n"
        b"track,u3,1,extra\r\n"
        b"track,\xff\xfe,x\r\n"
    )
    records = list(importer.read_csv(path))
    assert [(r.line, r.end) for r in records] == [(2, 3), (5, 5), (6, 6), (7, 7)]
    assert records[0].payload == {"type": "track", "userId": "u1", "properties": {"note": "two\r\nlines"}}
    assert records[1].payload == {"type": "identify", "userId": "u2"}
    assert records[2].error == "4 cells but the header has 3 columns"
    assert records[3].error == "not UTF-8 text"
    # A resume starts after the acknowledged lines.
    assert [r.line for r in importer.read_csv(path, after=3)] == [5, 6, 7]


# --- JSON lines ---------------------------------------------------------------------------------------


def test_json_lines_are_read_with_their_numbers_and_reasons(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        "\ufeff".encode() + b'{"type": "track", "userId": "u1", "event": "A"}\n'
        b"\n"
        b'{"type": "track", "userId": \n'
        b'{"n": NaN}\n'
        b"\xff not utf-8\n"
        b'  {"type": "page", "anonymousId": "a1"}  \r\n'
        b'"just a string"'
    )
    records = list(importer.read_jsonl(path))
    assert [r.line for r in records] == [1, 3, 4, 5, 6, 7]
    assert records[0].payload == {"type": "track", "userId": "u1", "event": "A"}
    assert records[1].error.startswith("not JSON: Expecting value (column")
    assert records[2].error == "not JSON: NaN is not JSON"
    assert records[3].error == "not UTF-8 text"
    assert records[4].payload == {"type": "page", "anonymousId": "a1"}
    assert records[5].payload == "just a string"
    assert [r.line for r in importer.read_jsonl(path, after=4)] == [5, 6, 7]


def test_a_json_line_becomes_the_batch_item_of_its_type() -> None:
    item = importer.to_batch_item({
        "type": "track", "messageId": "m-1", "userId": 42, "anonymousId": "a-1", "email": "ada@example.com",
        "event": "Order Completed", "properties": {"order_id": "o-1", "revenue": 10, "items": [1, "x"]},
        "timestamp": "2026-01-02T03:04:05.250Z", "sentAt": "2026-01-02T03:04:06Z",
        "context": {"ip": "10.0.0.1"}, "consent": {"analytics": True}, "externalIds": {"crm_id": "c-9"},
    }, ID, source="crm")
    assert item.WhichOneof("kind") == "track"
    track = item.track
    assert (track.event_id, track.event, track.source) == ("m-1", "Order Completed", "crm")
    assert (track.identifiers.user_id, track.identifiers.anonymous_id, track.identifiers.email) == (
        "42", "a-1", "ada@example.com")
    assert dict(track.identifiers.custom) == {"crm_id": "c-9"}
    assert convert.struct_to_dict(track.properties) == {"order_id": "o-1", "revenue": 10, "items": [1, "x"]}
    assert track.timestamp.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)
    # Sent now, not then: ingest's skew correction would move the event to the present.
    assert not track.HasField("sent_at")
    assert convert.struct_to_dict(track.context) == {"ip": "10.0.0.1"}
    assert dict(track.consent) == {"analytics": True}


def test_each_segment_call_maps_onto_its_request() -> None:
    identify = importer.to_batch_item({"type": "identify", "userId": "u", "traits": {"plan": "pro"}}, ID).identify
    assert identify.event_id == ID and convert.struct_to_dict(identify.traits) == {"plan": "pro"}
    alias = importer.to_batch_item({"type": "alias", "userId": "u", "previousId": "anon"}, ID).alias
    assert alias.previous_id == "anon"
    group = importer.to_batch_item({"type": "group", "userId": "u", "groupId": "g", "traits": {"seats": 5}}, ID)
    assert group.group.group_id == "g" and convert.struct_to_dict(group.group.traits) == {"seats": 5}
    page = importer.to_batch_item(
        {"type": "page", "anonymousId": "a", "name": "Home", "category": "Docs", "properties": {"path": "/"}}, ID
    ).page
    assert (page.name, page.category, convert.struct_to_dict(page.properties)) == ("Home", "Docs", {"path": "/"})
    screen = importer.to_batch_item({"type": "screen", "userId": "u", "name": "Cart", "category": "Shop"}, ID)
    # ScreenRequest has no category; ingest keeps a screen's category as a property.
    assert convert.struct_to_dict(screen.screen.properties) == {"category": "Shop"}
    assert not screen.screen.HasField("timestamp") and not screen.screen.HasField("context")


@pytest.mark.parametrize(("payload", "message"), [
    ("just a string", "event: must be a JSON object"),
    ({"userId": "u"}, "type: must be one of"),
    ({"type": "bogus", "userId": "u"}, "type: must be one of"),
    ({"type": "track", "userId": ["u"]}, "userId: must be a string"),
    ({"type": "track", "userId": "u", "properties": [1]}, "properties: must be a JSON object"),
    ({"type": "track", "userId": "u", "timestamp": "2026-01-02T03:04:05"}, "timestamp: needs a time zone"),
    ({"type": "track", "userId": "u", "externalIds": {"crm_id": 7}}, "externalIds.crm_id: must be a string"),
])
def test_a_message_that_cannot_be_sent_is_refused_with_the_segment_field(payload: object, message: str) -> None:
    with pytest.raises(core.InvalidField) as caught:
        importer.to_batch_item(payload, ID)
    assert importer.reason(caught.value).startswith(message)


def test_an_event_too_large_for_ingest_is_refused_before_sending() -> None:
    payload = {"type": "track", "userId": "u", "event": "E", "properties": {"blob": "x" * importer.MAX_ITEM_BYTES}}
    with pytest.raises(core.InvalidField, match="larger than 32 KiB"):
        importer.to_batch_item(payload, ID)
    assert importer.json_line(1, "[" * 100_000).error == "not JSON: nested too deeply"


def test_ingest_errors_are_worded_with_segment_field_names() -> None:
    assert importer.server_reason("identifiers: user_id or anonymous_id is required") == (
        "userId or anonymousId: user_id or anonymous_id is required")
    assert importer.server_reason("event_id: must be 1-128 characters") == "messageId: must be 1-128 characters"
    assert importer.server_reason("properties.order_id: is required") == "properties.order_id: is required"
    assert importer.server_reason("the event log is unavailable") == "the event log is unavailable"


# --- ids and the file's identity -----------------------------------------------------------------


def test_derived_ids_depend_only_on_the_file_head_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("x" * importer.HEAD_BYTES + "\n")
    head = importer.fingerprint(path).head_sha256
    assert importer.derived_message_id(head, 7) == importer.derived_message_id(head, 7)
    assert importer.derived_message_id(head, 7) != importer.derived_message_id(head, 8)
    assert core.event_id(importer.derived_message_id(head, 7))  # a valid event id
    # Appending keeps the head, so the lines already there keep their ids.
    with path.open("a") as f:
        f.write("more\n")
    assert importer.fingerprint(path).head_sha256 == head
    other = tmp_path / "b.jsonl"
    other.write_text("y\n")
    assert importer.derived_message_id(importer.fingerprint(other).head_sha256, 7) != (
        importer.derived_message_id(head, 7))


def test_a_missing_message_id_is_filled_with_the_derived_one() -> None:
    assert importer.to_batch_item({"type": "track", "userId": "u", "event": "E"}, ID).track.event_id == ID


def test_the_fingerprint_counts_lines_and_notices_any_change(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("a\nb\nc")
    first = importer.fingerprint(path)
    assert (first.size, first.lines) == (5, 3)
    assert importer.fingerprint(path) == first
    path.write_text("a\nb\nc\n")
    assert importer.fingerprint(path).lines == 3
    path.write_text("a\nB\nc")
    assert importer.fingerprint(path).sha256 != first.sha256 and importer.fingerprint(path).size == first.size
    (tmp_path / "empty.jsonl").write_text("")
    assert importer.fingerprint(tmp_path / "empty.jsonl").lines == 0
    with pytest.raises(importer.ImportFailed, match="cannot read"):
        importer.fingerprint(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(("name", "fmt"), [("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.csv", "csv")])
def test_the_format_comes_from_the_suffix(name: str, fmt: str) -> None:
    assert importer.file_format(Path(name)) == fmt


def test_an_unknown_suffix_is_refused() -> None:
    with pytest.raises(importer.ImportFailed, match="use .jsonl, .ndjson or .csv"):
        importer.file_format(Path("events.json"))


# --- saved progress -------------------------------------------------------------------------------


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("{}\n")
    state = importer.State(importer.fingerprint(path), acknowledged=1, stored=0, duplicates=0, rejected=1)
    importer.save_state(path, state)
    assert importer.state_path(path) == tmp_path / "events.jsonl.cdp-import.json"
    assert importer.load_state(path) == state
    saved = json.loads(importer.state_path(path).read_text())
    assert saved["acknowledged_lines"] == 1 and saved["file"] == "events.jsonl"
    assert not list(tmp_path.glob("*.tmp"))


def test_no_state_file_means_starting_from_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("{}\n")
    importer.errors_path(path).write_text('{"line": 1}\n')
    state = importer.begin(path, importer.fingerprint(path))
    assert state.acknowledged == 0
    assert not importer.errors_path(path).exists()  # a stale list from an earlier import


def test_a_resume_keeps_the_errors_of_the_lines_it_does_not_read_again(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("{}\n" * 10)
    current = importer.fingerprint(path)
    importer.save_state(path, importer.State(current, acknowledged=5, stored=4, rejected=1))
    importer.errors_path(path).write_text('{"line": 3}\n{"line": 7}\n')
    state = importer.begin(path, current)
    assert (state.acknowledged, state.stored, state.rejected, state.done) == (5, 4, 1, 5)
    assert importer.errors_path(path).read_text() == '{"line": 3}\n'


def test_a_changed_file_refuses_to_resume_unless_restarted(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("{}\n" * 10)
    importer.save_state(path, importer.State(importer.fingerprint(path), acknowledged=5, stored=5))
    path.write_text("{}\n" * 9 + "[]\n")
    changed = importer.fingerprint(path)
    with pytest.raises(importer.ImportFailed, match="has changed since its import began.*--restart"):
        importer.begin(path, changed)
    state = importer.begin(path, changed, restart=True)
    assert (state.acknowledged, state.done) == (0, 0) and state.fingerprint == changed
    assert not importer.state_path(path).exists()


def test_an_unreadable_state_file_asks_for_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("{}\n")
    importer.state_path(path).write_text("{not json")
    with pytest.raises(importer.ImportFailed, match="--restart"):
        importer.begin(path, importer.fingerprint(path))
    importer.state_path(path).write_text(json.dumps({"version": 99}))
    with pytest.raises(importer.ImportFailed, match="version 99"):
        importer.begin(path, importer.fingerprint(path))


def test_the_exit_status_says_rejected_and_temporary_failures_apart() -> None:
    summary = importer.Summary(Path("a.jsonl"), total_lines=3, acknowledged=3)
    assert summary.complete and summary.exit_code == 0
    summary.total_rejected = 1
    assert summary.exit_code == 2
    summary.unavailable = "the event log is unavailable"
    assert summary.exit_code == 75 and not summary.complete


def test_the_window_of_unanswered_events_holds_several_of_ingests_chunks() -> None:
    from cdp_ingest.api import IMPORT_CHUNK

    # Ingest answers once it has a chunk: a smaller window would wait for answers forever.
    assert importer.WINDOW >= 4 * IMPORT_CHUNK


def test_a_batch_item_is_what_ingest_reads_back() -> None:
    from cdp_ingest.api import to_incoming

    item = importer.to_batch_item(
        {"type": "track", "userId": "u", "event": "E", "properties": {"a": 1}, "traits": {"ignored": True}}, ID
    )
    back = to_incoming("track", item.track)
    assert (back.kind, back.event_id, back.name, dict(back.properties)) == ("track", ID, "E", {"a": 1})
    assert isinstance(item, ingest_pb2.BatchItem)
