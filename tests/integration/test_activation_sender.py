"""Activation's SMTP session against a real SMTP server (aiosmtpd): one connection for a run of
messages, and a new one when the server dropped the old."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

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


@dataclass
class Inbox:
    """Each message as the server received it, parsed as a mail client would."""

    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = BytesParser(policy=policy.default).parsebytes(envelope.content)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 OK"


@pytest.fixture(scope="module")
def inbox() -> Iterator[tuple[Inbox, SmtpSession]]:
    received, port = Inbox(), free_port()
    controller = Controller(received, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    session = SmtpSession(SmtpSettings("127.0.0.1", port, timeout_seconds=5))
    try:
        yield received, session
    finally:
        session.close()
        controller.stop()


# A subject as core.render leaves it (one line, single spaces) and any body: what reaches the
# recipient is what was rendered, whatever its characters and line lengths.
SUBJECTS = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=998).map(lambda t: " ".join(t.split()))
BODIES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=400)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(subject=SUBJECTS, body=BODIES, long_line=st.booleans(), local=st.sampled_from(["ada", "josé"]))
@example(subject=" ".join(["word"] * 199), body="Hello", long_line=False, local="ada")  # folded over lines
@example(subject="Olá " * 249 + "!", body="Olá\n" * 50, long_line=True, local="ada")
def test_the_recipient_reads_the_subject_and_body_as_rendered(
    inbox: tuple[Inbox, SmtpSession], subject: str, body: str, long_line: bool, local: str
) -> None:
    received, session = inbox
    if long_line:
        body += "\n" + "word " * 60 + ".\n."
    message = Send(send_id="s-prop", campaign_id="c", profile_id="p", segment_id="seg",
                   recipient=f"{local}@example.com", from_address="shop@example.com", subject=subject, body=body,
                   attempts=1)
    session.deliver(message)
    got = received.messages.pop()
    assert got["To"] == f"{local}@example.com"
    assert got["Subject"] == subject
    assert got["Message-ID"] == "<s-prop@cdp.activation>" and got["X-CDP-Campaign"] == "c"
    content = got.get_content().replace("\r\n", "\n")
    assert content in (body, body + "\n")
