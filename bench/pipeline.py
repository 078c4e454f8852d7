#!/usr/bin/env python
"""The lean pipeline: the least the whole suite must do, run as one pipeline on this machine (issue #6).

    .venv/bin/python bench/pipeline.py [--events N] [--runs R] [--json OUT]

The suite's goal (at least 3,000 events/s through every service on 2 cores) rests on what any
design of six services sharing the log has to do per event. This bench builds that design from the
same parts the services use (nats-py with cdp_common's Puller and Publisher, asyncpg, the event
envelopes) and nothing else, each stage its own process, as the services are:

  identity      reads COLLECTED; per batch, one statement stores every identifier of the batch's
                events (new ones with a proposed profile, known ones keep theirs: no merging), and a
                resolved fact per event goes to an outbox with the checkpoint in the same
                transaction; the facts are published to IDENTITY with JetStream acks, then the
                batch is acked
  profile       reads IDENTITY: bench/profile.py's "facts" reference projection (counts per
                profile, the events' timeline rows, a profile_changed per touched profile through an
                outbox to PROFILE, the checkpoint)
  segmentation  reads PROFILE: the "minimal" reference projection (a row per profile and the
                checkpoint in one transaction per batch; no segment is evaluated)
  dmp-bridge    reads PROFILE: fetches and acks, nothing else

Ingest is this bench's own process publishing the suite's event mix (bench/identity.py's workload,
as ingest stores it) into COLLECTED with the services' pipelined Publisher, as fast as the log
takes it (windows of 500, 4 in flight). Activation sends nothing (no segment is entered).

A run starts all four stages on a fresh namespace and database, then times from the first publish
until every stage's durable consumer has acknowledged the whole of its stream, with the CPU of each
process, nats-server and PostgreSQL. Every stage works in batches as large as the backlog allows
(200), the cheapest a stage can be: the rate is an upper bound for the rate the lean pipeline
could sustain, and the suite's own sustained rate (`cdp bench`) can only be lower. Each run checks
the outcome: every event resolved, projected and on the timeline, every profile_changed read by
both readers, every outbox emptied but its last batch.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cdp_cli.infra import start_nats, start_postgres
from cdp_common import eventlog
from cdp_common.convert import to_datetime
from cdp_common.pull import Puller

BENCH_DIR = Path(__file__).resolve().parent


def _bench_module(name: str) -> Any:
    """bench/<name>.py, imported as bench_<name> (bench/ is not a package)."""
    if (loaded := sys.modules.get(f"bench_{name}")) is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pb = _bench_module("profile")  # which loads bench/identity.py, which loads bench/ingest.py
idb, ib = pb.idb, pb.ib

TARGET = 3000.0  # events/s through the whole suite on 2 cores (issue #6)
DEFAULT_EVENTS = 30_000
FETCH_BATCH = 200
PUBLISH_WINDOW, PUBLISH_IN_FLIGHT = 500, 4
POLL_SECONDS = 0.05
DONE_TIMEOUT = 900.0
# (stage, the stream it reads, its reference level in bench/profile.py or its own work)
STAGES = (("identity", "collected", "identity"), ("profile", "identity", "facts"),
          ("segmentation", "profile", "minimal"), ("dmp_bridge", "profile", "pull"))
GROUPS = ("ingest", *(stage for stage, _, _ in STAGES), "nats_server", "postgres")

_IDENTITY_TABLES = (
    "CREATE TABLE lean_identifiers (kind text NOT NULL, value text NOT NULL, profile_id text NOT NULL, "
    "last_seen timestamptz NOT NULL, PRIMARY KEY (kind, value))",
    "CREATE TABLE lean_checkpoints (consumer text PRIMARY KEY, stream_sequence bigint NOT NULL)",
    "CREATE TABLE lean_outbox (id bigserial PRIMARY KEY, subject text NOT NULL, msg_id text NOT NULL, "
    "payload bytea NOT NULL)",
)
# Known identifiers keep their profile and get a later last_seen; new ones take the proposed profile.
_IDENTITY_UPSERT = (
    "INSERT INTO lean_identifiers AS i SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) "
    "ON CONFLICT (kind, value) DO UPDATE SET last_seen = GREATEST(i.last_seen, EXCLUDED.last_seen) "
    "RETURNING kind, value, profile_id"
)
_IDENTITY_OUTBOX = (
    "INSERT INTO lean_outbox (subject, msg_id, payload) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) "
    "RETURNING id"
)
_IDENTITY_CHECKPOINT = (
    "INSERT INTO lean_checkpoints VALUES ($1, $2) ON CONFLICT (consumer) DO UPDATE SET stream_sequence = $2"
)
_KINDS = ("user_id", "email", "phone", "anonymous_id", "device_id")


def _identifiers(event: Any) -> list[tuple[str, str]]:
    """An event's identifiers, strongest first (the profile follows the first)."""
    ids = event.identifiers
    found = [(kind, value) for kind in _KINDS if (value := getattr(ids, kind))]
    return found + sorted(ids.custom.items())


