"""Activation's SMTP session against a real SMTP server (aiosmtpd): one connection for a run of
messages, and a new one when the server dropped the old."""

from __future__ import annotations

from dataclasses import dataclass, field
from email import message_from_bytes
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from cdp_activation.sender import SmtpSession, SmtpSettings
from cdp_activation.store import Send
from cdp_cli.infra import free_port


@dataclass
class Recorder:
    """Each message's To: and the client port (one per connection) it came over."""

    received: list[tuple[str, int]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((str(message_from_bytes(envelope.content)["To"]), session.peer[1]))
        return "250 OK"


def send(n: int) -> Send:
    return Send(send_id=f"s{n}", campaign_id="c", profile_id=f"p{n}", segment_id="seg",
                recipient=f"user{n}@example.com", from_address="shop@example.com", subject="Hi", body="Hello",
                attempts=1)


def test_a_run_of_messages_shares_one_connection_and_a_dropped_one_is_replaced() -> None:
    recorder, port = Recorder(), free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    session = SmtpSession(SmtpSettings("127.0.0.1", port, timeout_seconds=5))
    try:
        for n in range(3):
            session.deliver(send(n))
        assert [to for to, _ in recorder.received] == [f"user{n}@example.com" for n in range(3)]
        assert len({peer for _, peer in recorder.received}) == 1

        # The server goes away (a restart, an idle timeout): nothing can be sent meanwhile, and the
        # next message after it is back goes over a new connection.
        controller.stop()
        with pytest.raises(OSError):
            session.deliver(send(3))
        controller = Controller(recorder, hostname="127.0.0.1", port=port)
        controller.start()
        session.deliver(send(4))
        session.deliver(send(5))
    finally:
        session.close()
        controller.stop()
    assert [to for to, _ in recorder.received][3:] == ["user4@example.com", "user5@example.com"]
    assert len({peer for _, peer in recorder.received}) == 2
