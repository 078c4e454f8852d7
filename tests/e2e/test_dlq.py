"""`cdp dlq` as an operator runs it, against dead letters the running services made."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cdp.ingest.v1 import ingest_pb2
from cdp.profile.v1 import profile_pb2
from cdp.v1 import event_pb2
from cdp_cli.infra import free_port
from cdp_cli.settle import subject_count
from cdp_common import convert, eventlog
from cdp_identity.main import DEFINITION as IDENTITY
from cdp_ingest.main import DEFINITION as INGEST
from cdp_profile.main import DEFINITION as PROFILE
from cdp_segmentation.main import DEFINITION as SEGMENTATION

pytestmark = pytest.mark.timeout(120)

CDP = str(Path(sys.executable).parent / "cdp")


async def cdp(nats_url: str, namespace: str, *args: str) -> tuple[int, str, str]:
    """Runs `cdp dlq ARGS` as a process (without blocking the services in this event loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update(CDP_NATS_URL=nats_url, CDP_NAMESPACE=namespace, COLUMNS="300")
    process = await asyncio.create_subprocess_exec(
        CDP, "dlq", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def order(event_id: str, user_id: str, revenue: float) -> ingest_pb2.TrackRequest:
    return ingest_pb2.TrackRequest(
        event_id=event_id, identifiers=event_pb2.Identifiers(user_id=user_id), event="Order Completed",
        properties=convert.dict_to_struct({"order_id": f"o-{event_id}", "revenue": revenue, "currency": "EUR"}),
    )


async def profile_of(suite: Any, user_id: str) -> event_pb2.ProfileSnapshot:
    return await suite.profile.GetProfile(
        profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="user_id", value=user_id)))


def letter_rows(table: str) -> dict[int, str]:
    """The table's rows by dead-letter sequence."""
    return {int(m.group(1)): line for line in table.splitlines() if (m := re.match(r"\s*(\d+)\s", line))}


async def letters(suite: Any, consumer: str) -> int:
    return await subject_count(suite.js, suite.topology.stream("deadletter"), suite.topology.deadletter(consumer))


async def test_a_letter_is_listed_shown_and_once_its_cause_is_fixed_redriven_and_applied_once(
    start_suite: Any, nats_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator's rules block user ids starting "guest-": too broad, real customers have them.
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"blocked": ["^guest-.*$", "^null$"]}))
    monkeypatch.setenv("CDP_IDENTITY_RULES", str(rules))
    async with start_suite((INGEST, PROFILE)) as suite:
        async with start_suite((IDENTITY,)):
            await suite.ingest.Track(order("o1", "guest-7", 42.0))
            await eventually(lambda: _has(letters(suite, "identity-resolve"), 1))
            await suite.settle()

        code, out, err = await cdp(nats_url, namespace, "list")
        assert code == 0, err
        [(seq, row)] = letter_rows(out).items()
        assert "identity-resolve" in row and "usable identifier" in row and "dead" in row
        assert suite.topology.collected("track") in row and f"{suite.topology.stream('collected')} #1" in row
        assert "1 dead letter(s), 1 not re-driven" in err

        code, out, err = await cdp(nats_url, namespace, "show", str(seq))
        assert code == 0, err
        assert "event o1 carries no usable identifier" in out
        shown = json.loads(out[out.index("{"):])
        assert shown["id"] == "o1" and shown["name"] == "Order Completed"
        assert shown["identifiers"]["user_id"] == "guest-7"

        code, _, err = await cdp(nats_url, namespace, "show", "999")
        assert (code, err.strip()) == (1, f"cdp dlq: no dead letter at sequence 999 of {suite.topology.stream('deadletter')}")

        # The cause is fixed: identity restarts with rules that let guest ids link.
        rules.write_text(json.dumps({"blocked": ["^null$"]}))
        async with start_suite((IDENTITY,)):
            code, out, err = await cdp(nats_url, namespace, "redrive", str(seq))
            assert code == 0, err
            assert f"dead letter {seq} (identity-resolve): redriven to" in out
            await suite.settle()
            guest = await profile_of(suite, "guest-7")
            assert (guest.order_count, guest.revenue, guest.event_count) == (1, 42.0, 1)

            # Twice is once: the letter is marked, and `--all` finds nothing left.
            code, out, err = await cdp(nats_url, namespace, "redrive", str(seq))
            assert code == 0 and "already redriven" in out, err
            code, out, err = await cdp(nats_url, namespace, "redrive", "--all")
            assert code == 0 and "nothing to re-drive" in err
            await suite.settle()
            guest = await profile_of(suite, "guest-7")
            assert (guest.order_count, guest.revenue, guest.event_count) == (1, 42.0, 1)
            assert await letters(suite, "identity-resolve") == 1

            code, out, _ = await cdp(nats_url, namespace, "list", "--consumer", "identity-resolve")
            assert "redriven" in letter_rows(out)[seq]
            assert f"{suite.topology.stream('collected')} #2" in letter_rows(out)[seq]

            # Still blocked ("null"): re-driven, it is dead-lettered again, as a new letter, not lost.
            await suite.ingest.Track(order("o2", "null", 5.0))
            await eventually(lambda: _has(letters(suite, "identity-resolve"), 2))
            code, out, err = await cdp(nats_url, namespace, "redrive", "--all", "--consumer", "identity-resolve")
            assert code == 0 and out.count("redriven to") == 1, err
            await eventually(lambda: _has(letters(suite, "identity-resolve"), 3))
            code, out, _ = await cdp(nats_url, namespace, "list")
            rows = letter_rows(out)
            assert len(rows) == 3
            newest = rows[max(rows)]
            assert "event o2 carries no usable identifier" in newest and newest.split()[-1] == "dead"
            assert all("redriven" in rows[s] for s in sorted(rows)[:2])

    code, _, err = await cdp(f"nats://127.0.0.1:{free_port()}", namespace, "list")
    assert code == 75 and "NATS is unavailable" in err


