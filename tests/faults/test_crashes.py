"""Crashes under load, with nothing lost or doubled.

The suite runs as `cdp up` runs it: nats-server, PostgreSQL and an SMTP sink, and the six services
as processes, with a supervisor that starts again whatever exits. Customers send events to ingest
over gRPC at a steady rate (page views, identifies with emails, orders, a second device that
merges two profiles), each event retried with its own id until ingest acknowledges it; two
segments and an email campaign make profiles, segments and activation work. Meanwhile every
service in turn is killed with SIGKILL and started again, then nats-server (SIGKILL, same store and
port), then PostgreSQL (an immediate stop: recovery from its WAL; the services with a consumer
exit on losing their lock session and are started again).

Afterwards, counting: every acknowledged event is in the COLLECTED stream exactly once and
resolved exactly once; identity's graph is what its log of decisions says; profile's read model is
what `cdp replay profile` rebuilds from the log and adds up to what was acknowledged; memberships
are what the segment log and the profiles say; and the SMTP sink got one email per (campaign,
profile) that entered the campaign's segment, none twice (at most once: a send an activation
process was killed in the middle of is not tried again).

The last test places one such failure exactly, where the run above hits it only now and then: the
SMTP server has the message and PostgreSQL drops the sender's sessions before the server answers.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from aiosmtpd.controller import Controller

from cdp.activation.v1 import activation_pb2, activation_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp.v1 import event_pb2
from cdp_activation.main import DEFINITION as ACTIVATION
from cdp_cli.infra import free_port
from cdp_cli.settle import settle
from cdp_common import db as cdp_db
from cdp_common import eventlog
from cdp_segmentation import core as segmentation_core
from cdp_segmentation.handlers import membership_event
from crash_suite import (
    Cluster, Load, Logged, cluster, connected, mail, memberships_from_log, partition_from_log, profile_read_model,
    read_stream,
)

pytestmark = pytest.mark.timeout(300)

CDP = str(Path(sys.executable).parent / "cdp")
# Events per second sent to ingest: a steady load the two cores of a test machine keep up with.
RATE = 100.0
# Seconds of load before the first fault and after each one.
WARM_UP, BETWEEN = 3.0, 2.0
SERVICES = ("ingest", "identity", "profile", "segmentation", "activation", "dmp-bridge")
# The scoring job rescores (and publishes changed profiles) several times during the run.
ENVIRONMENT = {"CDP_PROFILE_SCORES_INTERVAL_SECONDS": "10", "CDP_LOG_LEVEL": "info"}

SEGMENTS = (
    segmentation_pb2.Segment(id="buyers", name="Buyers", conditions=[
        segmentation_pb2.Condition(field="order_count", op="gte", value="1"),
        segmentation_pb2.Condition(field="traits.email", op="exists"),
    ]),
    segmentation_pb2.Segment(id="repeat-buyers", name="Repeat buyers", conditions=[
        segmentation_pb2.Condition(field="order_count", op="gte", value="2"),
        segmentation_pb2.Condition(field="traits.email", op="exists"),
    ]),
)
# On repeat buyers only: the sender hands over one message at a time, and an email per buyer would
# spend the time budget waiting for the mail. The body names the profile, so the mailbox can be
# counted by (campaign, profile).
CAMPAIGNS = (
    activation_pb2.Campaign(
        id="thank-repeat-buyers", segment_id="repeat-buyers", from_address="shop@example.com",
        subject_template="Thank you, {{ traits.first_name }}", body_template="profile={{ profile.profile_id }}",
    ),
)


def expected_segments(profile: dict[str, Any]) -> set[str]:
    """The segments a profile of the read model belongs in, by SEGMENTS' conditions."""
    buyer = "email" in profile["traits"] and profile["order_count"] >= 1
    return {s for s, inside in (("buyers", buyer), ("repeat-buyers", buyer and profile["order_count"] >= 2)) if inside}


