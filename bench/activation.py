#!/usr/bin/env python
"""How fast activation's SMTP session hands emails to a server, and what composing one costs.

    .venv/bin/python bench/activation.py [--messages N] [--runs R] [--json OUT]

An aiosmtpd server (`python -m aiosmtpd`, its Sink handler: it accepts and drops each message) runs
in its own process on a free port. In this process, `cdp_activation.sender.SmtpSession` delivers N
campaign emails of a realistic size (a subject with the recipient's name, a 1.2 KB body of short
lines), one after the other, as the sender does, each composed by:

  message         the sender's own composition (`sender._message`: a plain compat32 Message)
  EmailMessage    the same email built with `email.message.EmailMessage` and set_content (what the
                  sender did before, and still does for addresses that need SMTPUTF8)

The two alternate within each run, on the same kept connection. Rates are emails/s; CPU is per
email, of this process (composition, smtplib) and of the server process. Medians over runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import psutil

from cdp_activation import sender
from cdp_activation.store import Send
from cdp_cli.infra import free_port

REPO = Path(__file__).resolve().parent.parent
BODY = "\n".join([
    "Hi {name},",
    "",
    "Thanks for shopping with us. Your last order is on its way, and we picked a few things",
    "we think go well with it: the walking boots you looked at, a rain jacket in your size,",
    "and the wool socks other customers bought with them.",
    "",
    "Use the code THANKS10 at checkout for 10% off your next order, until the end of the month.",
    "",
    "See you soon,",
    "The Shop team",
] * 2)


def sends(n: int) -> list[Send]:
    names = ("Ada", "Grace", "Alan", "Edsger", "Barbara")
    return [Send(send_id=f"bench-{i}", campaign_id="welcome", profile_id=f"p{i}", segment_id="buyers",
                 recipient=f"customer{i}@example.com", from_address="shop@example.com",
                 subject=f"{names[i % 5]}, something for your next order", body=BODY.format(name=names[i % 5]),
                 attempts=0) for i in range(n)]


def start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                               "-c", "aiosmtpd.handlers.Sink"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(c.laddr.port == port for c in psutil.Process(server.pid).net_connections() if c.status == "LISTEN"):
            return server
        time.sleep(0.05)
    server.kill()
    raise RuntimeError("aiosmtpd did not start listening")


def deliver_all(session: sender.SmtpSession, batch: list[Send], compose: Callable[[Send], Message],
                server: psutil.Process) -> dict[str, float]:
    me = psutil.Process()
    own, sender._message = sender._message, compose  # deliver() composes with it
    try:
        before, server_before, began = me.cpu_times(), server.cpu_times(), time.perf_counter()
        for send in batch:
            session.deliver(send)
        seconds = time.perf_counter() - began
    finally:
        sender._message = own
    after, server_after = me.cpu_times(), server.cpu_times()
    client = (after.user + after.system) - (before.user + before.system)
    served = (server_after.user + server_after.system) - (server_before.user + server_before.system)
    return {"emails_per_s": len(batch) / seconds, "client_us": 1e6 * client / len(batch),
            "server_us": 1e6 * served / len(batch)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="emails per measurement")
    parser.add_argument("--runs", type=int, default=5, help="repetitions; medians are shown")
    parser.add_argument("--json", type=Path, help="where to write the numbers (default bench/results/activation-<date>.json)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.runs < 1:
        parser.error("--messages and --runs must be at least 1")
    kinds: dict[str, Callable[[Send], Message]] = {"message": sender._message, "EmailMessage": sender._international}
    compose = sender._message
    port = free_port()
    server = start_server(port)
    raw: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    try:
        session = sender.SmtpSession(sender.SmtpSettings("127.0.0.1", port))
        batch = sends(args.messages)
        deliver_all(session, batch[:200], compose, psutil.Process(server.pid))  # warm-up
        for run in range(args.runs):
            order = list(kinds) if run % 2 == 0 else list(reversed(kinds))
            for kind in order:
                raw[kind].append(deliver_all(session, batch, kinds[kind], psutil.Process(server.pid)))
            print(f"run {run + 1}/{args.runs}: " + ", ".join(
                f"{kind} {raw[kind][-1]['emails_per_s']:,.0f} emails/s" for kind in kinds), flush=True)
        session.close()
    finally:
        server.kill()
        server.wait()
    medians = {kind: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for kind, rows in raw.items()}
    print(f"\n{args.messages:,} emails per measurement, {args.runs} runs, medians; {psutil.cpu_count()} cores")
    print(f"{'composition':<14} {'emails/s':>9} {'CPU us/email: sender':>22} {'server':>8}")
    for kind, m in medians.items():
        print(f"{kind:<14} {m['emails_per_s']:>9,.0f} {m['client_us']:>22,.0f} {m['server_us']:>8,.0f}")
    out = args.json or REPO / "bench" / "results" / f"activation-{datetime.now(UTC):%Y-%m-%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"settings": {"messages": args.messages, "runs": args.runs}, "medians": medians, "raw": raw}
    out.write_text(json.dumps(document, indent=2))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
