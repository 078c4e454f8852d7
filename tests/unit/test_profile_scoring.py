"""cdp_profile.scoring: a profile's scores against models fitted on the base, with reasons."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cdp_profile.core import Observed, ProfileState, Scores, fold
from cdp_profile.scoring import Inputs, Models, build_models, inputs_of, score

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def customer(orders: int, last_days_ago: float, spent: float, every_days: float = 10.0,
             categories: dict[str, int] | None = None) -> Inputs:
    last = NOW - timedelta(days=last_days_ago)
    first = last - timedelta(days=every_days * (orders - 1))
    return Inputs(orders, spent, first, last, first, categories or {})


BASE = [customer(1 + i % 6, 3 + 7 * i, 20.0 * (1 + i % 9), categories={"shoes": 1, "socks": i % 2})
        for i in range(40)]


def test_models_are_fitted_on_customers_only() -> None:
    prospect = Inputs(0, 0.0, None, None, NOW - timedelta(days=3), {})
    models = build_models([*BASE, prospect], NOW)
    assert models.rfm.customers == 40
    assert models.churn.fitted_on == 40
    assert models.offers.customers == 40
    assert models.computed_at == NOW


def test_models_survive_being_stored() -> None:
    models = build_models(BASE, NOW)
    assert Models.from_rows(models.to_rows(), NOW) == models
    assert Models.from_rows({}, None) == Models()


def test_a_prospect_gets_a_lifecycle_stage_but_no_rfm_or_churn() -> None:
    scores = score(Inputs(0, 0.0, None, None, NOW - timedelta(days=2), {}), build_models(BASE, NOW), NOW)
    assert scores.lifecycle.label == "prospect"
    assert scores.rfm is None and scores.churn is None
    assert scores.frequency_falling is False
    assert scores.offer is not None and scores.offer.label == "shoes"


def test_a_recent_frequent_big_spender_is_a_champion_with_reasons() -> None:
    models = build_models(BASE, NOW)
    scores = score(customer(6, 1, 400.0, every_days=5, categories={"shoes": 3}), models, NOW)
    assert scores.rfm is not None and scores.rfm.cell == "champions"
    assert (scores.rfm.recency, scores.rfm.frequency, scores.rfm.monetary) == (5, 5, 5)
    assert any("last order 1 days ago" in r for r in scores.rfm.reasons)
    assert scores.churn is not None and scores.churn.reasons
    lapsed = score(customer(6, 200, 400.0, every_days=5), models, NOW)
    assert lapsed.churn is not None and lapsed.churn.value > scores.churn.value
    assert scores.lifecycle.label == "active"


def test_a_long_silence_after_a_regular_rhythm_is_a_falling_frequency() -> None:
    scores = score(customer(5, 200, 100.0, every_days=10), build_models(BASE, NOW), NOW)
    assert scores.frequency_falling is True
    assert scores.lifecycle.label == "lapsed"
    assert scores.churn is not None and scores.churn.label == "high"


def test_inputs_of_a_state_are_net_of_refunds() -> None:
    state = fold(ProfileState("p"), [
        Observed(at=NOW, name="Order Completed", properties={"revenue": 80.0, "products": [{"category": "hats"}]}),
        Observed(at=NOW, name="Order Refunded", properties={"total": 30.0}),
    ])
    inputs = inputs_of(state)
    assert (inputs.order_count, inputs.monetary, inputs.categories) == (1, 50.0, {"hats": 1})


def test_scores_survive_being_stored_and_their_key_ignores_drifting_values() -> None:
    models = build_models(BASE, NOW)
    scores = score(customer(3, 20, 60.0, categories={"socks": 1}), models, NOW)
    assert Scores.from_dict(scores.to_dict()) == scores
    later = score(customer(3, 20.01, 60.0, categories={"socks": 1}), models, NOW)
    assert later.key() == scores.key()
    assert Scores.from_dict({}) is None
