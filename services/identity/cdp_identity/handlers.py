"""Identity's log consumer: resolve each collected event and apply operators' merge and split
requests, in log order; publish the resolutions, merges and splits."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp.v1 import event_pb2
from cdp_common import db, eventlog, identifiers
from cdp_common.consumer import BatchHandler, ConsumerSpec, Handler, Pipeline
from cdp_identity import batch, core, store

# Larger batches than the default: a batch's dozen statements and its pull request are shared by
# more events (bench/identity.py, paired runs: 500 took about 10% less CPU per event than 200, in
# identity and in PostgreSQL, and 1,000 about 8% less than 500).
SPEC = ConsumerSpec(durable="identity-resolve", area="collected", batch=1000, max_ack_pending=3000)

log = structlog.get_logger("cdp.identity")


def _set_identifiers(result: event_pb2.Identifiers, keys: Sequence[core.Key]) -> None:
    result.Clear()
    for id_type, value in keys:
        if id_type in identifiers.TYPES:
            setattr(result, id_type, value)
        else:
            result.custom[id_type] = value



def make_handler(topology: eventlog.Topology, rules: core.Rules = core.DEFAULT_RULES) -> Handler:
    """The per-event handler (tests drive it directly)."""
    return make_handlers(topology, rules)[0]


def make_handlers(
    topology: eventlog.Topology, rules: core.Rules = core.DEFAULT_RULES
) -> tuple[Handler, BatchHandler, Pipeline]:
    """The per-event handler; the batch handler; the pipeline the consumer tries first (a batch
    decided while the one before it is written), then the batch handler, then event by event."""
    def merged_fact(cause: event_pb2.Event, survivor: str, merged: Sequence[str], reason: str,
                    linking: Sequence[core.Key]) -> eventlog.Outgoing:
        fact = eventlog.new_event("profiles_merged", event_id=eventlog.derived_id(cause.id, "merged"),
                                  source="identity", cause=cause)
        fact.profile_id = survivor
        fact.profiles_merged.survivor_id = survivor
        fact.profiles_merged.merged_ids.extend(merged)
        fact.profiles_merged.reason = reason
        for id_type, value in linking:
            fact.profiles_merged.linking_identifiers.add(type=id_type, value=value)
        return eventlog.Outgoing(topology.keyed("identity", survivor, "merged"), fact)

    def resolved_facts(
        event: event_pb2.Event, decision: core.Decision, kept: Sequence[core.Key]
    ) -> list[eventlog.Outgoing]:
        for key, why in decision.dropped:
            log.info("identifier_dropped", id_type=key[0], reason=why, profile_id=decision.profile_id)
        out: list[eventlog.Outgoing] = []
        if decision.merged:
            out.append(merged_fact(event, decision.profile_id, decision.merged, decision.reason, kept))
        # The collected event becomes the resolved one in place (not copied): each batch decodes
        # its own events, and the per-event path below passes a copy.
        event.profile_id = decision.profile_id
        _set_identifiers(event.identifiers, kept)
        out.append(eventlog.Outgoing(topology.keyed("identity", decision.profile_id, "resolved"), event))
        return out

    async def resolve(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        # The same path as a whole batch, for one event: one way to write a decision. On a copy,
        # as the consumer retries a failed attempt with the same event.
        own = event_pb2.Event()
        own.CopyFrom(event)
        return await batch.resolve_events(conn, [own], rules, resolved_facts)

    async def merge_requested(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        request = event.merge_requested
        others = [p for p in dict.fromkeys(request.profile_ids) if p != request.survivor_id]
        known = await store.known(conn, [request.survivor_id, *others])
        live = await store.live_profiles(conn, [request.survivor_id, *others])
        at = batch.event_time(event)
        refusal = (
            "every profile must exist and not be merged already"
            if len(live) != len(others) + 1
            else core.merge_refusal(known[request.survivor_id], [known[p] for p in others], at, rules)
        )
        if refusal or not others:
            log.warning("merge_refused", survivor_id=request.survivor_id, reason=refusal or "nothing to merge")
            return []
        reason = f"operator merge: {request.reason}" if request.reason else "operator merge"
        decision = core.Decision(request.survivor_id, False, tuple(others), (), (), reason)
        await batch.merge(conn, decision, known, event.id, at)
        return [merged_fact(event, request.survivor_id, others, reason, [])]

    async def split_requested(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        request = event.split_requested
        keys = [(i.type, i.value) for i in request.identifiers]
        known = await store.known(conn, [request.profile_id])
        live = await store.live_profiles(conn, [request.profile_id])
        refusal = (
            f"profile {request.profile_id} does not exist or was merged"
            if not live
            else core.split_refusal(known[request.profile_id], keys)
        )
        if refusal:
            log.warning("split_refused", profile_id=request.profile_id, reason=refusal)
            return []
        new = eventlog.derived_id(event.id, "split")
        reason = f"operator split: {request.reason}" if request.reason else "operator split"
        await store.split(conn, source=request.profile_id, new=new, keys=keys, event_id=event.id, reason=reason,
                          at=batch.event_time(event))
        fact = eventlog.new_event("profile_split", event_id=eventlog.derived_id(event.id, "split-fact"),
                                  source="identity", cause=event)
        fact.profile_id = request.profile_id
        fact.profile_split.source_profile_id = request.profile_id
        fact.profile_split.new_profile_id = new
        fact.profile_split.identifiers.extend(request.identifiers)
        fact.profile_split.reason = reason
        return [eventlog.Outgoing(topology.keyed("identity", request.profile_id, "split"), fact)]

    async def handle(conn: AsyncConnection, event: event_pb2.Event) -> Sequence[eventlog.Outgoing]:
        if event.type == "merge_requested":
            return await merge_requested(conn, event)
        if event.type == "split_requested":
            return await split_requested(conn, event)
        return await resolve(conn, event)

    statistics = db.Statistics(["identity.profiles", "identity.identifiers"])
    return (handle, batch.make_batch_handler(rules, handle, resolved_facts, statistics),
            batch.Resolver(rules, resolved_facts, statistics))
