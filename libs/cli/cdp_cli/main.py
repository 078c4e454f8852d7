"""`cdp up` runs the whole suite on this machine; `cdp demo` runs it with the seed story;
`cdp import` backfills a file of events; `cdp replay profile` rebuilds a read model from the log;
`cdp dlq` handles dead letters; `cdp status` shows each service's health and its consumers' lag."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from cdp_cli import bench, demo, dlq, importer, infra, options, replay, status, suite


# `cdp up` gives up on a service that exits this many times within this many seconds.
CRASH_LOOP_EXITS = 5
CRASH_LOOP_SECONDS = 60


def up(data_dir: Path) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with infra.servers(data_dir, dict(os.environ)) as settings, suite.services(data_dir, settings) as running:
        print(f"CDP is up (data in {data_dir})")
        print(f"  {'NATS JetStream':<14} {settings['CDP_NATS_URL']}")
        print(f"  {'PostgreSQL':<14} {settings['CDP_DATABASE_URL']}")
        print(f"  {'SMTP':<14} {settings['CDP_SMTP_HOST']}:{settings['CDP_SMTP_PORT']}"
              + (f" -> {settings['CDP_MAILDIR']}" if "CDP_MAILDIR" in settings else ""))
        for service in running:
            extra = "".join(f"  {label} {url}" for label, url in service.extra.items())
            print(f"  {service.name:<14} grpc {service.address}{extra}  (logs: {service.log_file})")
        # So that `cdp status`, `cdp dlq` and `cdp replay` find this suite without flags.
        options.write_endpoints(data_dir, settings["CDP_NATS_URL"], {s.name: s.address for s in running})
        print("Press Ctrl-C to stop.", flush=True)
        try:
            # A service that exits (killed, or on purpose: a consumer whose database session died exits
            # so that it starts afresh) is started again, as Kubernetes would; one that keeps exiting
            # (a crash loop, e.g. a bad setting) stops the suite.
            exits: dict[str, list[float]] = {}
            while not stop.is_set():
                for service in running:
                    if service.process.poll() is None:
                        continue
                    now = time.monotonic()
                    recent = [t for t in exits.get(service.name, []) if now - t < CRASH_LOOP_SECONDS]
                    code = service.process.returncode
                    if len(recent) >= CRASH_LOOP_EXITS:
                        print(f"service {service.name} exited with code {code} {len(recent) + 1} times within "
                              f"{CRASH_LOOP_SECONDS} s; stopping. See {service.log_file}", file=sys.stderr)
                        return 1
                    print(f"service {service.name} exited with code {code}; restarting it. See {service.log_file}",
                          file=sys.stderr, flush=True)
                    exits[service.name] = [*recent, now]
                    suite.restart(service)
                stop.wait(0.5)
        finally:
            options.remove_endpoints(data_dir)
        print("stopping...", flush=True)
    print("stopped.")
    return 0


def run_demo(data_dir: Path | None) -> int:
    temporary = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="cdp-demo-")) if data_dir is None else data_dir
    started = time.monotonic()
    try:
        print(f"Starting NATS JetStream, PostgreSQL, an SMTP sink and six services (data in {directory})...", flush=True)
        with infra.servers(directory, dict(os.environ)) as settings, suite.services(directory, settings) as running:
            print(f"Suite up in {time.monotonic() - started:.1f}s. Loading seeds/demo through the gRPC APIs:", flush=True)
            addresses = {s.name: s.address for s in running}
            asyncio.run(demo.run(addresses, settings, directory))
        print(f"Demo finished in {time.monotonic() - started:.1f}s.")
        return 0
    finally:
        if temporary and os.environ.get("CDP_KEEP_DEMO_DATA") != "1":
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cdp", description="Customer Data Platform suite")
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="run NATS, PostgreSQL, SMTP sink and the six services until Ctrl-C")
    up_parser.add_argument("--data-dir", type=Path, default=None, help="where data is kept (default ./.cdp)")
    demo_parser = commands.add_parser("demo", help="bring the suite up, run the seed story, report, stop")
    demo_parser.add_argument("--data-dir", type=Path, default=None, help="keep the demo's data here")
    importer.add_parser(commands)
    replay.add_parser(commands)
    dlq.add_parser(commands)
    bench.add_parser(commands)
    status.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "import":
        sys.exit(importer.command(args))
    if args.command == "replay":
        sys.exit(replay.command(args))
    if args.command == "dlq":
        sys.exit(dlq.command(args))
    if args.command == "bench":
        sys.exit(bench.command(args))
    if args.command == "status":
        sys.exit(status.command(args))
    try:
        if args.command == "up":
            sys.exit(up((args.data_dir or options.default_data_dir()).resolve()))
        sys.exit(run_demo(args.data_dir.resolve() if args.data_dir else None))
    except infra.InfraError as error:
        sys.exit(f"cdp: {error}")
