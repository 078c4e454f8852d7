"""cdp_profile.scores: RFM cells, BG/NBD churn risk, next best offer, lifecycle stage."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_profile.scores import (
    CHURN_HIGH,
    CHURN_MEDIUM,
    DEFAULT_BGNBD,
    MIN_SUPPORT,
    RFM_CELLS,
    BgNbdParams,
    CoPurchase,
    RfmBoundaries,
    churn_risk,
    co_purchase,
    fit_bgnbd,
    lifecycle,
    next_best_offer,
    p_alive,
    purchase_frequency_falling,
    rfm,
    rfm_boundaries,
)

# --- RFM ---------------------------------------------------------------------------------------

# 100 customers: the i-th ordered i days ago, i // 10 + 1 times, for 10 * i.
BASE = [(float(i), i // 10 + 1, 10.0 * i) for i in range(1, 101)]


def test_a_recent_frequent_big_spender_is_a_champion() -> None:
    score = rfm(2.0, 12, 2_000.0, rfm_boundaries(BASE))
    assert (score.r, score.f, score.m, score.cell) == (5, 5, 5, "champions")


def test_a_long_gone_small_spender_is_lost() -> None:
    score = rfm(400.0, 1, 5.0, rfm_boundaries(BASE))
    assert (score.r, score.f, score.m, score.cell) == (1, 1, 1, "lost")


def test_a_long_gone_big_spender_is_one_we_cannot_lose() -> None:
    assert rfm(400.0, 12, 2_000.0, rfm_boundaries(BASE)).cell == "cant_lose_them"


def test_a_recent_first_small_order_is_a_new_customer() -> None:
    assert rfm(1.0, 1, 5.0, rfm_boundaries(BASE)).cell == "new_customers"


def test_quintiles_split_a_base_of_distinct_values_into_fifths() -> None:
    boundaries = rfm_boundaries(BASE)
    monetary = [rfm(50.0, 5, m, boundaries).m for _, _, m in BASE]
    assert [monetary.count(s) for s in range(1, 6)] == [20] * 5


def test_the_map_has_the_eleven_named_cells() -> None:
    assert sorted(RFM_CELLS) == sorted([
        "champions", "loyal_customers", "potential_loyalists", "new_customers", "promising",
        "need_attention", "about_to_sleep", "at_risk", "cant_lose_them", "hibernating", "lost"])


def test_tied_customers_share_one_score_in_the_middle_of_their_range() -> None:
    # 60% one order, 20% two, 20% three: the one-order customers span quintiles 1-3.
    base = [(10.0, 1, 10.0)] * 60 + [(10.0, 2, 10.0)] * 20 + [(10.0, 3, 10.0)] * 20
    boundaries = rfm_boundaries(base)
    assert [rfm(10.0, n, 10.0, boundaries).f for n in (1, 2, 3)] == [2, 4, 5]


@pytest.mark.parametrize("base", [[], [(10.0, 2, 50.0)], [(10.0, 2, 50.0)] * 7])
def test_a_tiny_or_uniform_base_scores_the_middle(base: list[tuple[float, int, float]]) -> None:
    score = rfm(10.0, 2, 50.0, rfm_boundaries(base))
    assert (score.r, score.f, score.m, score.cell) == (3, 3, 3, "need_attention")


def test_rfm_reasons_carry_the_figures() -> None:
    score = rfm(35.0, 3, 120.5, rfm_boundaries(BASE))
    text = " | ".join(score.reasons)
    assert "35 days ago" in text and "3 orders" in text and "120.50" in text
    assert score.cell in text and "100 customers" in text


def test_rfm_boundaries_survive_json() -> None:
    boundaries = rfm_boundaries(BASE[:3])
    assert RfmBoundaries.from_dict(json.loads(json.dumps(boundaries.to_dict()))) == boundaries


customer = st.tuples(
    st.floats(0, 10_000, allow_nan=False),
    st.integers(1, 500),
    st.floats(-1_000, 1e9, allow_nan=False),
)


@given(st.lists(customer, max_size=60), customer)
def test_scores_stay_within_1_to_5_and_do_not_depend_on_base_order(
        base: list[tuple[float, int, float]], who: tuple[float, int, float]) -> None:
    boundaries = rfm_boundaries(base)
    assert rfm_boundaries(random.Random(0).sample(base, len(base))) == boundaries
    score = rfm(*who, boundaries)
    assert {score.r, score.f, score.m} <= {1, 2, 3, 4, 5}
    assert score.cell in RFM_CELLS


@given(st.lists(customer, min_size=1, max_size=60), customer, customer)
def test_a_better_customer_never_scores_lower(
        base: list[tuple[float, int, float]], one: tuple[float, int, float],
        other: tuple[float, int, float]) -> None:
    boundaries = rfm_boundaries(base)
    a, b = rfm(*one, boundaries), rfm(*other, boundaries)
    assert (one[0] <= other[0]) <= (a.r >= b.r)
    assert (one[1] >= other[1]) <= (a.f >= b.f)
    assert (one[2] >= other[2]) <= (a.m >= b.m)


# --- Churn: BG/NBD -----------------------------------------------------------------------------

TRUE = BgNbdParams(r=0.5, alpha=20.0, a=0.8, b=2.5)


def simulate(params: BgNbdParams, customers: int, seed: int) -> list[tuple[int, float, float, bool]]:
    """(x, t_x, T, alive) drawn from the BG/NBD story: Poisson purchases at a gamma-distributed
    rate, and after each repeat purchase a beta-distributed chance of leaving for good."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(params.r, 1 / params.alpha, customers)
    dropouts = rng.beta(params.a, params.b, customers)
    horizons = rng.uniform(180, 720, customers)
    rows = []
    for rate, dropout, T in zip(rates, dropouts, horizons, strict=True):
        t, x, t_x, alive = 0.0, 0, 0.0, True
        while alive:
            t += rng.exponential(1 / rate)
            if t > T:
                break
            x, t_x = x + 1, t
            alive = rng.random() >= dropout
        rows.append((x, t_x, float(T), alive))
    return rows