class LeanIdentity:
    """The least identity does per batch: store the identifiers, a resolved fact per event through an
    outbox, the checkpoint; publish the facts (the caller acks)."""

    def __init__(self, conn: asyncpg.Connection, publisher: eventlog.Publisher, topology: eventlog.Topology,
                 name: str) -> None:
        self.conn, self.publisher, self.topology, self.name = conn, publisher, topology, name
        self._published: list[int] = []

    async def apply(self, msgs: Sequence[Any], final: bool = False) -> None:
        events = [eventlog.decode(msg.data) for msg in msgs]
        proposed: dict[tuple[str, str], list[Any]] = {}
        for event in events:
            seen = to_datetime(event.occurred_at)
            profile_id = str(uuid.uuid4())
            for key in _identifiers(event):
                held = proposed.setdefault(key, [profile_id, seen])
                held[1] = max(held[1], seen)
        async with self.conn.transaction():
            if self._published:
                await self.conn.execute("DELETE FROM lean_outbox WHERE id = ANY($1)", self._published)
            owners = {(r["kind"], r["value"]): r["profile_id"] for r in await self.conn.fetch(
                _IDENTITY_UPSERT, [k for k, _ in proposed], [v for _, v in proposed],
                [p for p, _ in proposed.values()], [s for _, s in proposed.values()])}
            facts = []
            for event in events:
                keys = _identifiers(event)
                event.profile_id = owners[keys[0]] if keys else str(uuid.uuid4())
                event.id = eventlog.derived_id(event.id, "resolved")
                fact = eventlog.Outgoing(self.topology.keyed("identity", event.profile_id, "resolved"), event)
                facts.append((fact.subject, eventlog.encode(event), fact.headers()))
            ids = await self.conn.fetch(_IDENTITY_OUTBOX, [f[0] for f in facts],
                                        [f[2][eventlog.MSG_ID_HEADER] for f in facts], [f[1] for f in facts])
            await self.conn.execute(_IDENTITY_CHECKPOINT, self.name, msgs[-1].metadata.sequence.stream)
        await self.publisher.publish(facts)
        self._published = [r["id"] for r in ids]


class PullOnly:
    """What the DMP bridge cannot do without: read every profile change."""

    async def apply(self, msgs: Sequence[Any], final: bool = False) -> None:
        return None


# --- a stage, in its own process ---------------------------------------------------------------------


