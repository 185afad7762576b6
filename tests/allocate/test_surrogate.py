from __future__ import annotations

import math
import random

import numpy as np
import pytest

from autoquant.allocate import (
    SensitivityTable,
    Surrogate,
    UnitDamage,
    UnitSpace,
    kendall,
    prior_scale,
    spearman,
)
from autoquant.space import SearchSpace
from autoquant.types import PlanError

LAYERS = ["a", "b", "c"]
SPACE = SearchSpace(w_bits=(2, 4, 8), a_bits=(4, 8), adds=("int8", "fp32"))


def _table(units: UnitSpace, seed: int = 0, acc_ratio: float = 0.3) -> SensitivityTable:
    """Random damages; eval_acc = acc_ratio × eval_kl (resolvable), plus two wild outliers."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in units.units:
        w = rng.uniform(0.001, 0.05, u.n_weight)
        a = rng.uniform(0.001, 0.05, u.n_activation)
        rows.append(
            UnitDamage(
                u.name,
                u.layers,
                u.weight_options,
                u.activation_options,
                weight={"eval_kl": w, "eval_acc": acc_ratio * w, "hessian": 2 * w},
                activation={"eval_kl": a, "eval_acc": acc_ratio * a, "hessian": 2 * a},
            )
        )
    # outliers a least-squares slope would follow: huge damage, small drop
    rows[0] = UnitDamage(
        rows[0].name, rows[0].layers, rows[0].weight_options, rows[0].activation_options,
        weight={**rows[0].weight, "eval_kl": (5.0, *rows[0].weight["eval_kl"][1:])},
        activation={**rows[0].activation, "eval_kl": (4.0, *rows[0].activation["eval_kl"][1:])},
    )  # fmt: skip
    return SensitivityTable(
        tuple(rows),
        reference={"eval": {"loss": 0.1, "accuracy": 0.98, "samples": 1000.0}},
        adds={"int8": {"eval_kl": 0.01, "eval_acc": 0.003, "hessian": 0.02}},
    )


def _choices(units: UnitSpace, n: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(u.n_options) for u in units.units) for _ in range(n)]


@pytest.fixture
def units() -> UnitSpace:
    return UnitSpace(SPACE, LAYERS)


def test_prior_scale_is_the_robust_ratio(units: UnitSpace) -> None:
    table = _table(units)
    assert prior_scale(table, "eval_kl") == pytest.approx(0.3)  # outliers ignored
    assert prior_scale(table, "eval_acc") == 1.0
    assert prior_scale(table, "hessian") == pytest.approx(0.15)
    no_acc = table.merge(table)  # same metrics: still calibrated
    assert prior_scale(no_acc, "eval_kl") == pytest.approx(0.3)


def test_prediction_is_the_scaled_sum_of_unit_damages(units: UnitSpace) -> None:
    table = _table(units)
    s = Surrogate(table, units, "eval_kl")
    for choice in _choices(units, 10, 0):
        total = 0.0
        for row, u, k in zip(table.units, units.units, choice, strict=True):
            w, a = u.split(k)
            total += row.weight["eval_kl"][w] + row.activation["eval_kl"][a]
        total += 0.01  # the default adds are int8
        assert s.predict(choice).drop == pytest.approx(0.3 * total)
        plan = units.plan(choice, adds="fp32")
        assert s.predict(plan).drop == pytest.approx(0.3 * (total - 0.01))
        by_option = s.constant() + sum(s.option_drop(i)[k] for i, k in enumerate(choice))
        assert by_option == pytest.approx(s.predict(choice).drop)


def test_fit_recovers_scales_from_trials(units: UnitSpace) -> None:
    table = _table(units)
    prior = Surrogate(table, units, "eval_kl", noise=1e-4, rel_noise=0.0)
    rng = np.random.default_rng(1)

    def truth(c: tuple[int, ...]) -> float:  # QAT recovers 80 % of the weight damage
        dw, da = prior.damages(c)
        return 0.06 * dw + 0.3 * da + 0.001 + rng.normal(0, 1e-4)

    obs = [(c, truth(c)) for c in _choices(units, 40, 2)]
    fitted = prior.fit(obs)
    assert (fitted.scale_w, fitted.scale_a, fitted.bias) == pytest.approx(
        (0.06, 0.3, 0.001), rel=0.1
    )
    test = _choices(units, 20, 3)
    err_prior = np.mean([(prior.predict(c).drop - truth(c)) ** 2 for c in test])
    err_fit = np.mean([(fitted.predict(c).drop - truth(c)) ** 2 for c in test])
    assert err_fit < err_prior / 10
    assert fitted.predict(test[0]).std < prior.predict(test[0]).std


def test_few_trials_stay_well_posed_and_an_unexercised_source_keeps_its_prior(
    units: UnitSpace,
) -> None:
    table = _table(units)
    s = Surrogate(table, units, "eval_kl")
    a8 = [
        next(k for k, o in enumerate(u.activation_options) if o["a_bits"] == 8) for u in units.units
    ]
    # two trials, all at 8-bit inputs: tiny activation damage, so s_a is barely observable
    obs = []
    for w in (0, 1):
        c = tuple(u.option(w, a) for u, a in zip(units.units, a8, strict=True))
        obs.append((c, 0.5 * s.predict(c).drop))  # QAT halves the drop
    fitted = s.fit(obs)
    assert all(math.isfinite(v) and v >= 0 for v in (fitted.scale_w, fitted.scale_a))
    assert fitted.scale_w < s.scale_w  # it learned the recovery
    assert fitted.scale_a == pytest.approx(s.scale_a, rel=0.5)
    assert s.fit([]).scale_w == s.scale_w
    # measured improvements never make a scale negative
    negative = s.fit([(c, -0.01) for c, _ in obs])
    assert negative.scale_w >= 0 and negative.scale_a >= 0


def test_probability_within_the_limit(units: UnitSpace) -> None:
    s = Surrogate(_table(units), units, "eval_kl")
    c = _choices(units, 1, 7)[0]
    p = s.predict(c)
    assert s.prob_within(c, p.drop) == pytest.approx(0.5)
    assert s.prob_within(c, p.drop + p.std) == pytest.approx(0.8413, abs=1e-4)  # Φ(1)
    assert s.prob_within(c, p.drop - 3 * p.std) < 0.002


def test_fit_rejects_bad_observations(units: UnitSpace) -> None:
    s = Surrogate(_table(units), units)
    with pytest.raises(ValueError, match="finite"):
        s.fit([((0, 0, 0), float("nan"))])
    other = UnitSpace(SearchSpace(w_bits=(3, 8)), LAYERS)
    with pytest.raises(PlanError, match="outside the search space"):
        s.predict(other.plan((0, 0, 0)))
    with pytest.raises(PlanError, match="does not match"):
        Surrogate(_table(units), other)
    with pytest.raises(PlanError, match="metric 'eval_loss' is not in the table"):
        Surrogate(_table(units), units, "eval_loss")


def test_rank_correlations_closed_form() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6·2/(3·8)
    assert kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # (2 - 1) / 3 pairs
    assert kendall([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall([1], [2]))
    with pytest.raises(ValueError, match="equal-length"):
        spearman([1, 2], [1, 2, 3])


def test_a_collapsed_trial_does_not_set_the_scale_near_the_limit(units: UnitSpace) -> None:
    table = _table(units)
    s = Surrogate(table, units, "eval_kl")
    # plans away from the table's outlier options (unit 0's first weight and input option)
    plans = [c for c in _choices(units, 60, 4) if min(units.units[0].split(c[0])) > 0]
    fit_on, check_on = plans[:6], plans[6:16]

    def truth(c: tuple[int, ...]) -> float:  # QAT recovers 60 % of every predicted drop
        return 0.4 * s.predict(c).drop

    collapsed = (fit_on[0], 0.9)  # ... except one plan that stays at a 90-point drop
    obs = [(c, truth(c)) for c in fit_on[1:]] + [collapsed]

    def error(model: Surrogate) -> float:
        return float(np.sqrt(np.mean([(model.predict(c).drop - truth(c)) ** 2 for c in check_on])))

    weighted = s.fit(obs)
    constant = Surrogate(table, units, "eval_kl", rel_noise=0.0).fit(obs)
    assert error(weighted) < error(constant) / 3
    assert weighted.scale_w == pytest.approx(0.4 * s.scale_w, rel=0.3)
