"""A profile as commutative state, so neither arrival order nor merges can change it. Pure.

Traits, consents, support tickets and the loyalty tier and balance are last-writer-wins
registers keyed by event time (equal times are broken by the value, never by arrival);
counts and sums add up; first and last times are min and max; identifiers and order
categories are a set and a multiset. Folding events in any order, or folding two parts and
merging them, gives the same state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

ORDER_COMPLETED = "Order Completed"
ORDER_REFUNDED = "Order Refunded"
CONSENT_UPDATED = "Consent Updated"
UNSUBSCRIBED = "Unsubscribed"
LOYALTY_POINTS_EARNED = "Loyalty Points Earned"
LOYALTY_TIER_CHANGED = "Loyalty Tier Changed"
# Where sources put an order's value, in the order they are looked for (Segment spec: revenue,
# then total; ad platforms: value). A refund is its total first.
_ORDER_VALUE_KEYS = ("revenue", "total", "value")
_REFUND_VALUE_KEYS = ("total", "revenue", "value")
# Email engagement events (Segment's email spec) and the counter each one adds to.
EMAIL_EVENTS = {
    "Email Sent": "email_sends",
    "Email Delivered": "email_deliveries",
    "Email Opened": "email_opens",
    "Email Link Clicked": "email_clicks",
    "Email Bounced": "email_bounces",
}
# A ticket's status after each customer-service event; at equal times the later stage wins, so
# a resolution and an opening stamped alike end resolved.
TICKET_EVENTS = {"Ticket Opened": "open", "Ticket Reopened": "open", "Ticket Resolved": "resolved",
                 "Ticket Closed": "closed"}
_TICKET_RANK = {"open": 0, "resolved": 1, "closed": 2}
# A consent given for a channel without a purpose covers every purpose.
ANY_PURPOSE = "all"
_TOKEN_LIMIT = 64

# (ISO event time in UTC, value): the time first, so tuples compare newest-last.
Stamped = tuple[str, Any]


@dataclass(frozen=True)
class Score:
    """A derived score, its label and why."""

    label: str
    value: float
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class RfmScore:
    recency: int
    frequency: int
    monetary: int
    cell: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scores:
    """What the profile's state is worth against the whole base (see scoring.py)."""

    lifecycle: Score
    frequency_falling: bool = False
    rfm: RfmScore | None = None
    churn: Score | None = None
    offer: Score | None = None

    def key(self) -> tuple[Any, ...]:
        """What a rescore must change before it is saved and published (not a drifting value)."""
        rfm = self.rfm
        return (
            (rfm.recency, rfm.frequency, rfm.monetary, rfm.cell) if rfm else None,
            self.churn.label if self.churn else None,
            self.offer.label if self.offer else None,
            self.lifecycle.label,
            self.frequency_falling,
        )

    def to_dict(self) -> dict[str, Any]:
        def score(s: Score | None) -> dict[str, Any] | None:
            return None if s is None else {"label": s.label, "value": s.value, "reasons": list(s.reasons)}

        rfm = self.rfm
        return {
            "lifecycle": score(self.lifecycle),
            "frequency_falling": self.frequency_falling,
            "rfm": None if rfm is None else {
                "recency": rfm.recency, "frequency": rfm.frequency, "monetary": rfm.monetary,
                "cell": rfm.cell, "reasons": list(rfm.reasons),
            },
            "churn": score(self.churn),
            "offer": score(self.offer),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scores | None:
        if not d.get("lifecycle"):
            return None

        def score(s: Mapping[str, Any] | None) -> Score | None:
            return None if not s else Score(str(s["label"]), float(s["value"]), tuple(s.get("reasons", ())))

        rfm = d.get("rfm")
        return cls(
            lifecycle=score(d["lifecycle"]) or Score("prospect", 0.0),
            frequency_falling=bool(d.get("frequency_falling")),
            rfm=None if not rfm else RfmScore(int(rfm["recency"]), int(rfm["frequency"]), int(rfm["monetary"]),
                                              str(rfm["cell"]), tuple(rfm.get("reasons", ()))),
            churn=score(d.get("churn")),
            offer=score(d.get("offer")),
        )


@dataclass(frozen=True)
class ProfileState:
    profile_id: str
    traits: Mapping[str, Any] = field(default_factory=dict)
    # ISO event time at which each trait was last set.
    trait_times: Mapping[str, str] = field(default_factory=dict)
    identifiers: frozenset[tuple[str, str]] = frozenset()
    # "<channel>.<purpose>" -> (time, granted)
    consents: Mapping[str, Stamped] = field(default_factory=dict)
    # ticket id -> (time, status)
    tickets: Mapping[str, Stamped] = field(default_factory=dict)
    loyalty_tier: Stamped | None = None
    loyalty_balance: Stamped | None = None
    loyalty_earned: int = 0
    order_count: int = 0
    # Money in cents: integer sums are exact in any order, float sums are not.
    revenue_cents: int = 0
    first_order_at: datetime | None = None
    last_order_at: datetime | None = None
    # Product category -> items bought (Order Completed products[].category, by quantity).
    categories: Mapping[str, int] = field(default_factory=dict)
    refund_count: int = 0
    refunded_cents: int = 0
    email_sends: int = 0
    email_deliveries: int = 0
    email_opens: int = 0
    email_clicks: int = 0
    email_bounces: int = 0
    last_open_at: datetime | None = None
    last_click_at: datetime | None = None
    event_count: int = 0
    first_seen_at: datetime | None = None
    last_seen_at: datetime | None = None
    merged_ids: tuple[str, ...] = ()
    # Derived from the state, the base-level models and the clock; neither folded nor merged.
    scores: Scores | None = None

    @property
    def revenue(self) -> float:
        return self.revenue_cents / 100

    @property
    def refunded(self) -> float:
        return self.refunded_cents / 100

    @property
    def average_order_value(self) -> float | None:
        return round(self.revenue_cents / self.order_count / 100, 2) if self.order_count else None

    @property
    def average_interval_days(self) -> float | None:
        """Days between orders on average: the span from first to last order over the gaps in it."""
        if self.order_count < 2 or self.first_order_at is None or self.last_order_at is None:
            return None
        return days_between(self.first_order_at, self.last_order_at) / (self.order_count - 1)

    @property
    def email_open_rate(self) -> float | None:
        return _rate(self.email_opens, self._email_reached)

    @property
    def email_click_rate(self) -> float | None:
        return _rate(self.email_clicks, self._email_reached)

    @property
    def _email_reached(self) -> int:
        # Deliveries when the source reports them, sends otherwise.
        return self.email_deliveries or self.email_sends

    @property
    def loyalty_points(self) -> int:
        """The latest balance a source reported, else the points earned."""
        return int(self.loyalty_balance[1]) if self.loyalty_balance else self.loyalty_earned

    @property
    def open_tickets(self) -> tuple[str, ...]:
        return tuple(sorted(t for t, (_, status) in self.tickets.items() if status == "open"))


_FIELDS = tuple(f.name for f in fields(ProfileState))


_FIELD_NAMES = frozenset(_FIELDS)


def from_fields(values: Mapping[str, Any]) -> ProfileState:
    """A state from a value for each of its fields, without the dataclass __init__: a frozen one
    sets each of its 28 fields through object.__setattr__, several times the cost, and the
    projection builds a state per changed profile, and one per profile it reads."""
    if values.keys() != _FIELD_NAMES:
        raise TypeError(f"ProfileState fields missing {sorted(_FIELD_NAMES - values.keys())}, "
                        f"unknown {sorted(values.keys() - _FIELD_NAMES)}")
    state = object.__new__(ProfileState)
    state.__dict__.update(values)
    return state


def with_scores(state: ProfileState, scores: Scores | None) -> ProfileState:
    """`replace(state, scores=scores)`, at the cost of a dict copy (see `from_fields`)."""
    return from_fields({**state.__dict__, "scores": scores})


def _rate(part: int, whole: int) -> float | None:
    # An open counted per open, not per message: re-opening must not push a rate over 100%.
    return min(1.0, part / whole) if whole else None


def days_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / 86400


def stamp(at: datetime) -> str:
    """An event time as text that sorts like the time (ISO 8601 in UTC)."""
    return at.astimezone(UTC).isoformat()


@dataclass(frozen=True, slots=True)
class Observed:
    """One event as the profile sees it."""

    at: datetime
    name: str = ""
    type: str = "track"
    properties: Mapping[str, Any] = field(default_factory=dict)
    traits: Mapping[str, Any] = field(default_factory=dict)
    consent: Mapping[str, bool] = field(default_factory=dict)
    identifiers: tuple[tuple[str, str], ...] = ()


def _amount(properties: Mapping[str, Any], keys: tuple[str, ...]) -> float:
    for key in keys:
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


def order_value(name: str, properties: Mapping[str, Any]) -> float | None:
    """The value of an order event, or None if the event is not an order."""
    return _amount(properties, _ORDER_VALUE_KEYS) if name == ORDER_COMPLETED else None


def _cents(amount: float) -> int:
    return round(amount * 100)


def _token(value: Any) -> str | None:
    """A channel or purpose name: lower-case text without dots."""
    if not isinstance(value, str):
        return None
    token = value.strip().lower()
    return token if token and "." not in token and len(token) <= _TOKEN_LIMIT else None


def consent_key(channel: Any, purpose: Any = ANY_PURPOSE) -> str | None:
    c, p = _token(channel), _token(purpose or ANY_PURPOSE)
    return None if c is None or p is None else f"{c}.{p}"


def _consents_of(event: Observed) -> list[tuple[str, bool]]:
    """The envelope's consent map ("email" or "email.marketing" -> bool) and consent events."""
    found = []
    for raw, granted in event.consent.items():
        channel, _, purpose = raw.replace(":", ".").partition(".")
        key = consent_key(channel, purpose)
        if key is not None:
            found.append((key, bool(granted)))
    props = event.properties
    if event.type != "track":
        return found
    if event.name == CONSENT_UPDATED and isinstance(props.get("granted"), bool):
        key = consent_key(props.get("channel"), props.get("purpose"))
        if key is not None:
            found.append((key, props["granted"]))
    elif event.name == UNSUBSCRIBED:
        found.append((f"email.{props.get('purpose') if _token(props.get('purpose')) else 'marketing'}", False))
    return found


def _categories_of(properties: Mapping[str, Any]) -> dict[str, int]:
    found: dict[str, int] = {}
    products = properties.get("products")
    if not isinstance(products, list | tuple):
        return found
    for product in products:
        if not isinstance(product, Mapping):
            continue
        category = product.get("category")
        if not isinstance(category, str) or not category.strip():
            continue
        quantity = product.get("quantity")
        count = int(quantity) if isinstance(quantity, int | float) and not isinstance(quantity, bool) \
            and math.isfinite(quantity) and quantity >= 1 else 1
        found[category.strip()] = found.get(category.strip(), 0) + count
    return found


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _wins(new: Stamped, old: Stamped | None, rank: Callable[[Any], Any]) -> bool:
    """Last writer wins by event time; equal times go to the higher-ranked value."""
    if old is None or new[0] > old[0]:
        return True
    return new[0] == old[0] and rank(new[1]) > rank(old[1])


def _consent_rank(granted: Any) -> int:
    # At equal times a refusal wins: sending without consent is the costly mistake.
    return 0 if granted else 1


def _ticket_rank(status: Any) -> int:
    return _TICKET_RANK.get(status, -1)


def _min(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


class _Working:
    """A mutable copy of a state (its fields by name), so a batch folds without a new state per event."""

    def __init__(self, state: ProfileState) -> None:
        v: dict[str, Any] = {name: getattr(state, name) for name in _FIELDS}
        for name in ("traits", "trait_times", "consents", "tickets", "categories"):
            v[name] = dict(v[name])
        v["identifiers"] = set(state.identifiers)
        self.v = v

    def freeze(self) -> ProfileState:
        return from_fields({**self.v, "identifiers": frozenset(self.v["identifiers"])})

    def set_trait(self, key: str, value: Any, at: str) -> None:
        traits, times = self.v["traits"], self.v["trait_times"]
        previous = times.get(key)
        if previous is not None and key in traits and (
            previous > at or (previous == at and _canonical(traits[key]) >= _canonical(value))
        ):
            return
        traits[key] = value
        times[key] = at

    def put(self, name: str, key: str | None, new: Stamped, rank: Callable[[Any], Any]) -> None:
        """Sets register `name` (or its entry `key`) unless it holds a newer value."""
        if key is None:
            if _wins(new, self.v[name], rank):
                self.v[name] = new
        elif _wins(new, self.v[name].get(key), rank):
            self.v[name][key] = new

    def add(self, name: str, amount: int) -> None:
        self.v[name] += amount

    def earliest(self, name: str, at: datetime | None) -> None:
        self.v[name] = _min(self.v[name], at)

    def latest(self, name: str, at: datetime | None) -> None:
        self.v[name] = _max(self.v[name], at)

    def observe(self, event: Observed) -> None:
        at, name, props = event.at, event.name, event.properties
        # The time as text, for the registers (last writer wins): most events set none.
        when = stamp(at) if event.traits or event.consent or name in _REGISTER_EVENTS else ""
        self.add("event_count", 1)
        self.earliest("first_seen_at", at)
        self.latest("last_seen_at", at)
        self.v["identifiers"].update(event.identifiers)
        for key, value in event.traits.items():
            self.set_trait(key, value, when)
        for key, granted in _consents_of(event):
            self.put("consents", key, (when, granted), _consent_rank)
        if event.type != "track":
            # Semantic events are track calls; a page that happens to be named alike is not one.
            return
        if name == ORDER_COMPLETED:
            self.add("order_count", 1)
            self.add("revenue_cents", _cents(_amount(props, _ORDER_VALUE_KEYS)))
            self.earliest("first_order_at", at)
            self.latest("last_order_at", at)
            categories = self.v["categories"]
            for category, count in _categories_of(props).items():
                categories[category] = categories.get(category, 0) + count
        elif name == ORDER_REFUNDED:
            self.add("refund_count", 1)
            self.add("refunded_cents", _cents(_amount(props, _REFUND_VALUE_KEYS)))
        elif name in EMAIL_EVENTS:
            counter = EMAIL_EVENTS[name]
            self.add(counter, 1)
            if counter == "email_opens":
                self.latest("last_open_at", at)
            elif counter == "email_clicks":
                self.latest("last_click_at", at)
        elif name in TICKET_EVENTS:
            ticket = props.get("ticket_id")
            if isinstance(ticket, str | int) and not isinstance(ticket, bool) and str(ticket):
                self.put("tickets", str(ticket), (when, TICKET_EVENTS[name]), _ticket_rank)
        elif name == LOYALTY_POINTS_EARNED:
            points, balance = _integer(props.get("points")), _integer(props.get("balance"))
            if points is not None:
                self.add("loyalty_earned", points)
            if balance is not None:
                self.put("loyalty_balance", None, (when, balance), int)
        elif name == LOYALTY_TIER_CHANGED:
            tier = props.get("tier")
            if isinstance(tier, str) and tier.strip():
                self.put("loyalty_tier", None, (when, tier.strip()), str)

    def absorb(self, other: ProfileState) -> None:
        for key, value in other.traits.items():
            self.set_trait(key, value, other.trait_times.get(key, ""))
        self.v["identifiers"] |= other.identifiers
        for key, entry in other.consents.items():
            self.put("consents", key, entry, _consent_rank)
        for key, entry in other.tickets.items():
            self.put("tickets", key, entry, _ticket_rank)
        if other.loyalty_tier is not None:
            self.put("loyalty_tier", None, other.loyalty_tier, str)
        if other.loyalty_balance is not None:
            self.put("loyalty_balance", None, other.loyalty_balance, int)
        categories = self.v["categories"]
        for category, count in other.categories.items():
            categories[category] = categories.get(category, 0) + count
        for name in _SUMS:
            self.add(name, getattr(other, name))
        for name in ("first_order_at", "first_seen_at"):
            self.earliest(name, getattr(other, name))
        for name in ("last_order_at", "last_open_at", "last_click_at", "last_seen_at"):
            self.latest(name, getattr(other, name))


# The events that may set a register besides traits and the envelope's consent.
_REGISTER_EVENTS = frozenset({CONSENT_UPDATED, UNSUBSCRIBED, LOYALTY_POINTS_EARNED, LOYALTY_TIER_CHANGED, *TICKET_EVENTS})
_SUMS = ("loyalty_earned", "order_count", "revenue_cents", "refund_count", "refunded_cents", "email_sends",
         "email_deliveries", "email_opens", "email_clicks", "email_bounces", "event_count")


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer()):
        return int(value)
    return None


def fold(state: ProfileState, events: Iterable[Observed]) -> ProfileState:
    """The state after these events, whatever their order."""
    working = _Working(state)
    for event in events:
        working.observe(event)
    return working.freeze()


def set_traits(
    traits: Mapping[str, Any], times: Mapping[str, str], new: Mapping[str, Any], at: datetime
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Last writer wins by event time: an older event arriving late never overwrites a newer value."""
    working = _Working(ProfileState("", traits=traits, trait_times=times))
    when = stamp(at)
    for key, value in new.items():
        working.set_trait(key, value, when)
    merged, merged_times = working.v["traits"], working.v["trait_times"]
    changed = [f"traits.{k}" for k in new if k not in traits or traits[k] != merged[k]]
    return merged, merged_times, changed


def apply_event(
    state: ProfileState,
    *,
    name: str,
    properties: Mapping[str, Any],
    traits: Mapping[str, Any],
    identifiers: Iterable[tuple[str, str]],
    at: datetime,
    type_: str = "track",
    consent: Mapping[str, bool] | None = None,
) -> tuple[ProfileState, list[str]]:
    event = Observed(at=at, name=name, type=type_, properties=properties, traits=traits,
                     consent=consent or {}, identifiers=tuple(identifiers))
    result = fold(state, [event])
    return result, changed_fields(state, result)


def combine(a: ProfileState, b: ProfileState) -> ProfileState:
    """a with b's history folded in (commutative and associative except for a's id and merges)."""
    working = _Working(a)
    working.absorb(b)
    return working.freeze()


def merge(survivor: ProfileState, others: Iterable[ProfileState]) -> ProfileState:
    """Folds merged-away profiles into the survivor; traits still resolve by event time."""
    result = survivor
    for other in others:
        result = replace(
            combine(result, other),
            merged_ids=tuple(dict.fromkeys([*result.merged_ids, other.profile_id, *other.merged_ids])),
        )
    return result


# Reported names of what changed, per state field (several fields may report one name).
_REPORTED = {
    "identifiers": "identifiers", "consents": "consents", "tickets": "tickets",
    "loyalty_tier": "loyalty", "loyalty_balance": "loyalty", "loyalty_earned": "loyalty",
    "order_count": "order_count", "revenue_cents": "revenue", "first_order_at": "first_order_at",
    "last_order_at": "last_order_at", "categories": "order_categories",
    "refund_count": "refunds", "refunded_cents": "refunds",
    "email_sends": "email", "email_deliveries": "email", "email_opens": "email", "email_clicks": "email",
    "email_bounces": "email", "last_open_at": "email", "last_click_at": "email",
    "event_count": "event_count", "first_seen_at": "first_seen_at", "last_seen_at": "last_seen_at",
    "merged_ids": "merged_ids",
}


def changed_fields(before: ProfileState | None, after: ProfileState) -> list[str]:
    """What a subscriber sees change: trait names, aggregates and scores, sorted."""
    base = before or ProfileState(after.profile_id)
    found = {f"traits.{k}" for k in base.traits.keys() | after.traits.keys()
             if k not in base.traits or k not in after.traits or base.traits[k] != after.traits[k]}
    found.update(name for attr, name in _REPORTED.items() if getattr(base, attr) != getattr(after, attr))
    old, new = base.scores, after.scores
    if new is not None and old != new:
        if old is None:
            found.update(("lifecycle_stage", "purchase_frequency_falling", "rfm", "churn_risk", "next_best_offer"))
        else:
            pairs = (("lifecycle_stage", old.lifecycle, new.lifecycle), ("rfm", old.rfm, new.rfm),
                     ("churn_risk", old.churn, new.churn), ("next_best_offer", old.offer, new.offer),
                     ("purchase_frequency_falling", old.frequency_falling, new.frequency_falling))
            found.update(name for name, x, y in pairs if x != y)
    return sorted(found)