async def run_stage(config: dict[str, Any]) -> None:
    """Applies batches from the stage's durable consumer until SIGTERM; prints "ready" once connected."""
    stage, area, level = next(s for s in STAGES if s[0] == config["stage"])
    topology = eventlog.Topology(config["namespace"])
    nc = await nats.connect(config["nats_url"])
    conn = await asyncpg.connect(config["database_url"], server_settings={"search_path": stage,
                                                                          "application_name": f"lean-{stage}"})
    publisher = eventlog.Publisher(nc)
    projection: Any
    if level == "identity":
        projection = LeanIdentity(conn, publisher, topology, config["durable"])
    elif level == "pull":
        projection = PullOnly()
    else:
        projection = pb.ReferenceProjection(conn, publisher, topology, config["durable"], level)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    puller = Puller(nc, topology.stream(area), config["durable"], FETCH_BATCH, 1.0)
    print("ready", flush=True)
    try:
        while not stop.is_set():
            msgs = await puller.fetch()
            if msgs:
                await projection.apply(msgs)
                await msgs[-1].ack()
    finally:
        await puller.forget()
        await publisher.close()
        await conn.close()
        await nc.close()


# --- the measurement -------------------------------------------------------------------------------


def _durable(stage: str) -> str:
    return f"lean-{stage.replace('_', '-')}"


async def _schema(servers: Any, database: str) -> None:
    conn = await servers.admin(database)
    try:
        for stage, _, level in STAGES:
            await conn.execute(f"CREATE SCHEMA {stage}")
            await conn.execute(f"SET search_path TO {stage}")
            for statement in _IDENTITY_TABLES if level == "identity" else pb._REFERENCE_TABLES:
                await conn.execute(statement)
    finally:
        await conn.close()


async def _acked(js: Any, topology: eventlog.Topology) -> dict[str, tuple[int, int]]:
    """Per stage: (its consumer's ack floor, the last sequence of the stream it reads)."""
    last = {area: (await js.stream_info(topology.stream(area))).state.last_seq for area in ("collected", "identity", "profile")}
    out = {}
    for stage, area, _ in STAGES:
        info = await js.consumer_info(topology.stream(area), _durable(stage))
        out[stage] = (info.ack_floor.stream_seq, last[area])
    return out


async def _verify(servers: Any, database: str, events: int, acked: dict[str, tuple[int, int]]) -> dict[str, int]:
    conn = await servers.admin(database)
    try:
        got = {
            "identifiers": await conn.fetchval("SELECT count(*) FROM identity.lean_identifiers"),
            "identity_outbox": await conn.fetchval("SELECT count(*) FROM identity.lean_outbox"),
            "profile_events": await conn.fetchval("SELECT coalesce(sum(events), 0) FROM profile.ref_profiles"),
            "timeline": await conn.fetchval("SELECT count(*) FROM profile.ref_events"),
            "profiles": await conn.fetchval("SELECT count(*) FROM profile.ref_profiles"),
            "segmentation_profiles": await conn.fetchval("SELECT count(*) FROM segmentation.ref_profiles"),
            "segmentation_changes": await conn.fetchval("SELECT coalesce(sum(events), 0) FROM segmentation.ref_profiles"),
        }
    finally:
        await conn.close()
    changes = acked["segmentation"][1]
    idb._expect(acked["identity"][1] == events and acked["profile"][1] == events,
                f"lean pipeline: COLLECTED holds {acked['identity'][1]}, IDENTITY {acked['profile'][1]}, not {events}")
    idb._expect(got["profile_events"] == events and got["timeline"] == events,
                f"lean pipeline: profile counted {got['profile_events']} events, {got['timeline']} timeline rows, "
                f"not {events}")
    idb._expect(got["segmentation_changes"] == changes and got["segmentation_profiles"] == got["profiles"],
                f"lean pipeline: segmentation read {got['segmentation_changes']} of {changes} profile changes, "
                f"has {got['segmentation_profiles']} of {got['profiles']} profiles")
    idb._expect(got["identity_outbox"] <= FETCH_BATCH, f"lean pipeline: {got['identity_outbox']} facts left in the outbox")
    return {**got, "profile_changes": changes}


