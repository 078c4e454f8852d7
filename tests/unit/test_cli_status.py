"""`cdp status`'s pure parts, and the metrics endpoint's setting."""

from __future__ import annotations

import pytest

from cdp_cli import status
from cdp_cli.options import address_variable
from cdp_common import eventlog
from cdp_common.settings import Settings, SettingsError


def test_durable_consumers_belong_to_the_service_named_first() -> None:
    assert status.owner("identity-resolve") == "identity"
    assert status.owner("dmp-audiences") == "dmp-bridge"
    assert status.owner("segmentation-evaluate") == "segmentation"
    # Someone else's (an external subscriber, `cdp dlq`'s scans) are not the suite's.
    assert status.owner("crm-sync") is None
    assert status.owner("cdp-dlq-123-456") is None
    assert status.owner("identity") is None


def test_dead_letters_are_counted_per_consumer_with_redriven_ones_apart() -> None:
    topology = eventlog.Topology("cdp")
    letters, redriven = status.dead_letter_counts(topology, {
        "cdp.v1.deadletter.identity-resolve": 3,
        "cdp.v1.deadletter.identity-resolve.redriven": 1,
        "cdp.v1.deadletter.profile-project": 2,
        "other.v1.deadletter.profile-project": 9,
    })
    assert dict(letters) == {"identity-resolve": 3, "profile-project": 2}
    assert dict(redriven) == {"identity-resolve": 1}


def test_the_exit_status_says_whether_every_service_serves() -> None:
    serving = status.ServiceState("ingest", "127.0.0.1:50051", "SERVING")
    stopped = status.ServiceState("profile", "127.0.0.1:50053", "unreachable", "UNAVAILABLE: refused")
    assert status.Status([serving], "cdp", "nats://x").exit_code() == 0
    assert status.Status([serving, stopped], "cdp", "nats://x").exit_code() == 1
    unavailable = status.Status([serving], "cdp", "nats://x", "NATS is unavailable", status.EXIT_UNAVAILABLE)
    assert unavailable.exit_code() == 75
    assert status.summary(status.Status([serving, stopped], "cdp", None))[0] == (
        "1 of 2 services serving; not serving: profile (unreachable: UNAVAILABLE: refused)")


def test_address_variables_follow_the_service_names() -> None:
    assert address_variable("ingest") == "CDP_INGEST_ADDRESS"
    assert address_variable("dmp-bridge") == "CDP_DMP_BRIDGE_ADDRESS"


def test_each_service_serves_metrics_on_its_own_port_unless_told_otherwise() -> None:
    base = {"CDP_NATS_URL": "nats://x"}
    assert Settings.from_env("ingest", 50051, base).metrics_listen == "127.0.0.1:9101"
    # A busy default port does not stop a service; a port asked for explicitly does.
    assert not Settings.from_env("ingest", 50051, base).metrics_required
    assert Settings.from_env("ingest", 50051, {**base, "CDP_METRICS_LISTEN": "127.0.0.1:9101"}).metrics_required
    assert Settings.from_env("dmp-bridge", 50056, base).metrics_listen == "127.0.0.1:9106"
    assert Settings.from_env("profile", 50053, {**base, "CDP_METRICS_LISTEN": "0.0.0.0:9200"}).metrics_listen == (
        "0.0.0.0:9200")
    assert Settings.from_env("profile", 50053, {**base, "CDP_METRICS_LISTEN": "0"}).metrics_listen == ""
    with pytest.raises(SettingsError, match="CDP_METRICS_LISTEN must be host:port"):
        Settings.from_env("profile", 50053, {**base, "CDP_METRICS_LISTEN": "9103"})