def test_the_fit_recovers_the_parameters_of_a_simulated_base() -> None:
    rows = simulate(TRUE, 4_000, seed=7)
    fitted = fit_bgnbd([(x, t_x, T) for x, t_x, T, _ in rows])
    assert fitted.fitted_on == 4_000
    for name in ("r", "alpha", "a", "b"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.2), name


def test_p_alive_matches_who_is_still_alive_in_a_simulated_base() -> None:
    rows = simulate(TRUE, 4_000, seed=11)
    predicted = np.array([p_alive(TRUE, x, t_x, T) for x, t_x, T, _ in rows])
    alive = np.array([a for *_, a in rows])
    assert predicted.mean() == pytest.approx(alive.mean(), abs=0.02)
    # Calibrated where it matters: those called likely gone mostly are.
    gone = predicted < 0.3
    assert gone.sum() > 100 and alive[gone].mean() < 0.3


def test_a_small_base_or_one_without_repeat_buyers_gets_the_documented_prior() -> None:
    assert fit_bgnbd([(1, 10.0, 50.0)] * 19) == DEFAULT_BGNBD
    assert fit_bgnbd([(0, 0.0, 50.0)] * 500) == DEFAULT_BGNBD
    assert fit_bgnbd([]) == DEFAULT_BGNBD


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.floats(0, 1_000), st.floats(0, 1_000)),
                min_size=20, max_size=80))
def test_the_fit_gives_usable_parameters_on_any_base(rows: list[tuple[int, float, float]]) -> None:
    fitted = fit_bgnbd(rows)
    values = [fitted.r, fitted.alpha, fitted.a, fitted.b]
    assert all(np.isfinite(values)) and min(values) > 0
    assert 0 <= p_alive(fitted, 3, 100.0, 500.0) <= 1


def test_a_customer_without_a_repeat_purchase_is_alive_in_bgnbd() -> None:
    assert p_alive(DEFAULT_BGNBD, 0, 0.0, 900.0) == 1.0
    risk = churn_risk(DEFAULT_BGNBD, 0, 0.0, 900.0)
    assert risk.value == 0.0 and "no repeat purchase" in risk.reasons[0]


def test_p_alive_falls_as_the_silence_since_the_last_order_grows() -> None:
    values = [p_alive(TRUE, 4, 100.0, T) for T in (100.0, 150.0, 300.0, 600.0)]
    assert values[0] == pytest.approx(1 / (1 + 0.8 / 5.5))
    assert values == sorted(values, reverse=True) and values[-1] < 0.05


def test_p_alive_rises_with_a_later_last_order() -> None:
    values = [p_alive(TRUE, 4, t_x, 300.0) for t_x in (50.0, 150.0, 290.0)]
    assert values == sorted(values)


def test_p_alive_stays_finite_for_extreme_histories() -> None:
    assert p_alive(TRUE, 10_000, 1.0, 1e6) == pytest.approx(0.0, abs=1e-12)
    assert p_alive(TRUE, 10_000, 1e6, 1e6) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(("T", "label"), [(110.0, "low"), (175.0, "medium"), (400.0, "high")])
def test_churn_labels_follow_the_thresholds(T: float, label: str) -> None:
    risk = churn_risk(TRUE, 4, 100.0, T)
    assert risk.label == label
    assert risk.value == pytest.approx(1 - p_alive(TRUE, 4, 100.0, T))
    assert (risk.value >= CHURN_HIGH) == (label == "high")
    assert (CHURN_MEDIUM <= risk.value < CHURN_HIGH) == (label == "medium")