async def measure(log: Any, servers: Any, workload: Any, run: int) -> dict[str, Any]:
    """One run of the lean pipeline on a fresh namespace and database."""
    events = len(workload.items)
    topology = await log.fresh(f"l{run}")
    database = f"bench_lean_{uuid.uuid4().hex[:8]}"
    await servers.create_database(database)
    stages: dict[str, subprocess.Popen[bytes]] = {}
    try:
        await _schema(servers, database)
        for stage, area, _ in STAGES:
            await log.js.add_consumer(topology.stream(area), ConsumerConfig(
                durable_name=_durable(stage), deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.ALL,
                ack_wait=30, max_deliver=-1, max_ack_pending=400))
        for stage, _, _ in STAGES:
            config = {"stage": stage, "namespace": topology.namespace, "nats_url": servers.nats_url,
                      "durable": _durable(stage), "database_url": idb._with_database(servers.pg_url, database)}
            stages[stage] = process = subprocess.Popen(
                [sys.executable, __file__, "--stage", json.dumps(config)], stdout=subprocess.PIPE,
                stderr=open(servers.logs / f"lean-{stage}-{run}.log", "ab"))  # noqa: SIM115 (the child holds it)
            ib._children.append(process)
        for stage, process in stages.items():
            assert process.stdout is not None
            line = await asyncio.to_thread(process.stdout.readline)
            idb._expect(line.strip() == b"ready", f"lean {stage} did not start: see {servers.logs}/lean-{stage}-{run}.log")
        groups = {"ingest": lambda: [os.getpid()], "nats_server": lambda: [servers.nats_pid],
                  "postgres": servers.postgres_pids}
        groups |= {stage: (lambda p=process: [p.pid]) for stage, process in stages.items()}
        nc = await nats.connect(servers.nats_url)
        publisher = eventlog.Publisher(nc)
        usage = idb.Usage(groups)
        usage.start()
        began = time.perf_counter()
        try:
            acks = await ib.publisher_windows(publisher, workload.addressed(topology), PUBLISH_WINDOW, PUBLISH_IN_FLIGHT)
            published_s = time.perf_counter() - began
            deadline = time.monotonic() + DONE_TIMEOUT
            while True:
                acked = await _acked(log.js, topology)
                if acked["identity"][0] == events and all(floor == last for floor, last in acked.values()):
                    break
                for stage, process in stages.items():
                    idb._expect(process.poll() is None, f"lean {stage} exited with code {process.returncode}")
                idb._expect(time.monotonic() < deadline, f"lean pipeline: not done after {DONE_TIMEOUT:.0f} s: {acked}")
                await asyncio.sleep(POLL_SECONDS)
            used = usage.stop()
        finally:
            await publisher.close()
            await nc.close()
        idb._expect(len(acks) == events and not any(a.duplicate for a in acks), "lean pipeline: publish lost events")
        for process in stages.values():
            process.send_signal(signal.SIGTERM)
        for stage, process in stages.items():
            idb._expect(await asyncio.to_thread(process.wait, 30) == 0,
                        f"lean {stage} exited with code {process.returncode}")
        checked = await _verify(servers, database, events, acked)
    finally:
        for process in stages.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        await log.drop(topology)
        await servers.drop_database(database)
    per_event = {k: 1e6 * v / events for k, v in used["cpu_s"].items()}
    return {**used, "events": events, "published_s": published_s, "events_per_s": events / used["seconds"],
            "cpu_us_per_event": per_event, "cpu_us_per_event_all": sum(per_event.values()),
            "cores_at_target": sum(per_event.values()) * TARGET / 1e6, "checked": checked}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"events_per_s": statistics.median(r["events_per_s"] for r in runs),
            "cpu_us_per_event": {g: statistics.median(r["cpu_us_per_event"][g] for r in runs) for g in GROUPS},
            "cpu_us_per_event_all": statistics.median(r["cpu_us_per_event_all"] for r in runs),
            "cores_at_target": statistics.median(r["cores_at_target"] for r in runs),
            "foreign_cores_max": max(r["foreign_cores"] for r in runs)}


