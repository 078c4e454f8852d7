"""`cdp demo`: load the seed story through the public APIs and report what each stage did."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import nats

from cdp.activation.v1 import activation_pb2, activation_pb2_grpc
from cdp.dmp.v1 import dmp_pb2, dmp_pb2_grpc
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp.v1 import event_pb2
from cdp_common import convert, eventlog, identifiers
from cdp_cli.settle import settle

SEEDS = Path(__file__).resolve().parents[3] / "seeds" / "demo"


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, stage: str, text: str) -> None:
        self.lines.append((stage, text))
        print(f"  {stage:<13} {text}", flush=True)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _request(row: Mapping[str, Any]) -> ingest_pb2.TrackRequest | ingest_pb2.IdentifyRequest:
    ids = event_pb2.Identifiers(
        user_id=row.get("user_id", ""), anonymous_id=row.get("anonymous_id", ""), email=row.get("email", "")
    )
    when = eventlog.timestamp(eventlog.now() - timedelta(minutes=row["minutes_ago"]))
    if row["type"] == "identify":
        return ingest_pb2.IdentifyRequest(
            event_id=row["id"], identifiers=ids, traits=convert.dict_to_struct(row.get("traits", {})),
            timestamp=when, source="demo-seed",
        )
    return ingest_pb2.TrackRequest(
        event_id=row["id"], identifiers=ids, event=row["event"],
        properties=convert.dict_to_struct(row.get("properties", {})), timestamp=when, source="demo-seed",
    )


def conversions_csv(rows: list[dict[str, Any]]) -> bytes:
    """The file an ad platform would send back: hashed emails, never the addresses."""
    lines = ["conversion_id,email_sha256,event,value,currency,occurred_at"]
    for row in rows:
        when = (eventlog.now() - timedelta(minutes=row["minutes_ago"])).isoformat()
        digest = identifiers.email_sha256(row["email"])
        lines.append(f"{row['conversion_id']},{digest},{row['event']},{row['value']},{row['currency']},{when}")
    return ("\n".join(lines) + "\n").encode()


async def configure(
    segmentation: segmentation_pb2_grpc.SegmentationServiceAsyncStub,
    activation: activation_pb2_grpc.ActivationServiceAsyncStub,
    segments: list[dict[str, Any]] | None = None, campaigns: list[dict[str, Any]] | None = None, seeds: Path = SEEDS,
) -> None:
    """Puts segments and campaigns, as seeds/demo's JSON files spell them (by default those files)."""
    for segment in segments if segments is not None else json.loads((seeds / "segments.json").read_text()):
        await segmentation.PutSegment(
            segmentation_pb2.Segment(
                id=segment["id"], name=segment["name"],
                conditions=[segmentation_pb2.Condition(**c) for c in segment["conditions"]],
            )
        )
    for campaign in campaigns if campaigns is not None else json.loads((seeds / "campaigns.json").read_text()):
        await activation.PutCampaign(activation_pb2.Campaign(**campaign))


async def run(addresses: Mapping[str, str], settings: Mapping[str, str], data_dir: Path, seeds: Path = SEEDS) -> Report:
    report = Report()
    topology = eventlog.Topology(settings.get("CDP_NAMESPACE", "cdp"))
    nc = await nats.connect(settings["CDP_NATS_URL"])
    channels = {name: grpc.aio.insecure_channel(address) for name, address in addresses.items()}
    try:
        js = nc.jetstream()
        ingest = ingest_pb2_grpc.IngestServiceStub(channels["ingest"])
        identity = identity_pb2_grpc.IdentityServiceStub(channels["identity"])
        profiles = profile_pb2_grpc.ProfileServiceStub(channels["profile"])
        segmentation = segmentation_pb2_grpc.SegmentationServiceStub(channels["segmentation"])
        activation = activation_pb2_grpc.ActivationServiceStub(channels["activation"])
        dmp = dmp_pb2_grpc.DmpBridgeServiceStub(channels["dmp-bridge"])

        await configure(segmentation, activation, seeds=seeds)

        events = _read_jsonl(seeds / "events.jsonl")
        for row in events:
            request = _request(row)
            if isinstance(request, ingest_pb2.IdentifyRequest):
                await ingest.Identify(request)
            else:
                await ingest.Track(request)
        report.add("ingest", f"{len(events)} events accepted over gRPC (Track/Identify)")
        await settle(js, topology)

        exports = data_dir / "exports"
        exports.mkdir(parents=True, exist_ok=True)
        audience = await dmp.ExportAudience(dmp_pb2.ExportAudienceRequest(segment_id="high-value"))
        (exports / "high-value.csv").write_bytes(audience.csv)
        report.add("dmp-bridge", f"exported audience 'high-value': {audience.row_count} SHA-256 hashed emails "
                                 f"-> {exports / 'high-value.csv'}")

        data = conversions_csv(_read_jsonl(seeds / "conversions.jsonl"))
        (exports / "conversions.csv").write_bytes(data)
        imported = await dmp.ImportConversions(dmp_pb2.ImportConversionsRequest(platform="meta", csv=data))
        report.add("dmp-bridge", f"imported {imported.received} conversions: {imported.appended} appended to the log, "
                                 f"{imported.matched} matched known profiles")
        total = await settle(js, topology)

        collected = (await js.stream_info(topology.stream("collected"))).state.messages
        stats = await identity.GetStats(identity_pb2.GetStatsRequest())
        report.add("log", f"{collected} collected events, {total} facts in the log in all")
        report.add("identity", f"{stats.profiles} profiles from {stats.identifiers} identifiers, {stats.merges} merges")
        ada = await profiles.GetProfile(
            profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="email", value="ada.lovelace@example.com"))
        )
        report.add("profile", f"ada.lovelace@example.com: {ada.order_count} orders, revenue {ada.revenue:.2f}, "
                              f"{len(ada.identifiers)} identifiers, {len(ada.merged_profile_ids)} merged profile(s)")
        listed = await segmentation.ListSegments(segmentation_pb2.ListSegmentsRequest())
        report.add("segmentation", ", ".join(f"{s.id}={s.size}" for s in listed.segments))
        campaigns = await activation.ListCampaigns(activation_pb2.ListCampaignsRequest())
        sent = ", ".join(f"{c.id}: {c.sent_count} emails sent" for c in campaigns.campaigns)
        maildir = settings.get("CDP_MAILDIR")
        report.add("activation", sent + (f" (stored in {maildir})" if maildir else ""))
        return report
    finally:
        for channel in channels.values():
            await channel.close()
        await nc.close()