def test_churn_reasons_carry_the_figures() -> None:
    risk = churn_risk(BgNbdParams(0.5, 20.0, 0.8, 2.5, fitted_on=1234), 4, 100.0, 400.0)
    text = " | ".join(risk.reasons)
    assert "5 orders over 100 days" in text and "one every 25 days" in text
    assert "last order 300 days ago" in text and "1,234 customers" in text
    assert f"{1 - risk.value:.0%}" in text


def test_bgnbd_parameters_survive_json() -> None:
    params = BgNbdParams(0.3, 25.0, 0.7, 3.1, fitted_on=10)
    assert BgNbdParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params


# --- Next best offer ---------------------------------------------------------------------------


def shop() -> CoPurchase:
    # 50 shoe buyers, 40 of them also bought socks; hats are popular but not with shoe buyers.
    return co_purchase(
        [{"shoes": 1, "socks": 2}] * 40 + [{"shoes": 1}] * 5 + [{"shoes": 1, "hats": 1}] * 5
        + [{"hats": 1}] * 60 + [{"hats": 1, "scarves": 1}] * 10 + [{}] * 3)


def test_a_shoe_buyer_is_offered_socks_when_most_shoe_buyers_buy_socks() -> None:
    offer = next_best_offer({"shoes": 2}, shop())
    assert offer is not None and offer.label == "socks"
    assert offer.value == pytest.approx(0.8)
    assert offer.reasons == ("80% of customers who bought shoes also bought socks (40 of 50)",)


def test_what_was_already_bought_is_never_offered() -> None:
    offer = next_best_offer({"shoes": 1, "socks": 1}, shop())
    assert offer is not None and offer.label not in {"shoes", "socks"}
    assert next_best_offer({"shoes": 1, "socks": 1, "hats": 1, "scarves": 1}, shop()) is None


def test_the_customers_own_mix_weighs_the_patterns() -> None:
    table = shop()
    mostly_hats = next_best_offer({"hats": 9, "shoes": 1}, table)
    mostly_shoes = next_best_offer({"hats": 1, "shoes": 9}, table)
    assert mostly_hats is not None and mostly_hats.label == "scarves"
    assert mostly_shoes is not None and mostly_shoes.label == "socks"
    assert "90% of their purchases" in mostly_shoes.reasons[0]


def test_a_pattern_below_the_support_threshold_is_ignored() -> None:
    table = co_purchase([{"kites": 1, "string": 1}] * (MIN_SUPPORT - 1) + [{"hats": 1}] * 10)
    offer = next_best_offer({"kites": 1}, table)
    assert offer is not None and offer.label == "hats"
    assert "bought by 71% of customers (10 of 14)" in offer.reasons[0]


def test_a_customer_without_orders_is_offered_the_most_popular_category() -> None:
    offer = next_best_offer({}, shop())
    assert offer is not None and (offer.label, offer.value) == ("hats", 75 / 120)


def test_no_offer_from_an_empty_base() -> None:
    assert next_best_offer({"shoes": 1}, co_purchase([])) is None


def test_co_purchase_survives_json() -> None:
    table = shop()
    assert CoPurchase.from_dict(json.loads(json.dumps(table.to_dict()))) == table


# --- Lifecycle ---------------------------------------------------------------------------------


def test_a_profile_without_orders_is_a_prospect() -> None:
    stage = lifecycle(0, None, None, days_since_first_seen=12.0)
    assert stage.label == "prospect" and "first seen 12 days ago" in stage.reasons


@pytest.mark.parametrize(("days", "label"), [
    (0.0, "new"), (45.0, "new"), (45.5, "at_risk"), (90.0, "at_risk"), (90.5, "lapsed")])
def test_a_one_order_customer_is_new_then_at_risk_then_lapsed(days: float, label: str) -> None:
    assert lifecycle(1, days, None).label == label


@pytest.mark.parametrize(("days", "label"), [
    (5.0, "active"), (30.0, "active"), (30.5, "at_risk"), (60.0, "at_risk"), (60.5, "lapsed")])
def test_a_repeat_customer_is_judged_against_their_own_rhythm(days: float, label: str) -> None:
    stage = lifecycle(6, days, 20.0)
    assert stage.label == label
    assert stage.value == pytest.approx(days / 20.0)
    assert purchase_frequency_falling(days, 20.0) == (label != "active")


def test_a_burst_of_orders_on_one_day_does_not_lapse_within_a_week() -> None:
    assert lifecycle(3, 10.0, 0.0).label == "active"
    assert not purchase_frequency_falling(10.0, 0.0)


def test_falling_frequency_needs_a_known_rhythm() -> None:
    assert not purchase_frequency_falling(None, 20.0)
    assert not purchase_frequency_falling(500.0, None)


def test_lifecycle_reasons_carry_the_figures() -> None:
    stage = lifecycle(6, 120.0, 30.0)
    assert stage.label == "lapsed"
    assert stage.reasons == ("6 orders",
                             "last order 120 days ago, usual gap 30 days (4.0x): "
                             "purchase frequency falling beyond 1.5x")
