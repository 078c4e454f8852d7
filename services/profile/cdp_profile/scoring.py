"""One profile scored against the whole base, and the base-level models it is scored with. Pure.

The math is in scores.py. This turns a profile's state into its inputs (times in days before
`now`, money net of refunds), builds the models (RFM boundaries, BG/NBD parameters, the
co-purchase table) from every customer at once, and gathers the results with their reasons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cdp_profile import scores
from cdp_profile.core import ProfileState, RfmScore, Score, Scores, days_between

# Names of the stored models (rows of profile.models).
RFM, CHURN, OFFERS = "rfm", "churn", "offers"


@dataclass(frozen=True)
class Models:
    """The base-level models: what "relative to the whole base" means at one moment."""

    rfm: scores.RfmBoundaries = field(default_factory=scores.RfmBoundaries)
    churn: scores.BgNbdParams = scores.DEFAULT_BGNBD
    offers: scores.CoPurchase = field(default_factory=scores.CoPurchase)
    computed_at: datetime | None = None

    def to_rows(self) -> dict[str, dict[str, Any]]:
        return {RFM: self.rfm.to_dict(), CHURN: self.churn.to_dict(), OFFERS: self.offers.to_dict()}

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any]], computed_at: datetime | None) -> Models:
        default = cls()
        return cls(
            rfm=scores.RfmBoundaries.from_dict(rows[RFM]) if RFM in rows else default.rfm,
            churn=scores.BgNbdParams.from_dict(rows[CHURN]) if CHURN in rows else default.churn,
            offers=scores.CoPurchase.from_dict(rows[OFFERS]) if OFFERS in rows else default.offers,
            computed_at=computed_at,
        )


@dataclass(frozen=True)
class Inputs:
    """What the scores read of a profile (the store can read just these for the whole base)."""

    order_count: int
    monetary: float
    first_order_at: datetime | None
    last_order_at: datetime | None
    first_seen_at: datetime | None
    categories: Mapping[str, int]

    @property
    def customer(self) -> bool:
        return self.order_count > 0 and self.first_order_at is not None and self.last_order_at is not None


def inputs_of(state: ProfileState) -> Inputs:
    return Inputs(
        order_count=state.order_count,
        monetary=(state.revenue_cents - state.refunded_cents) / 100,
        first_order_at=state.first_order_at,
        last_order_at=state.last_order_at,
        first_seen_at=state.first_seen_at,
        categories=state.categories,
    )


def _days(since: datetime, now: datetime) -> float:
    # An order stamped slightly ahead of this clock is not in the future.
    return max(days_between(since, now), 0.0)


def build_models(base: Iterable[Inputs], now: datetime) -> Models:
    """The models over every customer (a profile with at least one order)."""
    customers = [c for c in base if c.customer]
    rfm_rows, churn_rows = [], []
    for c in customers:
        assert c.first_order_at is not None and c.last_order_at is not None
        rfm_rows.append((_days(c.last_order_at, now), c.order_count, c.monetary))
        churn_rows.append((c.order_count - 1, days_between(c.first_order_at, c.last_order_at),
                           _days(c.first_order_at, now)))
    return Models(
        rfm=scores.rfm_boundaries(rfm_rows),
        churn=scores.fit_bgnbd(churn_rows),
        offers=scores.co_purchase(c.categories for c in customers),
        computed_at=now,
    )


def _score(reasoned: scores.Reasoned | None) -> Score | None:
    return None if reasoned is None else Score(reasoned.label, reasoned.value, tuple(reasoned.reasons))


def score(inputs: Inputs, models: Models, now: datetime) -> Scores:
    """Lifecycle and purchase frequency for everyone; RFM and churn for customers; an offer when
    the base has bought anything."""
    recency = None if inputs.last_order_at is None else _days(inputs.last_order_at, now)
    interval = None
    if inputs.order_count > 1 and inputs.first_order_at is not None and inputs.last_order_at is not None:
        interval = days_between(inputs.first_order_at, inputs.last_order_at) / (inputs.order_count - 1)
    seen = None if inputs.first_seen_at is None else _days(inputs.first_seen_at, now)
    lifecycle = scores.lifecycle(inputs.order_count, recency, interval, seen)
    rfm = churn = None
    if inputs.customer:
        assert inputs.first_order_at is not None and inputs.last_order_at is not None and recency is not None
        cell = scores.rfm(recency, inputs.order_count, inputs.monetary, models.rfm)
        rfm = RfmScore(cell.r, cell.f, cell.m, cell.cell, tuple(cell.reasons))
        churn = _score(scores.churn_risk(
            models.churn, inputs.order_count - 1, days_between(inputs.first_order_at, inputs.last_order_at),
            _days(inputs.first_order_at, now),
        ))
    return Scores(
        lifecycle=Score(lifecycle.label, lifecycle.value, tuple(lifecycle.reasons)),
        frequency_falling=scores.purchase_frequency_falling(recency, interval),
        rfm=rfm,
        churn=churn,
        offer=_score(scores.next_best_offer(inputs.categories, models.offers)),
    )