@dataclass
class Outcome:
    """What the run left behind, read once everything had settled."""

    load: Load
    exits: dict[str, list[int]]
    seconds: dict[str, float]
    collected: list[Logged]
    identity_log: list[Logged]
    segment_log: list[Logged]
    activation_log: list[Logged]
    dead_letters: list[Logged]
    identity_owners: dict[tuple[str, str], str]
    identity_merged_into: dict[str, str]
    identity_live: set[str]
    profile_before: dict[str, Any]
    profile_after: dict[str, Any]
    replay: subprocess.CompletedProcess[str]
    memberships: set[tuple[str, str]]
    audiences: set[tuple[str, str]]
    hashed_emails: set[tuple[str, str]]
    segmentation_facts: dict[str, dict[str, Any]]
    sends: list[dict[str, Any]]
    mail: list[dict[str, str]]
    # The live profiles of the read model: traits, order count and revenue.
    profiles: dict[str, dict[str, Any]]


async def _settled(the_cluster: Cluster, pg: asyncpg.Connection, timeout: float = 120.0) -> None:
    """Every consumer caught up, every queued email handled, every outbox empty, the log quiet."""
    deadline = time.monotonic() + timeout
    async with connected(the_cluster.nats.url) as (_, js):
        while True:
            await settle(js, eventlog.Topology("cdp"), timeout=max(1.0, deadline - time.monotonic()),
                         quiet_seconds=1.5)
            busy = await pg.fetchval(
                "SELECT (SELECT count(*) FROM activation.sends WHERE status = 'pending')"
                " + (SELECT count(*) FROM identity.outbox) + (SELECT count(*) FROM profile.outbox)"
                " + (SELECT count(*) FROM segmentation.outbox) + (SELECT count(*) FROM activation.outbox)"
                " + (SELECT count(*) FROM dmp.outbox)")
            if busy == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{busy} emails or outbox rows still waiting after {timeout:.0f}s")
            await asyncio.sleep(0.5)


async def _faults(the_cluster: Cluster, seconds: dict[str, float]) -> None:
    """Each service killed and started again in turn, then nats-server, then PostgreSQL."""
    for name in SERVICES:
        started = time.monotonic()
        await the_cluster.kill_service(name)
        seconds[f"kill -9 {name}: back in"] = time.monotonic() - started
        await asyncio.sleep(BETWEEN)
    started = time.monotonic()
    await the_cluster.restart_nats()
    seconds["nats-server restarted in"] = time.monotonic() - started
    await asyncio.sleep(BETWEEN + 1)
    started = time.monotonic()
    await the_cluster.restart_postgres()
    await asyncio.sleep(1.0)  # the services notice at their next batch, exit and are started again
    await the_cluster.all_healthy()
    seconds["PostgreSQL restarted, services serving again in"] = time.monotonic() - started
    await asyncio.sleep(BETWEEN + 1)