async def _has(count: Awaitable[int], wanted: int) -> bool:
    return await count >= wanted


async def test_a_redriven_event_already_applied_changes_nothing_and_shared_subjects_need_force(
    start_suite: Any, nats_url: str, namespace: str
) -> None:
    async with start_suite((INGEST, IDENTITY, PROFILE, SEGMENTATION)) as suite:
        await suite.ingest.Track(order("o1", "u-1", 25.0))
        await suite.settle()
        before = await profile_of(suite, "u-1")
        assert (before.order_count, before.revenue) == (1, 25.0)

        # profile-project "gave up" on a resolved event it had in fact applied (e.g. it failed after
        # its effect): re-driving it must not count the order twice (the timeline's event id key).
        identity = suite.topology.stream("identity")
        resolved = next(m for m in await _messages(suite, identity) if eventlog.decode(m.data).type == "track")
        await _fake_letter(suite, "profile-project", identity, resolved)
        # Likewise a profile change segmentation and the DMP bridge both consume.
        profile_stream = suite.topology.stream("profile")
        changed = (await _messages(suite, profile_stream))[-1]
        await _fake_letter(suite, "dmp-identities", profile_stream, changed)

        code, out, err = await cdp(nats_url, namespace, "redrive", "--all", "--consumer", "profile-project")
        assert code == 0 and "redriven to" in out, err
        await suite.settle()
        after = await profile_of(suite, "u-1")
        assert (after.order_count, after.revenue, after.event_count) == (1, 25.0, 1)
        assert await letters(suite, "profile-project") == 1  # applied (as a no-op), not dead-lettered

        code, _, err = await cdp(nats_url, namespace, "redrive", "--all", "--consumer", "dmp-identities")
        assert code == 1 and "would also reach segmentation-evaluate" in " ".join(err.split())
        code, out, err = await cdp(nats_url, namespace, "redrive", "--all", "--consumer", "dmp-identities", "--force")
        assert code == 0 and "redriven to" in out, err

        # A resolved event without a profile id is refused by profile for good: re-driven, it comes back.
        orphan = eventlog.new_event("track", event_id="orphan-1", source="test")
        await suite.js.publish(suite.topology.keyed("identity", "p-x", "resolved"), eventlog.encode(orphan),
                               headers=eventlog.Outgoing("", orphan).headers())
        await eventually(lambda: _has(letters(suite, "profile-project"), 2))
        code, out, _ = await cdp(nats_url, namespace, "list", "--consumer", "profile-project")
        seq = max(letter_rows(out))
        code, out, err = await cdp(nats_url, namespace, "redrive", str(seq))
        assert code == 0, err
        await eventually(lambda: _has(letters(suite, "profile-project"), 3))
        code, out, _ = await cdp(nats_url, namespace, "show", str(max(letter_rows((await cdp(
            nats_url, namespace, "list", "--consumer", "profile-project"))[1]))))
        assert "reached profile without a profile_id" in out and '"id": "orphan-1"' in out

        code, _, err = await cdp(nats_url, namespace, "list", "--consumer", "a.b")
        assert code == 1 and "--consumer" in err


async def _messages(suite: Any, stream: str) -> list[Any]:
    state = (await suite.js.stream_info(stream)).state
    return [await suite.js.get_msg(stream, seq) for seq in range(state.first_seq, state.last_seq + 1)]


async def _fake_letter(suite: Any, consumer: str, stream: str, message: Any) -> None:
    letter = eventlog.new_event("dead_lettered", event_id=f"fake-{consumer}-{message.seq}", source=consumer)
    detail = letter.dead_lettered
    detail.consumer, detail.stream, detail.stream_sequence = consumer, stream, message.seq
    detail.original_subject, detail.original_payload = message.subject, message.data
    detail.error, detail.attempts = "RuntimeError('connection reset after commit')", 5
    await suite.js.publish(suite.topology.deadletter(consumer), eventlog.encode(letter),
                           headers=eventlog.Outgoing("", letter).headers())

