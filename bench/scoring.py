#!/usr/bin/env python
"""How long the profile service's event loop stalls while its scoring job runs a round.

    .venv/bin/python bench/scoring.py [--profiles N] [--runs R] [--json OUT]

The scoring job (`cdp_profile.jobs.rescore`) refits the base-level models and rescores every
profile, in the same process as the live consumer and the gRPC API. While one of its steps holds
the event loop, neither applies a batch nor answers a call. This bench measures those stalls.

One embedded PostgreSQL and one nats-server, in a temp dir. A database gets N (default 30,000)
unscored profiles from a fixed seed (order counts 0-5 over 300 days, so RFM, churn and offers all
have customers to fit), written with `store.save_many`. Then one round runs (`jobs.rescore`, with
its outbox publishing to JetStream), the worst case: every profile's scores change and are saved
and published. Beside it, a ticker coroutine sleeps 1 ms at a time and records each gap between
its wake-ups. A gap is the longest the loop was held by something else, plus the 1 ms sleep. The
cyclic garbage collector is set as a service sets it (frozen start-up objects, GC_THRESHOLDS), and
its collections are counted and timed.

Printed per run and as medians: the round's wall time, the gaps' p50/p99/max, and how many were
over 20 ms. A fresh database is used for each run. Raw numbers go to JSON (bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats

from cdp_cli.infra import start_nats, start_postgres
from cdp_common import db, eventlog
from cdp_profile import jobs, store
from cdp_profile.core import ProfileState
from cdp_profile.handlers import ModelsCache

BENCH_DIR = Path(__file__).resolve().parent
SEED = 20261129
DAY = datetime(2025, 6, 1, tzinfo=UTC)
STALL_MS = 20.0


def _load_ingest_bench() -> Any:
    """bench/ingest.py, for the machine description and the collector as the services set it."""
    spec = importlib.util.spec_from_file_location("bench_ingest", BENCH_DIR / "ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ingest"] = module
    spec.loader.exec_module(module)
    return module


ib = _load_ingest_bench()


def profiles(count: int) -> list[ProfileState]:
    rng = random.Random(SEED)
    states = []
    for i in range(count):
        orders = rng.randint(0, 5)
        first = DAY + timedelta(days=rng.randint(0, 300))
        states.append(ProfileState(
            f"p{i}", order_count=orders, revenue_cents=orders * rng.randint(1000, 9000), first_seen_at=first,
            first_order_at=first if orders else None,
            last_order_at=first + timedelta(days=rng.randint(0, 60)) if orders else None,
            categories={rng.choice(["shoes", "hats", "bags"]): orders} if orders else {},
        ))
    return states


async def one_round(pg_url: str, nats_url: str, count: int) -> dict[str, Any]:
    engine = db.create_engine(pg_url, search_path="profile")
    nc = await nats.connect(nats_url)
    try:
        await db.migrate(engine, "profile", store.MIGRATIONS)
        states = profiles(count)
        for start in range(0, count, 2000):
            async with engine.begin() as conn:
                await store.save_many(conn, states[start:start + 2000], {})
        topology = eventlog.Topology(f"scoring{time.monotonic_ns()}")
        await eventlog.provision_streams(nc.jetstream(), topology)
        outbox = db.Outbox(engine, eventlog.Publisher(nc), "profile")
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append((now - last) * 1000)
                last = now

        with ib.ServiceCollector() as collector:
            task = asyncio.create_task(ticker())
            began = time.perf_counter()
            result = await jobs.rescore(engine, outbox, topology, ModelsCache(), DAY + timedelta(days=400))
        wall = time.perf_counter() - began
        done.set()
        await task
    finally:
        await nc.close()
        await engine.dispose()
    if result is None or result.rescored != count:
        raise SystemExit(f"the round rescored {result and result.rescored} of {count} profiles")
    gaps.sort()
    return {"profiles": count, "round_s": wall, "gap_p50_ms": gaps[len(gaps) // 2],
            "gap_p99_ms": gaps[int(len(gaps) * 0.99)], "gap_max_ms": gaps[-1],
            "gaps_over_20ms": sum(1 for g in gaps if g > STALL_MS), "gc_collections": len(collector.pauses),
            "gc_max_ms": max(collector.pauses, default=0.0)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    info = ib.machine()
    tmp = Path(tempfile.mkdtemp(prefix="cdp-bench-scoring-"))
    nats_server = start_nats(tmp / "nats")
    postgres = start_postgres(tmp / "pg", keep=False)
    runs = []
    try:
        for run in range(args.runs):
            database = f"scoring_{run}"
            asyncio.run(_create(postgres.url, database))
            runs.append(asyncio.run(one_round(_with_database(postgres.url, database), nats_server.url, args.profiles)))
            r = runs[-1]
            print(f"run {run + 1}/{args.runs}: round {r['round_s']:.1f} s; loop gaps p50 {r['gap_p50_ms']:.1f} ms, "
                  f"p99 {r['gap_p99_ms']:.1f} ms, max {r['gap_max_ms']:.0f} ms; over {STALL_MS:.0f} ms: "
                  f"{r['gaps_over_20ms']}; garbage collections {r['gc_collections']}, longest "
                  f"{r['gc_max_ms']:.0f} ms", flush=True)
    finally:
        nats_server.stop()
        postgres.stop()
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "profiles"}
    print(f"Machine {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; Python {info['python']}; "
          f"commit {info['commit']}{' (modified)' if info['modified'] else ''}")
    print(f"medians of {args.runs} rounds over {args.profiles:,} profiles: round {medians['round_s']:.1f} s; "
          f"loop gaps p50 {medians['gap_p50_ms']:.1f} ms, p99 {medians['gap_p99_ms']:.1f} ms, max "
          f"{medians['gap_max_ms']:.0f} ms; gaps over {STALL_MS:.0f} ms: {medians['gaps_over_20ms']:.0f}")
    out = args.json or BENCH_DIR / "results" / f"scoring-{info['date'].replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "runs": runs, "medians": medians}, indent=2))
    print(f"JSON: {out}")
    return 0


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _create(admin_url: str, database: str) -> None:
    engine = db.create_engine(admin_url)
    try:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
    finally:
        await engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
