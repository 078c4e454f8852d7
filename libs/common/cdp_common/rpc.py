"""What the services' gRPC interceptors share: one wrapper per method, built once, that observes
each call's start and end whatever the method's shape, and the status a call ended with."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc


class CallObserver(Protocol):
    """Sees one method's calls: `start` before the servicer runs, `end` after its last response."""

    def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...

    def end(self, started: Any, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> None: ...


class PerMethodInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once (`wrap`), on its first call; this runs on every call."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}

    def wrap(self, method: str, handler: Any) -> Any:
        raise NotImplementedError

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(details)
        if handler is None:
            return handler  # an unknown method: not cached, so labels stay bounded
        self._wrapped[method] = self.wrap(method, handler)
        return self._wrapped[method]


class ObservingInterceptor(PerMethodInterceptor):
    """Wraps every method `observer_for` gives an observer (None: left as it is)."""

    def __init__(self, observer_for: Callable[[str], CallObserver | None]) -> None:
        super().__init__()
        self._observer_for = observer_for

    def wrap(self, method: str, handler: Any) -> Any:
        observer = self._observer_for(method)
        return handler if observer is None else _observed(handler, observer)


def _observed(handler: Any, observer: CallObserver) -> Any:
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=_unary(handler.unary_unary, observer))
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=_unary(handler.stream_unary, observer))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=_streaming(handler.unary_stream, observer))
    if handler.stream_stream is not None:
        return handler._replace(stream_stream=_streaming(handler.stream_stream, observer))
    return handler


def _unary(behavior: Callable[..., Any], observer: CallObserver) -> Callable[..., Any]:
    async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started, error = observer.start(context), None
        try:
            result = behavior(request, context)
            return (await result) if inspect.isawaitable(result) else result
        except BaseException as caught:
            error = caught
            raise
        finally:
            observer.end(started, context, error)

    return observed


def _streaming(behavior: Callable[..., Any], observer: CallObserver) -> Callable[..., AsyncIterator[Any]]:
    async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started, error = observer.start(context), None
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                await result  # a handler that writes with context.write() and returns nothing
            elif hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:
                for response in result:
                    yield response
        except BaseException as caught:
            error = caught
            raise
        finally:
            observer.end(started, context, error)

    return observed


def call_status(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with: set by the handler (or its abort), else from how it ended."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
