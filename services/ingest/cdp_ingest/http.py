"""The HTTP collector: the Segment tracking API (also spoken by RudderStack and many SDKs).

POST /v1/track, /v1/identify, /v1/alias, /v1/page, /v1/screen, /v1/group and /v1/batch (also
/v1/import), JSON bodies, gzip accepted, the write key as HTTP basic auth user (or `writeKey` in
the body).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from aiohttp import web

from cdp_common import tracing
from cdp_ingest import core
from cdp_ingest.ingestor import INVALID, OK, Ingestor, Result, WriteKeys

log = structlog.get_logger("cdp.ingest.http")


_CODES = {400: "invalid_request", 401: "unauthorized", 413: "request_too_large", 503: "unavailable"}


def _error(status: int, message: str, **extra: Any) -> web.Response:
    # `code` and `message` as Segment's API answers (its SDKs read them); `error` for people.
    body = {"success": False, "code": _CODES.get(status, "error"), "message": message, "error": message}
    return web.json_response({**body, **extra}, status=status)


def _message(result: Result) -> str:
    if result.outcome != INVALID or not result.field:
        return result.error
    return f"{core.segment_field(result.field)}: {result.error.split(': ', 1)[-1]}"


class Collector:
    def __init__(self, ingestor: Ingestor, keys: WriteKeys) -> None:
        self._ingestor = ingestor
        self._keys = keys

    def app(self, middlewares: Sequence[Any] = ()) -> web.Application:
        app = web.Application(client_max_size=core.MAX_BATCH_BYTES, middlewares=middlewares)
        for kind in core.KINDS:
            app.router.add_post(f"/v1/{kind}", self._single(kind))
        app.router.add_post("/v1/batch", self.batch)
        app.router.add_post("/v1/import", self.batch)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "serving"})

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], str] | web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body larger than {core.MAX_BATCH_BYTES // (1024 * 1024)} MiB")
        except web.RequestPayloadError:
            # e.g. a body that is not the gzip or deflate data its Content-Encoding says it is
            return _error(400, f"body cannot be decoded as its Content-Encoding ({request.headers.get('Content-Encoding')})")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "body is not JSON (gzip needs Content-Encoding: gzip)")
        except RecursionError:
            return _error(400, "body is nested too deeply")
        if not isinstance(payload, dict):
            return _error(400, "body must be a JSON object")
        key = WriteKeys.from_basic(request.headers.get("Authorization")) or payload.get("writeKey")
        source = self._keys.source(key if isinstance(key, str) else None, "http")
        if source is None:
            return _error(401, "unknown write key: send it as the basic auth user name")
        return payload, source

    def _single(self, kind: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            read = await self._read(request)
            if isinstance(read, web.Response):
                return read
            payload, source = read
            try:
                item: core.Incoming | core.InvalidField = core.from_segment(payload, kind)
            except core.InvalidField as error:
                item = error
            [result] = await self._ingestor.ingest(
                [item], source=source, correlation_id=_correlation(request), trace=tracing.request_trace(request.headers)
            )
            if result.outcome == INVALID:
                return _error(400, _message(result))
            if result.outcome != OK:
                return _unavailable(result.error)
            return web.json_response({"success": True, "messageId": result.event_id, "duplicate": result.duplicate})

        return handle

    async def batch(self, request: web.Request) -> web.Response:
        read = await self._read(request)
        if isinstance(read, web.Response):
            return read
        payload, source = read
        messages = payload.get("batch")
        if not isinstance(messages, list):
            return _error(400, "batch: must be a JSON array of messages")
        if len(messages) > core.MAX_BATCH_EVENTS:
            return _error(400, f"batch: more than {core.MAX_BATCH_EVENTS} messages")
        try:
            sent_at = core.from_segment({"type": "track", "sentAt": payload.get("sentAt")}).sent_at
        except core.InvalidField as error:
            return _error(400, f"sentAt: {error.reason}")
        shared_context = payload.get("context") if isinstance(payload.get("context"), dict) else {}
        items: list[core.Incoming | core.InvalidField] = []
        for message in messages:
            own_context = message.get("context") if isinstance(message, dict) else None
            if shared_context and isinstance(message, dict) and isinstance(own_context, dict | None):
                message = {**message, "context": {**shared_context, **(own_context or {})}}
            try:
                items.append(core.from_segment(message, batch_sent_at=sent_at))
            except core.InvalidField as error:
                items.append(error)
        results = await self._ingestor.ingest(
            items, source=source, correlation_id=_correlation(request), trace=tracing.request_trace(request.headers)
        )
        if any(r.outcome not in (OK, INVALID) for r in results):
            return _unavailable(next(r.error for r in results if r.outcome not in (OK, INVALID)))
        rejected: list[dict[str, Any]] = [
            {"index": r.index, "messageId": r.event_id, "error": _message(r)} for r in results
            if r.outcome == INVALID
        ]
        stored = len(results) - len(rejected)
        log.info("batch_collected", events=len(results), stored=stored)
        if results and stored == 0:
            first = rejected[0]["error"]
            message = first if len(rejected) == 1 else f"no valid message in the batch; the first: {first}"
            return _error(400, message, rejected=rejected)
        return web.json_response({"success": True, "stored": stored, "rejected": rejected})


def _correlation(request: web.Request) -> str:
    return request.headers.get("X-Correlation-Id") or str(uuid.uuid4())


def _unavailable(message: str) -> web.Response:
    response = _error(503, message)
    response.headers["Retry-After"] = "1"
    return response
