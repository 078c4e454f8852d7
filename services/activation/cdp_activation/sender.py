"""Delivers queued sends over SMTP, one transaction per message, and records the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
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


def _deliver(smtp: SmtpSettings, send: store.Send) -> None:
    message = EmailMessage()
    message["From"] = send.from_address
    message["To"] = send.recipient
    message["Subject"] = send.subject
    message["Date"] = formatdate(localtime=False)
    # The send id as Message-ID lets a receiving system drop the rare duplicate after a crash.
    message["Message-ID"] = f"<{send.send_id}@cdp.activation>"
    message["X-CDP-Campaign"] = send.campaign_id
    message.set_content(send.body)
    client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_seconds)
    try:
        client.send_message(message)
    finally:
        # Once the server has accepted the message, a failing QUIT must not count as a failed
        # delivery (it would be sent again).
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
        self._smtp = smtp
        self.wake = asyncio.Event()

    async def run(self) -> None:
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
                await asyncio.to_thread(_deliver, self._smtp, send)
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
