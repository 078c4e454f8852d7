"""Long work of the profile service in a process of its own: a scoring round (survey.py) and a
rebuild's projection (replay.py).

Such work takes seconds to minutes of CPU. In the service's process it would take the interpreter
from the live consumer and the gRPC calls for that long: GetProfile and even the health check
waited seconds. A child runs on the other core, at a lower CPU priority.

The two talk over the child's stdin and stdout in frames: an 8-byte length, then a pickle. The
service sends requests; the child answers each with one or more `(kind, value)` frames, an answer
of kind "error" carrying the failure as text. The child ends with the service: at the end of its
input, when the service kills it, and, on Linux, when the service dies (`PR_SET_PDEATHSIG`), so no
work goes on behind the back of a restarted service.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import pickle
import signal
import struct
import sys
from collections.abc import AsyncIterator, Mapping
from typing import IO, Any

from cdp_common.service import GC_THRESHOLDS

HEADER = struct.Struct("!Q")
# The service's pid: the child ends with it.
PARENT_ENV = "CDP_PROFILE_PARENT"
_PR_SET_PDEATHSIG = 1
# How long a child may take to close its connections and exit at the end of its input.
EXIT_SECONDS = 10.0


def frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def read(stream: IO[bytes]) -> Any | None:
    """The child's next request, None at the end of its input."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return pickle.loads(stream.read(size))


def write(stream: IO[bytes], kind: str, value: Any) -> None:
    stream.write(frame((kind, value)))
    stream.flush()


def become_child() -> None:
    """In the child, first: ends with the service, leaves Ctrl-C to it, yields the CPU to it, and
    sets the collector as the service sets its own (with Python's defaults, a rebuild's child took
    about 30 µs more CPU per event: young collections every 700 objects, full ones over a heap of
    tens of thousands of profiles)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: an orphan ends once its answer has nowhere to go
    if os.getppid() != int(os.environ[PARENT_ENV]):  # the service was gone before the line above
        sys.exit(1)
    # Ctrl-C in a terminal reaches the whole process group; the service decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: the scheduler serves the service (and PostgreSQL) first.
    os.nice(10)
    gc.freeze()  # what the imports made stays out of every collection
    gc.set_threshold(*GC_THRESHOLDS)


class ChildFailed(Exception):
    """The child answered an error, or exited before answering (the message says which)."""


class Child:
    """A child process (`python -m <module>`) seen from the service."""

    def __init__(self, module: str, process: asyncio.subprocess.Process) -> None:
        self._module = module
        self._process = process

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, module: str, env: Mapping[str, str]) -> AsyncIterator[Child]:
        """Runs `python -m module` with `env` added to the service's environment (settings go by the
        environment: a command line is visible to every user of the host). Killed if the block
        fails or is cancelled; otherwise given the end of its input and time to exit."""
        spawning = asyncio.ensure_future(asyncio.create_subprocess_exec(
            sys.executable, "-m", module, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **env, PARENT_ENV: str(os.getpid())},
        ))
        try:
            process = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # Cancelled while the child was being started: it may exist already.
            with contextlib.suppress(Exception):
                await _ended(await spawning, kill=True)
            raise
        try:
            yield cls(module, process)
        except BaseException:
            await _ended(process, kill=True)
            raise
        else:
            await _ended(process, kill=False)

    async def send(self, request: Any) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(frame(request))
            await self._process.stdin.drain()
        except ConnectionError:
            raise ChildFailed(await self._exited()) from None

    async def receive(self) -> tuple[str, Any]:
        """The child's next answer; ChildFailed for an "error" one (its text is the message)."""
        assert self._process.stdout is not None
        try:
            (size,) = HEADER.unpack(await self._process.stdout.readexactly(HEADER.size))
            kind, value = pickle.loads(await self._process.stdout.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            raise ChildFailed(await self._exited()) from None
        if kind == "error":
            raise ChildFailed(str(value))
        return kind, value

    async def _exited(self) -> str:
        return f"{self._module} exited with code {await self._process.wait()}"


async def _ended(process: asyncio.subprocess.Process, kill: bool) -> None:
    """Ends a child: killed at once (`kill`), or given the end of its input and time to exit, and
    killed if it takes too long or the wait is cancelled. It never outlives this."""
    assert process.stdin is not None
    process.stdin.close()
    try:
        if not kill:
            await asyncio.wait_for(process.wait(), EXIT_SECONDS)
    except TimeoutError:
        pass
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
