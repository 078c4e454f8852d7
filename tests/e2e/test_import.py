"""`cdp import` against the real ingest service: bulk loads, re-runs, resumes, bad records."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp.v1 import event_pb2
from cdp_cli import importer
from cdp_cli.infra import free_port
from cdp_common import convert, eventlog
from cdp_ingest.main import DEFINITION as INGEST

pytestmark = pytest.mark.timeout(120)

CDP = str(Path(sys.executable).parent / "cdp")
LINES = 3000


def _message(i: int) -> dict[str, Any]:
    when = (eventlog.now() - timedelta(minutes=i)).isoformat().replace("+00:00", "Z")
    common: dict[str, Any] = {"userId": f"u{i % 97}", "timestamp": when}
    if i % 2 == 0:
        common["messageId"] = f"import-test-{i}"
    if i % 3 == 0:
        return {**common, "type": "identify", "traits": {"email": f"u{i % 97}@example.com", "plan": "pro"}}
    if i % 3 == 1:
        return {**common, "type": "track", "event": "Product Viewed", "properties": {"sku": f"sku-{i}", "price": i / 10}}
    return {**common, "type": "page", "name": "Pricing", "properties": {"path": "/pricing"}}


def _write_jsonl(path: Path, lines: int = LINES) -> Path:
    path.write_text("".join(json.dumps(_message(i)) + "\n" for i in range(1, lines + 1)))
    return path


async def _collected(suite: Any) -> int:
    info = await suite.js.stream_info(suite.topology.stream("collected"))
    return int(info.state.messages)


async def _events(suite: Any) -> list[event_pb2.Event]:
    stream = suite.topology.stream("collected")
    info = await suite.js.stream_info(stream)
    return [eventlog.decode((await suite.js.get_msg(stream, seq)).data)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)]


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CDP_")}, **extra}


async def _cdp(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`cdp ...` as CI runs it: no terminal, no standard input."""
    process = await asyncio.create_subprocess_exec(
        CDP, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env or _env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_jsonl_file_is_imported_once_however_often_it_is_run(start_suite, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "events.jsonl")
    seen: list[tuple[int, int]] = []
    async with start_suite((INGEST,)) as suite:
        options = importer.Options(address=suite.addresses["ingest"])
        first = await importer.run(path, options, on_progress=lambda done, total: seen.append((done, total)))
        assert (first.stored, first.duplicates, first.rejected, first.skipped) == (LINES, 0, 0, 0)
        assert first.complete and first.exit_code == 0
        assert await _collected(suite) == LINES
        assert seen[0] == (0, LINES) and seen[-1] == (LINES, LINES)
        assert [done for done, _ in seen] == sorted(done for done, _ in seen)
        state = importer.load_state(path)
        assert state is not None and (state.acknowledged, state.stored) == (LINES, LINES)

        # Run again: every line is already done, nothing is sent.
        second = await importer.run(path, options)
        assert (second.stored, second.duplicates, second.skipped) == (0, 0, LINES)
        assert second.complete and second.exit_code == 0

        # From the first line again: the same ids, so ingest stores nothing new.
        third = await importer.run(path, replace(options, restart=True))
        assert (third.stored, third.duplicates, third.skipped) == (0, LINES, 0)
        assert await _collected(suite) == LINES

        events = await _events(suite)
    ids = {event.id for event in events}
    assert len(ids) == LINES and "import-test-2" in ids
    head = importer.fingerprint(path).head_sha256
    assert importer.derived_message_id(head, 1) in ids  # line 1 has no messageId


async def test_an_interrupted_import_resumes_without_duplicates(start_suite, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "events.ndjson")
    async with start_suite((INGEST,)) as suite:
        options = importer.Options(address=suite.addresses["ingest"])
        task: asyncio.Task[importer.Summary]

        def interrupt(done: int, total: int) -> None:
            if done >= 1000 and not task.cancelling():
                task.cancel()  # what Ctrl-C does to asyncio.run's task

        task = asyncio.create_task(importer.run(path, options, on_progress=interrupt))
        with pytest.raises(asyncio.CancelledError):
            await task
        state = importer.load_state(path)
        assert state is not None and 1000 <= state.acknowledged < LINES
        assert state.stored == state.acknowledged

        resumed = await importer.run(path, options)
        assert resumed.complete and resumed.exit_code == 0
        assert resumed.skipped == state.acknowledged
        # Lines sent but not yet acknowledged when interrupted come back as duplicates.
        assert resumed.stored + resumed.duplicates == LINES - state.acknowledged
        assert await _collected(suite) == LINES
        assert len({event.id for event in await _events(suite)}) == LINES


class FlakyIngest(ingest_pb2_grpc.IngestServiceServicer):  # type: ignore[misc]
    """Answers UNAVAILABLE from the `fail_from`th event of a stream on, as ingest does when its log is down."""

    def __init__(self) -> None:
        self.fail_from: int | None = None
        self.received: list[list[str]] = []

    async def Batch(self, request: ingest_pb2.BatchRequest, context: Any) -> ingest_pb2.BatchResponse:
        return ingest_pb2.BatchResponse()  # the importer's check of the address and key

    async def Import(self, request_iterator: Any, context: Any) -> AsyncIterator[ingest_pb2.ItemResult]:
        ids: list[str] = []
        self.received.append(ids)
        index = 0
        async for item in request_iterator:
            ids.append(importer.event_id_of(item))
            if self.fail_from is not None and index >= self.fail_from:
                yield ingest_pb2.ItemResult(index=index, code=grpc.StatusCode.UNAVAILABLE.value[0],
                                            error="the event log is unavailable; retry with the same event_id")
            else:
                yield ingest_pb2.ItemResult(index=index, event_id=ids[-1], code=0, stream_sequence=index + 1)
            index += 1


async def test_an_unavailable_log_stops_the_import_with_75_and_a_rerun_resumes(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "events.jsonl")
    flaky = FlakyIngest()
    flaky.fail_from = 1000
    server = grpc.aio.server()
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        code, out, err = await _cdp("import", str(path), env=_env(CDP_INGEST_ADDRESS=f"127.0.0.1:{port}"))
        assert code == 75, err
        assert "run the same command again to resume" in err
        assert "the event log is unavailable" in err
        assert "1,000 of 3,000 lines done (incomplete)" in out
        state = importer.load_state(path)
        assert state is not None and (state.acknowledged, state.stored) == (1000, 1000)

        flaky.fail_from = None
        resumed = await importer.run(path, importer.Options(address=f"127.0.0.1:{port}"))
        assert resumed.complete and (resumed.skipped, resumed.stored) == (1000, 2000)
    finally:
        await server.stop(None)
    head = importer.fingerprint(path).head_sha256
    expected = [_message(i).get("messageId") or importer.derived_message_id(head, i) for i in range(1, LINES + 1)]
    first, second = flaky.received
    assert first == expected[: len(first)] and len(first) >= 1001
    # Only the lines not acknowledged are sent again, under the same ids.
    assert second == expected[1000:]


async def test_ingest_not_listening_is_a_temporary_failure(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "events.jsonl", lines=10)
    summary = await importer.run(path, importer.Options(address=f"127.0.0.1:{free_port()}"))
    assert summary.exit_code == 75 and "UNAVAILABLE" in summary.unavailable
    assert summary.acknowledged == 0 and not summary.complete


async def test_a_csv_file_is_imported_with_typed_properties(start_suite, tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    when = eventlog.now().replace(microsecond=0) - timedelta(days=30)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["type", "messageId", "userId", "anonymousId", "event", "name", "timestamp",
                         "properties.order_id", "properties.revenue", "properties.quantity", "properties.gift",
                         "properties.note", "traits.email", "traits.vip", "traits.zip"])
        writer.writerow(["track", "", "u1", "", "Order Completed", "", when.isoformat(),
                         "o-1", "19.99", "2", "true", "fragile,\nhandle with care", "", "", ""])
        writer.writerow(["identify", "csv-2", "u1", "", "", "", "", "", "", "", "", "", "ada@example.com",
                         "false", "01234"])
        writer.writerow(["page", "", "", "anon-7", "", "Home", "", "", "", "", "", "", "", "", ""])
    async with start_suite((INGEST,)) as suite:
        summary = await importer.run(path, importer.Options(address=suite.addresses["ingest"]))
        assert (summary.stored, summary.rejected, summary.acknowledged, summary.total_lines) == (3, 0, 5, 5)
        events = {event.type: event for event in await _events(suite)}
    order = events["track"]
    assert order.name == "Order Completed"
    assert convert.struct_to_dict(order.properties) == {
        "order_id": "o-1", "revenue": 19.99, "quantity": 2, "gift": True, "note": "fragile,\nhandle with care",
    }
    assert order.occurred_at.ToDatetime().replace(tzinfo=when.tzinfo) == when
    head = importer.fingerprint(path).head_sha256
    assert order.id == importer.derived_message_id(head, 2)
    person = events["identify"]
    assert person.id == "csv-2" and person.identifiers.email == "ada@example.com"
    assert convert.struct_to_dict(person.traits) == {"email": "ada@example.com", "vip": False, "zip": "01234"}
    page = events["page"]
    # The quoted cell spans lines 2-3, so the page is on line 5.
    assert page.identifiers.anonymous_id == "anon-7" and page.id == importer.derived_message_id(head, 5)


async def test_bad_records_are_reported_by_line_and_do_not_stop_the_import(start_suite, tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(_message(i)) for i in range(1, 31)]
    lines[2] = '{"type": "track", "userId": "u1", "event": '                     # line 3: not JSON
    lines[4] = json.dumps({"type": "track", "event": "Signed Up"})               # line 5: no user (ingest says)
    lines[6] = json.dumps({"type": "bogus", "userId": "u1"})                     # line 7: bad type (read here)
    lines[8] = ""                                                                # line 9: blank, skipped
    lines[10] = json.dumps({"type": "track", "userId": "u1", "event": "Order Completed"})  # line 11: no order_id
    path.write_text("\n".join(lines) + "\n")
    async with start_suite((INGEST,)) as suite:
        code, out, err = await _cdp("import", str(path), "--ingest", suite.addresses["ingest"])
        assert code == 2, err
        assert await _collected(suite) == 25
    assert "line 3: not JSON" in err
    assert "line 5: userId or anonymousId: user_id or anonymous_id is required" in err
    assert "line 7: type: must be one of" in err
    assert "line 11: properties.order_id: is required for 'Order Completed'" in err
    assert "stored      25" in out and "rejected    4" in out
    errors = [json.loads(line) for line in importer.errors_path(path).read_text().splitlines()]
    assert sorted(e["line"] for e in errors) == [3, 5, 7, 11]
    assert next(e for e in errors if e["line"] == 7)["record"] == lines[6]
    state = importer.load_state(path)
    assert state is not None and (state.acknowledged, state.stored, state.rejected) == (30, 25, 4)

    # A re-run sends nothing; the file still has rejected records.
    async with start_suite((INGEST,)) as suite:
        again = await importer.run(path, importer.Options(address=suite.addresses["ingest"]))
    assert (again.skipped, again.rejected, again.total_rejected, again.exit_code) == (29, 0, 4, 2)
    assert len(importer.errors_path(path).read_text().splitlines()) == 4


async def test_the_write_key_is_sent_as_metadata(start_suite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_WRITE_KEYS", "secret-key=crm-export")
    path = _write_jsonl(tmp_path / "events.jsonl", lines=5)
    async with start_suite((INGEST,)) as suite:
        options = importer.Options(address=suite.addresses["ingest"])
        with pytest.raises(importer.ImportFailed, match="write key"):
            await importer.run(path, replace(options, write_key="wrong"))
        summary = await importer.run(path, replace(options, write_key="secret-key"))
        assert summary.stored == 5
        assert {event.source for event in await _events(suite)} == {"crm-export"}


async def test_the_source_is_recorded_when_ingest_has_no_write_keys(start_suite, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "events.jsonl", lines=2)
    async with start_suite((INGEST,)) as suite:
        await importer.run(path, importer.Options(address=suite.addresses["ingest"], source="legacy-crm"))
        assert {event.source for event in await _events(suite)} == {"legacy-crm"}


async def test_a_changed_file_is_not_resumed(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "events.jsonl", lines=10)
    importer.save_state(path, importer.State(importer.fingerprint(path), acknowledged=4, stored=4))
    _write_jsonl(path, lines=11)
    code, _, err = await _cdp("import", str(path), "--ingest", f"127.0.0.1:{free_port()}")
    assert code == 1
    assert "has changed since its import began" in err and "--restart" in err


async def test_import_help_documents_the_exit_status() -> None:
    code, out, _ = await _cdp("import", "--help")
    assert code == 0
    assert "75" in out and "resume" in out and "CDP_WRITE_KEY" in out
