"""Explainable profile scores: RFM cells, BG/NBD churn risk, next best offer, lifecycle stage. Pure.

- RFM: each of recency, frequency and monetary is scored 1..5 by the customer's mid-rank
  percentile in the base (ties share the middle of the range they span), and the cell is read
  from the 11-segment map on R and the truncated average of F and M.
- Churn: 1 - P(alive) of the BG/NBD model (Fader, Hardie & Lee 2005, "Counting your customers
  the easy way"), its four parameters fitted by maximum likelihood over the whole base.
- Next best offer: the not-yet-bought category with the highest co-purchase confidence
  ("customers who bought X also bought Y"), weighted by the customer's own category mix and
  counting only pairs bought together by enough customers; overall popularity otherwise.
- Lifecycle: order count and the current gap against the customer's own average interval.

Times are in days and passed in by the caller; nothing here reads a clock. docs/profile.md
("Scores") documents the methods and every threshold.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations, groupby
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Reasoned:
    """A score with its explanation."""

    value: float
    label: str
    reasons: tuple[str, ...]


# --- RFM ---------------------------------------------------------------------------------------

# The 11-segment map (Putler's RFM segments) on R (rows, 5 = most recent) and FM (columns 1..5),
# its overlapping ranges resolved into one cell per score pair.
_RFM_CELLS: dict[int, tuple[str, str, str, str, str]] = {
    5: ("new_customers", "potential_loyalists", "potential_loyalists", "champions", "champions"),
    4: ("promising", "potential_loyalists", "loyal_customers", "champions", "champions"),
    3: ("about_to_sleep", "about_to_sleep", "need_attention", "loyal_customers", "loyal_customers"),
    2: ("hibernating", "hibernating", "at_risk", "at_risk", "cant_lose_them"),
    1: ("lost", "lost", "at_risk", "cant_lose_them", "cant_lose_them"),
}
RFM_CELLS = tuple(dict.fromkeys(cell for row in _RFM_CELLS.values() for cell in row))

# One edge per score from 2 to 5; None when no customer in the base reaches that score.
Edges = tuple[float | None, float | None, float | None, float | None]
_NO_EDGES: Edges = (None, None, None, None)


@dataclass(frozen=True)
class RfmBoundaries:
    """Quintile edges over the base, tie-aware.

    frequency[k] / monetary[k]: the smallest value in the base scoring k + 2 or more.
    recency_days[k]: the largest recency in the base scoring k + 2 or more (fewer days is better).
    """

    recency_days: Edges = _NO_EDGES
    frequency: Edges = _NO_EDGES
    monetary: Edges = _NO_EDGES
    customers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recency_days": list(self.recency_days),
            "frequency": list(self.frequency),
            "monetary": list(self.monetary),
            "customers": self.customers,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RfmBoundaries:
        def edges(key: str) -> Edges:
            values = [None if v is None else float(v) for v in d.get(key, _NO_EDGES)]
            if len(values) != 4:
                raise ValueError(f"RFM boundaries: {key} needs 4 edges, got {len(values)}")
            return (values[0], values[1], values[2], values[3])

        return cls(edges("recency_days"), edges("frequency"), edges("monetary"),
                   int(d.get("customers", 0)))


@dataclass(frozen=True)
class Rfm:
    r: int
    f: int
    m: int
    cell: str
    reasons: tuple[str, ...]


def _edges(values: Iterable[float], *, higher_is_better: bool) -> Edges:
    """Scores by mid-rank percentile: a group of equal values spanning ranks [i, j) of n scores
    1 + floor(5 * (i + j) / 2n), so ties all get the same score and a lone value scores 3."""
    ordered = sorted(values, reverse=not higher_is_better)
    n = len(ordered)
    found: list[float | None] = [None, None, None, None]
    i = 0
    for value, group in groupby(ordered):
        j = i + sum(1 for _ in group)
        score = 1 + 5 * (i + j) // (2 * n)
        for k in range(score - 1):
            if found[k] is None:
                found[k] = value
        i = j
    return (found[0], found[1], found[2], found[3])


def rfm_boundaries(customers: Iterable[tuple[float, int, float]]) -> RfmBoundaries:
    """Edges from (recency_days, frequency, monetary) of every customer with at least one order."""
    rows = list(customers)
    return RfmBoundaries(
        recency_days=_edges((row[0] for row in rows), higher_is_better=False),
        frequency=_edges((float(row[1]) for row in rows), higher_is_better=True),
        monetary=_edges((row[2] for row in rows), higher_is_better=True),
        customers=len(rows),
    )


def _score(value: float, edges: Edges, *, higher_is_better: bool) -> int:
    if higher_is_better:
        return 1 + sum(1 for edge in edges if edge is not None and value >= edge)
    return 1 + sum(1 for edge in edges if edge is not None and value <= edge)


def _next(score: int, edges: Edges) -> float | None:
    """The edge to reach score + 1, if any customer reached it."""
    return edges[score - 1] if score < 5 else None


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def rfm(recency_days: float, frequency: int, monetary: float, boundaries: RfmBoundaries) -> Rfm:
    """Scores against the base; before there is a base, against a base of this customer alone."""
    if not boundaries.customers:
        boundaries = rfm_boundaries([(recency_days, frequency, monetary)])
    r = _score(recency_days, boundaries.recency_days, higher_is_better=False)
    f = _score(frequency, boundaries.frequency, higher_is_better=True)
    m = _score(monetary, boundaries.monetary, higher_is_better=True)
    fm = (f + m) // 2
    cell = _RFM_CELLS[r][fm - 1]

    def better(name: str, score: int, edges: Edges, text: Callable[[float], str]) -> str:
        edge = _next(score, edges)
        return "" if edge is None else f" ({name}={score + 1} from {text(edge)})"

    reasons = (
        f"last order {_n(recency_days)} days ago: R={r}"
        + better("R", r, boundaries.recency_days, lambda e: f"{_n(e)} days or fewer"),
        f"{_count(frequency, 'order')}: F={f}"
        + better("F", f, boundaries.frequency, lambda e: f"{_n(e)} orders"),
        f"spent {monetary:,.2f}: M={m}"
        + better("M", m, boundaries.monetary, lambda e: f"{e:,.2f}"),
        f"{cell}: R={r} with F/M average {fm}, "
        f"scored against {_count(boundaries.customers, 'customer')}",
    )
    return Rfm(r, f, m, cell, reasons)


# --- Churn: BG/NBD -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BgNbdParams:
    """BG/NBD parameters, time in days: purchase rate ~ Gamma(r, alpha), dropout ~ Beta(a, b).

    fitted_on: how many customers the fit used; 0 for the default prior.
    """

    r: float
    alpha: float
    a: float
    b: float
    fitted_on: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "a": self.a, "b": self.b,
                "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BgNbdParams:
        return cls(float(d["r"]), float(d["alpha"]), float(d["a"]), float(d["b"]),
                   int(d.get("fitted_on", 0)))


# Fader, Hardie & Lee (2005), CDNOW: r=0.243, alpha=4.414 weeks, a=0.793, b=2.426; alpha in days.
DEFAULT_BGNBD = BgNbdParams(r=0.243, alpha=4.414 * 7, a=0.793, b=2.426)
# Fewer customers who had time to come back than this, or none who did: the default prior.
MIN_FIT_CUSTOMERS = 20
# Bounds on the log-parameters (time rescaled to a mean T of 1): keeps a degenerate base finite.
_LOG_BOUND = 12.0

Floats = NDArray[np.float64]


def _negative_log_likelihood(x: Floats, t_x: Floats, T: Floats) -> Callable[[Floats], float]:
    """The BG/NBD log-likelihood (FHL 2005, eq. 6) over the base, negated, of log-parameters.

    Terms depending on x alone are computed once per distinct x; only the time terms are per
    customer. Customers with no repeat purchase have only the "still alive at T" term.
    """
    # Imported here, as `minimize` is in fit_bgnbd: only the scoring job's fit needs scipy, and its
    # import takes about 0.4 s that every other start of the service and its children would wait.
    from scipy.special import gammaln  # type: ignore[import-untyped]

    xs, counts = np.unique(x, return_counts=True)
    zero = x == 0
    T0 = T[zero]
    xp, txp, Tp = x[~zero], t_x[~zero], T[~zero]
    repeat_xs, repeat_index = np.unique(xp, return_inverse=True)
    n = float(len(x))

    def nll(log_params: Floats) -> float:
        r, alpha, a, b = np.exp(log_params)
        per_x = (gammaln(r + xs) - gammaln(r)
                 + gammaln(a + b) + gammaln(b + xs) - gammaln(b) - gammaln(a + b + xs))
        ll = n * r * math.log(alpha) + float(np.dot(counts, per_x))
        ll -= r * float(np.sum(np.log(alpha + T0)))
        dropped = (math.log(a) - np.log(b + repeat_xs - 1))[repeat_index]
        ll += float(np.sum(np.logaddexp(-(r + xp) * np.log(alpha + Tp),
                                        dropped - (r + xp) * np.log(alpha + txp))))
        return -float(ll)

    return nll


def fit_bgnbd(rows: Sequence[tuple[int, float, float]]) -> BgNbdParams:
    """Maximum likelihood over (x repeat purchases, t_x days first to last order, T days first
    order to now); DEFAULT_BGNBD when the base is too small to say anything."""
    data = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    T = np.maximum(data[:, 2], 0.0)
    capable = T > 0
    x = np.maximum(np.rint(data[capable, 0]), 0.0)
    T = T[capable]
    t_x = np.clip(data[capable, 1], 0.0, T)
    if len(T) < MIN_FIT_CUSTOMERS or not np.any(x > 0):
        return DEFAULT_BGNBD
    from scipy.optimize import minimize  # type: ignore[import-untyped]  # see _negative_log_likelihood

    # alpha is in time units: fit on a time scale where it starts near 1.
    scale = float(np.mean(T))
    result = minimize(
        _negative_log_likelihood(x, t_x / scale, T / scale),
        np.zeros(4),
        method="L-BFGS-B",
        bounds=[(-_LOG_BOUND, _LOG_BOUND)] * 4,
    )
    if not np.all(np.isfinite(result.x)) or not math.isfinite(result.fun):
        return DEFAULT_BGNBD
    r, alpha, a, b = (float(v) for v in np.exp(result.x))
    return BgNbdParams(r=r, alpha=alpha * scale, a=a, b=b, fitted_on=len(T))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def p_alive(params: BgNbdParams, x: int, t_x: float, T: float) -> float:
    """P(alive | x, t_x, T) = 1 / (1 + [x > 0] * a / (b + x - 1) * ((alpha + T) / (alpha + t_x))^(r + x)).

    1 for x = 0: in BG/NBD a customer can only drop out right after a repeat purchase.
    """
    if x <= 0:
        return 1.0
    T = max(T, 0.0)
    t_x = min(max(t_x, 0.0), T)
    log_odds_dead = (math.log(params.a) - math.log(params.b + x - 1)
                     + (params.r + x) * math.log((params.alpha + T) / (params.alpha + t_x)))
    return _sigmoid(-log_odds_dead)


# 1 - P(alive) at or above these is "medium" / "high".
CHURN_MEDIUM = 0.3
CHURN_HIGH = 0.7


def churn_risk(params: BgNbdParams, x: int, t_x: float, T: float) -> Reasoned:
    risk = 1.0 - p_alive(params, x, t_x, T)
    label = "high" if risk >= CHURN_HIGH else "medium" if risk >= CHURN_MEDIUM else "low"
    model = (f"BG/NBD fitted on {_count(params.fitted_on, 'customer')}" if params.fitted_on
             else "the BG/NBD default prior (CDNOW, Fader, Hardie & Lee 2005)")
    reasons: tuple[str, ...]
    if x <= 0:
        reasons = (
            f"1 order, {_n(T)} days ago: no repeat purchase yet, and BG/NBD only lets a customer "
            "drop out after one, so churn is not assessed (see the lifecycle stage)",
            f"model: {model}",
        )
    else:
        rhythm = f", about one every {_n(t_x / x)} days" if t_x > 0 else ""
        reasons = (
            f"{x + 1} orders over {_n(t_x)} days{rhythm}",
            f"last order {_n(T - t_x)} days ago, first {_n(T)} days ago",
            f"probability still active {1.0 - risk:.0%} under {model}",
        )
    return Reasoned(risk, label, reasons)


# --- Next best offer ---------------------------------------------------------------------------

# A "bought X also bought Y" pattern counts only when at least this many customers bought both.
MIN_SUPPORT = 5


@dataclass(frozen=True)
class CoPurchase:
    """Over the base: customers with a purchase, buyers per category, and buyers per pair
    (together[x][y] == together[y][x])."""

    customers: int = 0
    buyers: Mapping[str, int] = field(default_factory=dict)
    together: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "customers": self.customers,
            "buyers": dict(self.buyers),
            "together": {c: dict(row) for c, row in self.together.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoPurchase:
        return cls(
            customers=int(d.get("customers", 0)),
            buyers={str(c): int(n) for c, n in d.get("buyers", {}).items()},
            together={str(c): {str(o): int(n) for o, n in row.items()}
                      for c, row in d.get("together", {}).items()},
        )


def co_purchase(baskets: Iterable[Mapping[str, int]]) -> CoPurchase:
    """One basket per customer: category -> orders or items in it."""
    customers = 0
    buyers: Counter[str] = Counter()
    together: dict[str, Counter[str]] = {}
    for basket in baskets:
        bought = sorted(c for c, n in basket.items() if n > 0)
        if not bought:
            continue
        customers += 1
        buyers.update(bought)
        for x, y in combinations(bought, 2):
            together.setdefault(x, Counter())[y] += 1
            together.setdefault(y, Counter())[x] += 1
    return CoPurchase(customers, dict(buyers), {c: dict(row) for c, row in together.items()})


def next_best_offer(bought: Mapping[str, int], table: CoPurchase,
                    min_support: int = MIN_SUPPORT) -> Reasoned | None:
    """score(y) = sum over bought x of share(x) * P(y | x), over pairs bought together by at
    least min_support customers; share(x) is x's part of this customer's purchases."""
    buyers, together = table.buyers, table.together
    mine = {c: n for c, n in bought.items() if n > 0}
    candidates = sorted(c for c, n in buyers.items() if n > 0 and c not in mine)
    if not candidates:
        return None
    total = sum(mine.values())
    scored: list[tuple[float, int, str, list[tuple[float, str]]]] = []
    for y in candidates:
        score = 0.0
        evidence: list[tuple[float, str]] = []
        for x, n in mine.items():
            both = together.get(x, {}).get(y, 0)
            if both < min_support or not buyers.get(x):
                continue
            confidence = both / buyers[x]
            score += n / total * confidence
            share = f" ({x} is {n / total:.0%} of their purchases)" if len(mine) > 1 else ""
            evidence.append((n / total * confidence,
                             f"{confidence:.0%} of customers who bought {x} also bought {y} "
                             f"({both:,} of {buyers[x]:,}){share}"))
        if score > 0:
            scored.append((score, buyers[y], y, evidence))
    if scored:
        # Ties: the more popular category, then alphabetical, so the answer is deterministic.
        best, _, offer, evidence = min(scored, key=lambda s: (-s[0], -s[1], s[2]))
        strongest = sorted(evidence, key=lambda e: -e[0])[:3]
        return Reasoned(best, offer, tuple(text for _, text in strongest))
    offer = min(candidates, key=lambda c: (-buyers[c], c))
    popularity = buyers[offer] / table.customers if table.customers else 0.0
    reason = (f"{offer} is bought by {popularity:.0%} of customers "
              f"({buyers[offer]:,} of {table.customers:,}); "
              f"no co-purchase pattern with {min_support}+ customers applies")
    return Reasoned(popularity, offer, (reason,))


# --- Lifecycle ---------------------------------------------------------------------------------

# The current gap over the usual interval beyond which purchase frequency is falling (at risk),
# and beyond which the customer has lapsed (about two purchases missed).
AT_RISK_FACTOR = 1.5
LAPSED_FACTOR = 3.0
# The interval assumed with fewer than two orders: a one-order customer is new for 45 days,
# at risk until 90, lapsed after.
DEFAULT_INTERVAL_DAYS = 30.0
# A floor on the usual interval, so a burst of orders on one day does not lapse in a week.
MIN_INTERVAL_DAYS = 7.0


def _usual_interval(order_count: int, average_interval_days: float | None) -> float:
    if order_count < 2 or average_interval_days is None:
        return DEFAULT_INTERVAL_DAYS
    return max(average_interval_days, MIN_INTERVAL_DAYS)


def purchase_frequency_falling(days_since_last_order: float | None,
                               average_interval_days: float | None) -> bool:
    """The current gap is longer than AT_RISK_FACTOR times the usual interval (floored)."""
    if days_since_last_order is None or average_interval_days is None:
        return False
    usual = max(average_interval_days, MIN_INTERVAL_DAYS)
    return days_since_last_order > AT_RISK_FACTOR * usual


def lifecycle(order_count: int, days_since_last_order: float | None,
              average_interval_days: float | None,
              days_since_first_seen: float | None = None) -> Reasoned:
    """value = the current gap over the usual interval (0 for a prospect)."""
    if order_count <= 0:
        seen = () if days_since_first_seen is None else (
            f"first seen {_n(days_since_first_seen)} days ago",)
        return Reasoned(0.0, "prospect", ("no orders yet", *seen))
    orders = _count(order_count, "order")
    if days_since_last_order is None:
        label = "new" if order_count == 1 else "active"
        return Reasoned(0.0, label, (orders, "date of the last order unknown"))
    usual = _usual_interval(order_count, average_interval_days)
    ratio = days_since_last_order / usual
    if ratio > LAPSED_FACTOR:
        label = "lapsed"
    elif ratio > AT_RISK_FACTOR:
        label = "at_risk"
    else:
        label = "new" if order_count == 1 else "active"
    gap = f"last order {_n(days_since_last_order)} days ago"
    if order_count == 1:
        rhythm = (f"{gap}; a single order counts as new for "
                  f"{_n(AT_RISK_FACTOR * usual)} days and lapsed after "
                  f"{_n(LAPSED_FACTOR * usual)}")
    else:
        rhythm = f"{gap}, usual gap {_n(usual)} days ({ratio:.1f}x)"
        if label != "active":
            rhythm += f": purchase frequency falling beyond {AT_RISK_FACTOR}x"
    return Reasoned(ratio, label, (orders, rhythm))
