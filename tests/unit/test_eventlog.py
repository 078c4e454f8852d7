"""cdp_common.eventlog: partitions, names, derived ids and the envelope codec (no server)."""

from __future__ import annotations

import random
import string
import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from google.protobuf.message import DecodeError

from cdp.v1 import event_pb2
from cdp_common import eventlog
from cdp_common.eventlog import AREAS, PARTITIONS, Topology, decode, derived_id, encode, partition_of

# --- partition_of ------------------------------------------------------------------------------


def _random_ids(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "-_:é🙂"
    return [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n // 2)] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n - n // 2)
    ]


def test_partition_of_is_always_within_range() -> None:
    for pid in _random_ids(1, 2000):
        assert 0 <= partition_of(pid) < PARTITIONS


@pytest.mark.parametrize(("pid", "partition"), [("p1", 1), ("profile-42", 2), ("", 4)])
def test_partition_of_is_stable_across_releases(pid: str, partition: int) -> None:
    # Changing the hash would reorder every customer's facts across partitions on upgrade.
    assert partition_of(pid) == partition


def test_partitions_spread_profiles_over_every_partition() -> None:
    counts = Counter(partition_of(str(uuid.UUID(int=i * 7919 + 1))) for i in range(4000))
    assert set(counts) == set(range(PARTITIONS))
    assert max(counts.values()) < 2 * (4000 / PARTITIONS)


# --- Topology ----------------------------------------------------------------------------------


def test_production_names() -> None:
    topology = Topology()
    assert topology.root == "cdp.v1"
    assert topology.stream("collected") == "CDP_COLLECTED"
    assert topology.stream("deadletter") == "CDP_DEADLETTER"
    assert topology.area_subjects("profile") == "cdp.v1.profile.>"
    assert topology.collected("track") == "cdp.v1.collected.track"
    assert topology.deadletter("profile-projector") == "cdp.v1.deadletter.profile-projector"


def test_keyed_subjects_carry_the_partition_not_the_profile_id() -> None:
    topology = Topology("t1")
    subject = topology.keyed("profile", "p-secret-123", "changed")
    assert subject == f"t1.v1.profile.{partition_of('p-secret-123')}.changed"
    assert "p-secret-123" not in subject


def test_a_namespace_keeps_tests_apart() -> None:
    a, b = Topology("ta"), Topology("tb")
    assert {a.stream(x) for x in AREAS}.isdisjoint({b.stream(x) for x in AREAS})
    assert a.stream("identity") == "TA_IDENTITY"
    assert a.collected("identify") == "ta.v1.collected.identify"


def test_an_unknown_area_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log area"):
        Topology().stream("billing")


def _covers(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    if p[-1] == ">":
        return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))


def test_every_subject_lands_in_exactly_one_stream() -> None:
    topology = Topology()
    configs = topology.stream_configs()
    assert [c.name for c in configs] == [topology.stream(a) for a in AREAS]
    subjects = [
        topology.collected("track"),
        topology.collected("identify"),
        topology.keyed("identity", "p1", "resolved"),
        topology.keyed("profile", "p2", "changed"),
        topology.keyed("segment", "p3", "entered"),
        topology.keyed("activation", "p4", "sent"),
        topology.deadletter("segmenter"),
    ]
    for subject in subjects:
        owners = [c.name for c in configs if any(_covers(p, subject) for p in c.subjects or [])]
        assert len(owners) == 1, (subject, owners)


def test_streams_keep_history_and_deduplicate_retries_for_a_day() -> None:
    for config in Topology().stream_configs():
        assert config.duplicate_window is not None and config.duplicate_window >= 24 * 3600
        assert not config.max_age  # no age limit drops history


# --- derived_id --------------------------------------------------------------------------------


def test_derived_id_is_deterministic_and_a_uuid() -> None:
    first = derived_id("evt-1", "profile_changed")
    assert first == derived_id("evt-1", "profile_changed")
    assert uuid.UUID(first).version == 5


def test_derived_id_differs_per_cause_and_per_fact() -> None:
    ids = {derived_id(cause, fact) for cause in ("evt-1", "evt-2", "evt-10") for fact in ("a", "b", "segment:vip")}
    assert len(ids) == 9


@given(st.text(), st.text())
@settings(max_examples=300)
def test_derived_id_is_stable_across_releases(cause: str, fact: str) -> None:
    """Ids already in the log and in read models were made by uuid5; a re-derived one must match."""
    assert derived_id(cause, fact) == str(uuid.uuid5(uuid.NAMESPACE_URL, f"cdp:{cause}:{fact}"))


# --- encode / decode ---------------------------------------------------------------------------


def test_an_event_survives_encode_and_decode() -> None:
    cause = eventlog.new_event("track", event_id="evt-1", source="web")
    cause.correlation_id = "corr-1"
    cause.identifiers.user_id = "u1"
    event = eventlog.new_event("profile_changed", event_id=derived_id(cause.id, "p"), source="profile", cause=cause)
    event.profile_changed.changed_fields.append("traits.plan")
    decoded = decode(encode(event))
    assert decoded == event
    assert decoded.causation_id == "evt-1"
    assert decoded.correlation_id == "corr-1"
    assert decoded.occurred_at == cause.occurred_at
    assert decoded.WhichOneof("detail") == "profile_changed"


def test_a_new_event_without_a_cause_happened_when_received() -> None:
    event = eventlog.new_event("track", event_id="e", source="s")
    assert event.occurred_at == event.received_at
    assert event.received_at.seconds > 0
    assert event.correlation_id == "" and event.causation_id == ""


def test_the_correlation_id_defaults_to_the_cause_id() -> None:
    cause = eventlog.new_event("track", event_id="evt-9", source="web")
    assert eventlog.new_event("identify", event_id="e2", source="s", cause=cause).correlation_id == "evt-9"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"\xff\xff\xff",
        b'{"id": "e1", "type": "track"}',
        event_pb2.Event(id="e1").SerializeToString(),  # no type
        event_pb2.Event(type="track").SerializeToString(),  # no id
    ],
)
def test_decode_rejects_bytes_that_are_not_an_event(payload: bytes) -> None:
    with pytest.raises((ValueError, DecodeError)):
        decode(payload)


def test_outgoing_headers_deduplicate_by_event_id() -> None:
    event = eventlog.new_event("track", event_id="evt-1", source="web")
    assert eventlog.Outgoing("s", event).headers() == {
        eventlog.MSG_ID_HEADER: "evt-1", eventlog.TYPE_HEADER: "track"
    }
    event.correlation_id = "c-1"
    assert eventlog.Outgoing("s", event).headers()[eventlog.CORRELATION_HEADER] == "c-1"