def render(info: dict[str, Any], runs: list[dict[str, Any]], medians: dict[str, Any]) -> None:
    print(f"\nLean pipeline on {info['cpu']}, {info['cores']} cores, {info['memory_gib']:.1f} GiB "
          f"(commit {info['commit'][:7]}); {runs[0]['events']:,} events, medians of {len(runs)} runs")
    rates = " ".join(f"{r['events_per_s']:,.0f}" for r in runs)
    print(f"  events/s through all stages: {medians['events_per_s']:,.0f}  (runs {rates}; goal of the suite "
          f"{TARGET:,.0f} on 2 cores)")
    cost = medians["cpu_us_per_event"]
    print("  CPU µs per event: " + ", ".join(f"{g} {cost[g]:,.0f}" for g in GROUPS)
          + f"; all {medians['cpu_us_per_event_all']:,.0f}")
    print(f"  cores this CPU would need at {TARGET:,.0f} events/s: {medians['cores_at_target']:.2f}; "
          f"other load up to {medians['foreign_cores_max']:.2f} cores")


async def bench(args: argparse.Namespace, servers: Any, workload: Any) -> list[dict[str, Any]]:
    runs = []
    async with idb.Log(servers.nats_url) as log:
        for run in range(args.runs):
            deadline = time.monotonic() + args.wait_quiet
            while (load := await asyncio.to_thread(ib.machine_load)) > pb.QUIET_CORES and time.monotonic() < deadline:
                pass
            if load > pb.QUIET_CORES:
                print(f"note: {load:.2f} cores busy with other processes before run {run + 1}", flush=True)
            runs.append(await measure(log, servers, workload, run))
            r = runs[-1]
            print(f"run {run + 1}/{args.runs}: {r['events_per_s']:,.0f} events/s through all stages in "
                  f"{r['seconds']:.1f} s (published in {r['published_s']:.1f} s), "
                  f"{r['cpu_us_per_event_all']:,.0f} µs of CPU per event; other load {r['foreign_cores']:.2f} cores",
                  flush=True)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events per run (default %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the summary shows medians")
    parser.add_argument("--json", type=Path, help="where to write the runs and medians "
                        "(default bench/results/pipeline-<date>.json)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to leave the CPU idle")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (nats store, PostgreSQL data, logs)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        asyncio.run(run_stage(json.loads(args.stage)))
        return 0
    if args.events < FETCH_BATCH or args.runs < 1 or not math.isfinite(args.wait_quiet) or args.wait_quiet < 0:
        parser.error(f"--events must be at least {FETCH_BATCH}, --runs at least 1, --wait-quiet 0 or more seconds")

    stamp, results_dir, tmp, logs = idb.set_up("pipeline")
    nats_server = postgres = None
    began = time.perf_counter()
    try:
        print(f"building {args.events:,} events ...", flush=True)
        workload = idb.build_workload(args.events)
        nats_server = start_nats(tmp / "nats", log_file=logs / "nats-server.log")
        ib._children.append(nats_server.process)
        postgres = start_postgres(tmp / "pg" / "data", keep=args.keep)
        servers = idb.Servers(nats_server.url, nats_server.process.pid, postgres, logs)
        info = ib.machine()
        info["postgres"] = ib.run_async(idb.postgres_info(servers))["version"]
        runs = ib.run_async(bench(args, servers, workload))
        medians = summarize(runs)
        render(info, runs, medians)
        out = args.json or results_dir / f"pipeline-{stamp}.json"
        return int(idb.save(out, {"machine": info, "settings": vars(args) | {"json": str(out)},
                                  "workload": workload.summary(), "medians": medians, "runs": runs}, began))
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        idb.tear_down(ib._children, nats_server, postgres, tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