@pytest.fixture(scope="module")
async def outcome() -> AsyncIterator[Outcome]:
    data_dir = Path(tempfile.mkdtemp(prefix="cdp-crashes-"))
    seconds: dict[str, float] = {}
    began = time.monotonic()
    try:
        async with cluster(data_dir, ENVIRONMENT) as the_cluster:
            seconds["suite up in"] = time.monotonic() - began
            async with grpc.aio.insecure_channel(the_cluster.address("segmentation")) as channel:
                for segment in SEGMENTS:
                    await segmentation_pb2_grpc.SegmentationServiceStub(channel).PutSegment(segment, timeout=10)
            async with grpc.aio.insecure_channel(the_cluster.address("activation")) as channel:
                for campaign in CAMPAIGNS:
                    await activation_pb2_grpc.ActivationServiceStub(channel).PutCampaign(campaign, timeout=10)

            load = Load(the_cluster.address("ingest"), RATE)
            load.start()
            started = time.monotonic()
            await asyncio.sleep(WARM_UP)
            await _faults(the_cluster, seconds)
            await load.stop()
            seconds["load ran for"] = time.monotonic() - started

            started = time.monotonic()
            pg = await asyncpg.connect(cdp_db.plain_url(the_cluster.database_url))
            try:
                await _settled(the_cluster, pg)
                seconds["settled in"] = time.monotonic() - started
                async with connected(the_cluster.nats.url) as (nc, _):
                    logs = {area: await read_stream(nc, eventlog.Topology("cdp").stream(area))
                            for area in ("collected", "identity", "segment", "activation", "deadletter")}
                identity_rows = await pg.fetch("SELECT id_type, id_value, profile_id FROM identity.identifiers")
                identity_profiles = await pg.fetch("SELECT profile_id, merged_into FROM identity.profiles")
                profile_before = await profile_read_model(pg)
                profiles = {r["profile_id"]: {"traits": json.loads(r["traits"]), "order_count": r["order_count"],
                                              "revenue_cents": r["revenue_cents"]}
                            for r in await pg.fetch(
                                "SELECT profile_id, traits, order_count, round(revenue * 100)::bigint AS revenue_cents "
                                "FROM profile.profiles WHERE merged_into IS NULL")}
                hashed = {(r[0], r[1]) for r in await pg.fetch(
                    "SELECT email_sha256, profile_id FROM dmp.hashed_emails")}
                memberships = {(r[0], r[1]) for r in await pg.fetch(
                    "SELECT segment_id, profile_id FROM segmentation.memberships")}
                audiences = {(r[0], r[1]) for r in await pg.fetch(
                    "SELECT segment_id, profile_id FROM dmp.audience_members")}
                facts = {r["profile_id"]: {"order_count": r["order_count"], "email": r["email"]}
                         for r in await pg.fetch(
                             "SELECT profile_id, (facts->>'order_count')::int AS order_count, "
                             "facts->'traits'->>'email' AS email FROM segmentation.profiles")}
                sends = [dict(r) for r in await pg.fetch(
                    "SELECT send_id, campaign_id, profile_id, trigger_event_id, status, attempts, last_error "
                    "FROM activation.sends")]

                started = time.monotonic()
                replay = await asyncio.to_thread(
                    subprocess.run, [CDP, "replay", "profile", "--profile", the_cluster.address("profile")],
                    capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                )
                seconds["cdp replay profile took"] = time.monotonic() - started
                profile_after = await profile_read_model(pg)
            finally:
                await pg.close()
            yield Outcome(
                load=load, exits=dict(the_cluster.exits), seconds=seconds,
                collected=logs["collected"], identity_log=logs["identity"], segment_log=logs["segment"],
                activation_log=logs["activation"], dead_letters=logs["deadletter"],
                identity_owners={(r["id_type"], r["id_value"]): r["profile_id"] for r in identity_rows},
                identity_merged_into={r["profile_id"]: r["merged_into"] for r in identity_profiles
                                      if r["merged_into"] is not None},
                identity_live={r["profile_id"] for r in identity_profiles if r["merged_into"] is None},
                profile_before=profile_before, profile_after=profile_after, replay=replay,
                memberships=memberships, audiences=audiences, hashed_emails=hashed, segmentation_facts=facts,
                sends=sends, mail=mail(the_cluster.smtp.maildir), profiles=profiles,
            )
    finally:
        if os.environ.get("CDP_KEEP_CRASH_DATA") == "1":
            print(f"\n  data and logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def test_the_faults_happened_under_load(outcome: Outcome) -> None:
    load = outcome.load
    print("\n" + "\n".join(f"  {what:<50} {value:6.1f}s" for what, value in outcome.seconds.items()))
    print(f"  {load.sent} events from {load.customers} customers acknowledged; retried calls: "
          f"{dict(load.retries)}; stored before an unanswered attempt: {load.duplicates}")
    print(f"  process exits: {outcome.exits}")
    # Every service was killed once (-9) and the ones holding a consumer also exited with PostgreSQL.
    for name in SERVICES:
        assert -9 in outcome.exits[name], name
    assert load.sent > RATE * 20
    # Calls failed while ingest or NATS was down; none with a status a client cannot act on.
    assert load.retries["UNAVAILABLE"] > 0
    assert load.unexpected == []


def test_every_acknowledged_event_is_in_the_log_exactly_once(outcome: Outcome) -> None:
    counts = collections.Counter(logged.event.id for logged in outcome.collected)
    assert {logged.msg_id for logged in outcome.collected} == set(counts)
    doubled = {event_id: n for event_id, n in counts.items() if n > 1}
    lost = set(outcome.load.acknowledged) - set(counts)
    assert (doubled, sorted(lost)) == ({}, [])
    # Nor anything that was never sent.
    assert set(counts) == set(outcome.load.acknowledged)


def test_identity_resolved_each_event_once_and_its_graph_is_its_log_of_decisions(outcome: Outcome) -> None:
    resolved = collections.Counter(
        logged.event.id for logged in outcome.identity_log if logged.subject.endswith(".resolved"))
    assert {event_id: n for event_id, n in resolved.items() if n != 1} == {}
    assert set(resolved) == set(outcome.load.acknowledged)
    merges = collections.Counter(
        logged.event.id for logged in outcome.identity_log if logged.event.type == "profiles_merged")
    assert {event_id: n for event_id, n in merges.items() if n != 1} == {}

    owners, merged_into = partition_from_log(outcome.identity_log)
    assert outcome.identity_owners == owners
    assert outcome.identity_merged_into == merged_into
    assert outcome.identity_live == set(owners.values())
    # And the partition is the customers': one profile holds each customer's identifiers, both
    # devices' once the second signed in.
    for number in range(outcome.load.customers):
        keys = [("user_id", f"user-{number}"), ("anonymous_id", f"anon-{number}-a"),
                ("email", f"customer{number}@example.com"), ("anonymous_id", f"anon-{number}-b")]
        held = {owners[key] for key in keys if key in owners}
        assert len(held) <= 1, (number, held)
    assert len(merged_into) == len([n for n in range(outcome.load.customers) if n % 4 == 0
                                    and ("anonymous_id", f"anon-{n}-b") in owners])


def test_profile_read_model_is_what_replaying_the_log_rebuilds(outcome: Outcome) -> None:
    assert outcome.replay.returncode == 0, outcome.replay.stderr
    assert "now serving from it" in outcome.replay.stderr
    before, after = outcome.profile_before, outcome.profile_after
    for part in ("profiles", "identifiers", "timeline"):
        differing = sorted(k for k in set(before[part]) | set(after[part])
                           if before[part].get(k) != after[part].get(k))
        assert differing == [], (part, len(differing), [(before[part].get(k), after[part].get(k))
                                                         for k in differing[:3]])
    # And it adds up to what ingest acknowledged: every event once on a timeline, every order once.
    acknowledged = outcome.load.acknowledged
    assert set(after["timeline"]) == set(acknowledged)
    orders = [step for step in acknowledged.values() if step.kind == "order"]
    live = outcome.profiles.values()
    assert sum(p["order_count"] for p in live) == len(orders)
    assert sum(p["revenue_cents"] for p in live) == round(sum(step.revenue for step in orders) * 100)


def test_memberships_are_what_the_segment_log_and_the_profiles_say(outcome: Outcome) -> None:
    from_log = memberships_from_log(outcome.segment_log)
    expected = {(segment, profile_id) for profile_id, profile in outcome.profiles.items()
                for segment in expected_segments(profile)}
    assert outcome.memberships == from_log
    assert outcome.memberships == expected
    # The DMP bridge's own projections: audiences, and the hashed emails of live profiles.
    assert outcome.audiences == outcome.memberships
    assert outcome.hashed_emails == {
        (value, profile_id) for (id_type, value), profile_id in outcome.profile_after["identifiers"].items()
        if id_type == "email_sha256" and profile_id in outcome.profiles}
    # Segmentation evaluated each live profile on its latest snapshot.
    stale = {p: (outcome.segmentation_facts.get(p), profile["order_count"]) for p, profile in outcome.profiles.items()
             if (outcome.segmentation_facts.get(p) or {}).get("order_count") != profile["order_count"]}
    assert stale == {}
    entered = collections.Counter(logged.event.id for logged in outcome.segment_log)
    assert {event_id: n for event_id, n in entered.items() if n > 1} == {}


def test_each_segment_entry_sent_one_email_and_none_twice(outcome: Outcome) -> None:
    by_profile = collections.Counter((m["campaign"], m["body"].removeprefix("profile=")) for m in outcome.mail)
    twice = {key: n for key, n in by_profile.items() if n > 1}
    assert twice == {}, [s for s in outcome.sends if (s["campaign_id"], s["profile_id"]) in twice]
    assert max(collections.Counter(m["message_id"] for m in outcome.mail).values()) == 1

    campaign_of = {c.segment_id: c.id for c in CAMPAIGNS}
    entries = {(campaign_of[logged.event.membership.segment_id], logged.event.profile_id)
               for logged in outcome.segment_log
               if logged.event.type == "segment_entered" and logged.event.membership.segment_id in campaign_of}
    statuses = collections.Counter(send["status"] for send in outcome.sends)
    print(f"\n  {len(entries)} segment entries; sends by status: {dict(statuses)}; emails in the sink: "
          f"{len(outcome.mail)}")
    # One send queued per entry (and no profile entered twice).
    assert {(s["campaign_id"], s["profile_id"]) for s in outcome.sends} == entries
    assert len(outcome.sends) == len(entries)
    # A send is `sent` once the SMTP server took it. One left `sending` (its email may or may not
    # have gone out) is never tried again. The sender hands over one message at a time, so each
    # activation process killed leaves at most one; so may PostgreSQL crashing as a claim commits.
    sent = {(s["campaign_id"], s["profile_id"]) for s in outcome.sends if s["status"] == "sent"}
    interrupted = {(s["campaign_id"], s["profile_id"]) for s in outcome.sends if s["status"] == "sending"}
    assert set(statuses) <= {"sent", "sending"}
    assert len(interrupted) <= outcome.exits["activation"].count(-9) + 1
    assert sent <= set(by_profile) <= sent | interrupted
    sent_facts = collections.Counter(logged.event.id for logged in outcome.activation_log)
    assert len(sent_facts) == len(sent) and max(sent_facts.values()) == 1


def test_nothing_was_dead_lettered(outcome: Outcome) -> None:
    assert [(d.event.dead_lettered.consumer, d.event.dead_lettered.error) for d in outcome.dead_letters] == []


# The test's own sessions, which CutsTheDatabaseOnData leaves alone.
OBSERVER = {"application_name": "crash-test-observer"}


class CutsTheDatabaseOnData:
    """An SMTP server that, holding the first message, ends the service's PostgreSQL sessions before
    it answers 250, as a PostgreSQL restart at that moment would."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.messages:
            admin = await asyncpg.connect(self.dsn, server_settings=OBSERVER)
            try:
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = current_database() AND application_name <> $1",
                                    OBSERVER["application_name"])
            finally:
                await admin.close()
        self.messages.append(envelope.content)
        return "250 OK"


async def test_a_message_the_smtp_server_took_is_not_sent_again_when_the_database_fails(
    nats_url: str, database_url: str, namespace: str, nc: Any, monkeypatch: pytest.MonkeyPatch, launch_services: Any,
) -> None:
    sink = CutsTheDatabaseOnData(cdp_db.plain_url(database_url))
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    monkeypatch.setenv("CDP_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("CDP_SMTP_PORT", str(port))
    try:
        async with launch_services((ACTIVATION,), nats_url=nats_url, database_url=database_url,
                                   namespace=namespace, log_level="error") as launched:
            await activation_pb2_grpc.ActivationServiceStub(launched.channels["activation"]).PutCampaign(CAMPAIGNS[0])
            profile = event_pb2.ProfileSnapshot(profile_id="p-1")
            profile.identifiers.add(type="email", value="ada@example.com")
            segment = segmentation_core.Segment("repeat-buyers", "Repeat buyers", ())
            entered = membership_event(eventlog.Topology(namespace), "cause-1", "entered", segment, profile)
            publisher = eventlog.Publisher(nc)
            await publisher.publish_events([entered])
            await publisher.close()

            db = await asyncpg.connect(cdp_db.plain_url(database_url), server_settings=OBSERVER)
            try:
                deadline = time.monotonic() + 30
                while await db.fetchval("SELECT count(*) FROM activation.sends WHERE status = 'sent'") != 1:
                    assert time.monotonic() < deadline, await db.fetch("SELECT status, last_error FROM activation.sends")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # a second delivery would come within the sender's next rounds
            finally:
                await db.close()
    finally:
        controller.stop()
    assert len(sink.messages) == 1
