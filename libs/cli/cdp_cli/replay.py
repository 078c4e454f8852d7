"""`cdp replay profile`: rebuild profile's read model from the log, with a progress bar.

The profile service does the work (`ProfileService.Rebuild`): it fills a new schema from the
start of the log while it keeps answering from the current one, then swaps them. This command
starts it and shows how far it has got; Ctrl-C cancels it and leaves the current read model.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_cli import options

READ_MODELS = ("profile",)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "replay", help="drop and rebuild a read model from the log while the service keeps answering",
        description="Rebuild a service's read model from the event log into a new schema, then swap it in. "
        "The service answers from the current read model until the new one has caught up.",
    )
    parser.add_argument("read_model", choices=READ_MODELS, help="the read model to rebuild")
    options.add_address_option(parser, "profile")
    return parser


async def _rebuild(address: str, console: Console) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        last = profile_pb2.RebuildProgress()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("rebuilding profile", total=None, rate="")
            try:
                async for step in stub.Rebuild(profile_pb2.RebuildRequest()):
                    last = step
                    rate = f"{step.events / step.seconds:,.0f} events/s" if step.seconds else ""
                    bar.update(task, description=f"{step.phase} profile", completed=step.sequence,
                               total=max(step.target, step.sequence) or None, rate=rate)
            except grpc.aio.AioRpcError as error:
                bar.stop()
                console.print(f"cdp replay: {error.code().name}: {error.details()}")
                return 1
    if last.phase != "done":
        console.print("cdp replay: the profile service ended the rebuild before it was done; the current "
                      "read model is unchanged")
        return 1
    overall = last.events / last.seconds if last.seconds else 0.0
    console.print(f"profile rebuilt from the log: {last.events:,} events up to sequence {last.sequence:,} "
                  f"in {last.seconds:.1f}s ({overall:,.0f} events/s), {last.skipped:,} skipped; now serving from it")
    return 0


def command(args: argparse.Namespace) -> int:
    address = options.service_address("profile", args.profile)
    console = Console(stderr=True, highlight=False)
    try:
        return asyncio.run(_rebuild(address, console))
    except KeyboardInterrupt:
        console.print("cdp replay: cancelled; the current read model is unchanged")
        return 130
