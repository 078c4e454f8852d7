"""How events change a profile: traits last-writer-wins by event time, order aggregates. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

ORDER_COMPLETED = "Order Completed"
# Where sources put an order's value, in the order they are looked for (Segment spec: revenue,
# then total; ad platforms: value).
_ORDER_VALUE_KEYS = ("revenue", "total", "value")


@dataclass(frozen=True)
class ProfileState:
    profile_id: str
    traits: Mapping[str, Any] = field(default_factory=dict)
    # ISO event time at which each trait was last set.
    trait_times: Mapping[str, str] = field(default_factory=dict)
    identifiers: frozenset[tuple[str, str]] = frozenset()
    order_count: int = 0
    revenue: float = 0.0
    last_order_at: datetime | None = None
    first_seen_at: datetime | None = None
    event_count: int = 0
    merged_ids: tuple[str, ...] = ()


def order_value(name: str, properties: Mapping[str, Any]) -> float | None:
    """The value of an order event, or None if the event is not an order."""
    if name != ORDER_COMPLETED:
        return None
    for key in _ORDER_VALUE_KEYS:
        value = properties.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float | str):
            try:
                amount = float(value)
            except ValueError:
                continue
            # NaN or infinity would poison the revenue for good.
            if math.isfinite(amount):
                return amount
    return 0.0


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def _earlier(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def set_traits(
    traits: Mapping[str, Any], times: Mapping[str, str], new: Mapping[str, Any], at: datetime
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Last writer wins by event time: an older event arriving late never overwrites a newer value."""
    merged, merged_times, changed = dict(traits), dict(times), []
    stamp = at.isoformat()
    for key, value in new.items():
        previous = merged_times.get(key)
        if previous and _time(previous) > at:
            continue
        if merged.get(key) != value or key not in merged:
            changed.append(f"traits.{key}")
        merged[key] = value
        merged_times[key] = stamp
    return merged, merged_times, changed


def apply_event(
    state: ProfileState,
    *,
    name: str,
    properties: Mapping[str, Any],
    traits: Mapping[str, Any],
    identifiers: Iterable[tuple[str, str]],
    at: datetime,
) -> tuple[ProfileState, list[str]]:
    new_traits, new_times, changed = set_traits(state.traits, state.trait_times, traits, at)
    ids = state.identifiers | frozenset(identifiers)
    if ids != state.identifiers:
        changed.append("identifiers")
    result = replace(
        state,
        traits=new_traits,
        trait_times=new_times,
        identifiers=ids,
        event_count=state.event_count + 1,
        first_seen_at=_earlier(state.first_seen_at, at),
    )
    value = order_value(name, properties)
    if value is not None:
        result = replace(
            result,
            order_count=state.order_count + 1,
            revenue=round(state.revenue + value, 2),
            last_order_at=_later(state.last_order_at, at),
        )
        changed += ["order_count", "revenue", "last_order_at"]
    return result, changed


def merge(survivor: ProfileState, others: Iterable[ProfileState]) -> ProfileState:
    """Folds merged-away profiles into the survivor; traits still resolve by event time."""
    result = survivor
    for other in others:
        traits, times = dict(result.traits), dict(result.trait_times)
        for key, value in other.traits.items():
            theirs, ours = other.trait_times.get(key), times.get(key)
            if key not in traits or (theirs and (not ours or _time(theirs) > _time(ours))):
                traits[key], times[key] = value, theirs or ""
        result = replace(
            result,
            traits=traits,
            trait_times=times,
            identifiers=result.identifiers | other.identifiers,
            order_count=result.order_count + other.order_count,
            revenue=round(result.revenue + other.revenue, 2),
            last_order_at=_later(result.last_order_at, other.last_order_at),
            first_seen_at=_earlier(result.first_seen_at, other.first_seen_at),
            event_count=result.event_count + other.event_count,
            merged_ids=tuple(dict.fromkeys([*result.merged_ids, other.profile_id, *other.merged_ids])),
        )
    return result
