"""Pull batches from a durable JetStream consumer, one request ahead, without a task per message.

nats-py's `fetch` waits for every delivered message in its own task (`next_msg` under
`wait_for`, named with a fresh uuid4); at a few thousand messages a second that bookkeeping costs
more than the consumer's own work. `Puller` sends the pull requests itself
(`$JS.API.CONSUMER.MSG.NEXT`), each with its own inbox subscription, and collects each request's
messages in a callback:

- a `no_wait` request takes what is pending now, up to a batch, and ends at once;
- while batches come back full, the next one is requested before the caller applies this one,
  so its messages travel meanwhile;
- once caught up, a request for one message waits up to `expires_seconds`; then, with a
  `linger_seconds`, a batch that is not full waits that long for more messages before it is
  handed over (a lone event is late by at most the linger, and a consumer that keeps up with a
  steady trickle applies a few large batches a second instead of one per event or two: the cost of
  a batch, its transaction, checkpoint and commit, is paid once for many events). Without a
  linger, the rest of a batch is what is pending when the first message arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

# Statuses that end a pull request normally: no messages (404), expired (408), and 409s that
# a new request answers (as opposed to e.g. "Consumer Deleted").
_ENDED = ("404", "408")
_TRANSIENT_409 = ("Leadership Change", "Exceeded MaxWaiting", "Exceeded MaxAckPending", "Batch Completed")


class PullError(Exception):
    """JetStream refused the pull request (e.g. the consumer was deleted)."""


class _Request:
    """One pull request: its inbox subscription and what it delivered."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.msgs: list[Msg] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sub: Any = None

    async def on_msg(self, msg: Msg) -> None:
        if self.done.done():
            return  # a request given up on; JetStream redelivers its messages
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            self.msgs.append(msg)
            if len(self.msgs) >= self.size:
                self.done.set_result(None)
        elif status in _ENDED or (status == "409" and headers.get("Description", "") in _TRANSIENT_409):
            self.done.set_result(None)
        elif status != "100":  # 100: idle heartbeat
            self.done.set_exception(
                PullError(f"pull request refused: {status} {headers.get('Description', '')}".strip())
            )

    async def close(self) -> None:
        if not self.done.done():
            self.done.cancel()
        elif not self.done.cancelled():
            self.done.exception()  # retrieved, so asyncio does not warn about it
        if self.sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self.sub.unsubscribe()
            self.sub = None


class Puller:
    def __init__(
        self, nc: NATS, stream: str, durable: str, batch: int, expires_seconds: float, linger_seconds: float = 0.0
    ) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._batch = batch
        self._expires = expires_seconds
        self._linger = linger_seconds
        self._ahead: _Request | None = None

    async def _request(self, size: int, wait: float = 0.0) -> _Request:
        """A pull request for up to `size` messages: waiting up to `wait` seconds, or (0) taking
        what is pending now."""
        request = _Request(size)
        inbox = self._nc.new_inbox()
        request.sub = await self._nc.subscribe(inbox, cb=request.on_msg)
        body = {"batch": size, "expires": int(wait * 1e9)} if wait else {"batch": size, "no_wait": True}
        try:
            await self._nc.publish(self._subject, json.dumps(body).encode(), reply=inbox)
        except BaseException:
            await request.close()
            raise
        return request

    async def _collect(self, request: _Request) -> list[Msg]:
        try:
            # The server ends every request (at `expires` at the latest); the margin covers a
            # lost end-of-request status.
            await asyncio.wait_for(asyncio.shield(request.done), self._expires + 2.0)
        except TimeoutError:
            pass
        finally:
            await request.close()
        return request.msgs

    async def fetch(self) -> list[Msg]:
        """The next batch, in stream order; empty after `expires_seconds` without messages."""
        request, self._ahead = self._ahead, None
        msgs = await self._collect(request or await self._request(self._batch))
        if not msgs:
            msgs = await self._collect(await self._request(1, wait=self._expires))
            if msgs and not self._linger:
                msgs += await self._collect(await self._request(self._batch - 1))
        if msgs and self._linger and len(msgs) < self._batch:
            msgs += await self._collect(await self._request(self._batch - len(msgs), wait=self._linger))
        if len(msgs) >= self._batch:
            self._ahead = await self._request(self._batch)
        return msgs

    async def forget(self) -> None:
        """Drops the request sent ahead; what it delivers is ignored (and delivered again)."""
        request, self._ahead = self._ahead, None
        if request is not None:
            await request.close()
