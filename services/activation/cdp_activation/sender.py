"""Delivers queued sends over one kept SMTP connection, a transaction per message, and records the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.message import EmailMessage, Message
from email.utils import formatdate

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_common import eventlog
from cdp_common.consumer import infrastructure_failure
from cdp_common.db import Outbox
from cdp_activation import store

log = structlog.get_logger("cdp.activation.sender")

MAX_ATTEMPTS = 5
# How long a stopping sender waits for the message in hand (longer than the SMTP timeout).
FINISH_SECONDS = 15.0


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    timeout_seconds: float = 10.0


# A body goes as it is (7bit, or 8bit with UTF-8) while its lines fit this; otherwise it is
# quoted-printable, as EmailMessage.set_content decides too.
_PLAIN_LINE = 78
_QUOTED = Charset("utf-8")
_QUOTED.body_encoding = QP


def _message(send: store.Send) -> Message:
    """The email of a send. Built as a plain (compat32) `Message`: with `EmailMessage`'s header
    registry and content manager, composing and sending it took 1.9 ms of CPU against 0.3 ms
    (bench/activation.md). Addresses are checked to be whitespace-free (`core.recipient`,
    `core.check_campaign`) and the subject to be one line (`core.render`), so no header can carry
    another; a non-ASCII address needs SMTPUTF8, which `EmailMessage` negotiates through
    `smtplib.send_message`."""
    if not (send.from_address.isascii() and send.recipient.isascii()):
        return _international(send)
    message = Message()
    message["From"] = send.from_address
    message["To"] = send.recipient
    subject = send.subject
    # Encoded words, the first line's room after "Subject: " allowed for.
    message["Subject"] = subject if subject.isascii() else Header(subject, "utf-8", header_name="Subject").encode()
    _common_headers(message, send)
    message["MIME-Version"] = "1.0"
    if any(len(line) > _PLAIN_LINE for line in send.body.splitlines()):
        message.set_payload(send.body, _QUOTED)
    else:
        message["Content-Type"] = 'text/plain; charset="utf-8"'
        message["Content-Transfer-Encoding"] = "7bit" if send.body.isascii() else "8bit"
        # The UTF-8 bytes as the generator writes them back out (what set_payload does for 8bit).
        message.set_payload(send.body.encode().decode("ascii", "surrogateescape"))
    return message


def _international(send: store.Send) -> EmailMessage:
    message = EmailMessage()
    message["From"] = send.from_address
    message["To"] = send.recipient
    message["Subject"] = send.subject
    _common_headers(message, send)
    message.set_content(send.body)
    return message


def _common_headers(message: Message, send: store.Send) -> None:
    message["Date"] = formatdate(localtime=False)
    # The send id as Message-ID lets a receiving system drop the rare duplicate after a crash.
    message["Message-ID"] = f"<{send.send_id}@cdp.activation>"
    message["X-CDP-Campaign"] = send.campaign_id


class SmtpSession:
    """One SMTP connection kept from message to message: a connection per message costs a connect,
    EHLO and QUIT on both sides. Before each reuse a NOOP checks it, so a connection the server
    dropped while idle is replaced before a message goes on it; after any failure it is dropped.
    Used from one thread at a time (the sender sends one message at a time)."""

    def __init__(self, smtp: SmtpSettings) -> None:
        self._smtp = smtp
        self._client: smtplib.SMTP | None = None

    def deliver(self, send: store.Send) -> None:
        message = _message(send)
        client = self._open()
        try:
            client.send_message(message)
        except BaseException:
            self.close()
            raise

    def _open(self) -> smtplib.SMTP:
        if self._client is not None:
            try:
                if self._client.noop()[0] == 250:
                    return self._client
            except (smtplib.SMTPException, OSError):
                pass
            self.close()
        self._client = smtplib.SMTP(self._smtp.host, self._smtp.port, timeout=self._smtp.timeout_seconds)
        return self._client

    def close(self, send_quit: bool = True) -> None:
        """Ends the session (`send_quit=False`: drops the connection without a QUIT round trip)."""
        client, self._client = self._client, None
        if client is not None:
            if send_quit:
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    client.quit()
            client.close()


def _permanent(error: Exception) -> bool:
    if isinstance(error, smtplib.SMTPRecipientsRefused | smtplib.SMTPSenderRefused):
        return True
    return isinstance(error, smtplib.SMTPResponseException) and 500 <= error.smtp_code < 600


class Sender:
    def __init__(self, engine: AsyncEngine, outbox: Outbox, topology: eventlog.Topology, smtp: SmtpSettings) -> None:
        self._engine = engine
        self._outbox = outbox
        self._topology = topology
        self._session = SmtpSession(smtp)
        self.wake = asyncio.Event()

    async def run(self) -> None:
        try:
            while True:
                try:
                    done = await self.send_pending()
                except Exception as error:  # noqa: BLE001 - the sender must go on
                    log.error("sender_failed", error=repr(error))
                    done = 0
                if done == 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), 0.25)
                    except TimeoutError:
                        pass
        finally:
            # Stopping: no QUIT round trip on the event loop (the server may be the one gone).
            self._session.close(send_quit=False)

    async def send_pending(self, limit: int = 50) -> int:
        async with self._engine.connect() as conn:
            ids = await store.pending_ids(conn, limit)
        handled = 0
        for send_id in ids:
            # Claimed (`sending`) and committed before the SMTP server gets the message: if the
            # outcome were written in the claiming transaction, losing it after the server accepted
            # the message (PostgreSQL restarting, this process killed) would put the send back in
            # the queue, and it would go out twice. A send a dying process leaves `sending` is not
            # tried again: at most one email per trigger.
            async with self._engine.begin() as conn:
                send = await store.claim(conn, send_id)
            if send is None:
                continue
            # Stopping the sender (SIGTERM) lets the message in hand finish: cut off half-way, it
            # would stay `sending`.
            sending = asyncio.ensure_future(self._send(send))
            try:
                handled += await asyncio.shield(sending)
            except asyncio.CancelledError:
                await asyncio.wait([sending], timeout=FINISH_SECONDS)
                raise
        if handled:
            await self._outbox.flush()
        return handled

    async def _send(self, send: store.Send) -> int:
        with structlog.contextvars.bound_contextvars(send_id=send.send_id, campaign_id=send.campaign_id):
            try:
                await asyncio.to_thread(self._session.deliver, send)
            except (smtplib.SMTPException, OSError) as error:
                failed = _permanent(error) or send.attempts >= MAX_ATTEMPTS
                await self._record(send, "failed" if failed else "pending", repr(error))
                log.warning("send_failed", error=repr(error), final=failed)
                return 0
            await self._record(send, "sent")
            log.info("message_sent", channel="email")
            return 1

    async def _record(self, send: store.Send, status: str, error: str | None = None) -> None:
        """Stores how a delivery went, waiting for the database if need be: only this process knows."""
        while True:
            try:
                async with self._engine.begin() as conn:
                    await store.finish(conn, send.send_id, status, error)
                    if status == "sent":
                        await self._outbox.add(conn, [self._sent_event(send)])
                return
            except Exception as caught:  # noqa: BLE001 - decided below
                if not infrastructure_failure(caught):
                    raise
                log.warning("send_not_recorded", status=status, error=repr(caught))
                await asyncio.sleep(0.5)

    def _sent_event(self, send: store.Send) -> eventlog.Outgoing:
        event = eventlog.new_event(
            "message_sent", event_id=eventlog.derived_id(send.send_id, "sent"), source="activation"
        )
        event.profile_id = send.profile_id
        event.message_sent.send_id = send.send_id
        event.message_sent.campaign_id = send.campaign_id
        event.message_sent.channel = "email"
        event.message_sent.recipient = send.recipient
        event.message_sent.segment_id = send.segment_id
        return eventlog.Outgoing(self._topology.keyed("activation", send.profile_id, "sent"), event)
