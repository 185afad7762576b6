from __future__ import annotations

import random

import numpy as np
import pytest

from autoquant.allocate import CATEGORIES, LatencyModel, SizeModel, UnitSpace, kernel_category
from autoquant.measure import SATURATION_ENV
from autoquant.space import SearchSpace
from autoquant.tasks import DigitsCNN
from autoquant.transform import float_size_bytes, packed_size_bytes, quantizable_names
from autoquant.types import LayerPlan, QuantPlan, QuantSpec


def _choices(units: UnitSpace, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(u.n_options) for u in units.units) for _ in range(n)]


@pytest.mark.parametrize(
    "space",
    [
        SearchSpace(
            w_bits=(2, 3, 5, 8, "fp16", "fp32"),
            a_bits=(4, 8, "fp32"),
            w_gran=("per_channel", "per_tensor"),
            a_gran=("per_tensor", "per_channel"),
        ),
        SearchSpace(w_bits=(2, 4), tie={"convs": ["features.*"]}, exclude=("classifier.fc2",)),
    ],
)
def test_size_model_sums_to_packed_size_bytes(space: SearchSpace) -> None:
    model = DigitsCNN().eval()  # bias-free convs + BatchNorm: folding adds biases
    units = UnitSpace(space, quantizable_names(model))
    sizes = SizeModel.build(model, units)
    assert sizes.float_bytes == float_size_bytes(model)
    for choice in _choices(units, 30):
        assert sizes.size(choice) == packed_size_bytes(model, units.plan(choice))
    for i, u in enumerate(units.units):
        assert len(sizes.option_bytes(i)) == u.n_options


def test_kernel_categories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SATURATION_ENV, "1")
    w8, w4 = QuantSpec(bits=8), QuantSpec(bits=4)
    a8 = QuantSpec(bits=8, symmetric=False)
    fp32, fp16 = QuantSpec(bits="fp32"), QuantSpec(bits="fp16")
    assert kernel_category(None) == "float"
    assert kernel_category(LayerPlan(fp16, fp32)) == "float"
    assert kernel_category(LayerPlan(w4, a8)) == "int8"
    assert kernel_category(LayerPlan(w8, a8)) == "int8_sat"
    assert kernel_category(LayerPlan(w4, fp32)) == "simulated"
    per_channel_act = QuantSpec(bits=8, granularity="per_channel", axis=1)
    assert kernel_category(LayerPlan(w4, per_channel_act)) == "simulated"
    monkeypatch.setenv(SATURATION_ENV, "0")
    assert kernel_category(LayerPlan(w8, a8)) == "int8"


LAYERS = ["l0", "l1", "l2", "l3"]
MACS = {"l0": 100.0, "l1": 400.0, "l2": 300.0, "l3": 200.0}


@pytest.fixture
def lat_units(monkeypatch: pytest.MonkeyPatch) -> UnitSpace:
    monkeypatch.setenv(SATURATION_ENV, "0")
    # Options: w4 / w8 / fp32 weights × a8 / fp32 inputs: float, int8 and simulated kernels.
    return UnitSpace(SearchSpace(w_bits=(4, 8, "fp32"), a_bits=(8, "fp32")), LAYERS)


def _truth(units: UnitSpace, b: float, rates: dict[str, float], delta: dict, noise: float = 0.0):
    share = np.array([MACS[n] for n in LAYERS]) / sum(MACS.values())
    rng = np.random.default_rng(0)

    def latency(plan: QuantPlan | None) -> float:
        total = b
        for j, n in enumerate(LAYERS):
            c = kernel_category(None if plan is None else plan.layers.get(n))
            total += share[j] * rates[c] + delta.get((n, c), 0.0)
        return total * (1 + noise * rng.standard_normal())

    return latency


def _uniform(units: UnitSpace, w, a) -> QuantPlan:
    return QuantPlan.uniform(LAYERS, QuantSpec(bits=w), QuantSpec(bits=a, symmetric=False))


def test_latency_from_baselines_interpolates_by_mac_share(lat_units: UnitSpace) -> None:
    rates = {"float": 2.0, "int8": 0.8, "int8_sat": 1.5, "simulated": 2.6}
    truth = _truth(lat_units, 0.0, rates, {})
    plans = [None, _uniform(lat_units, 8, 8), _uniform(lat_units, 4, "fp32")]
    model = LatencyModel(lat_units, MACS).fit([(p, truth(p)) for p in plans])
    for choice in _choices(lat_units, 20, seed=1):  # mixed plans never measured
        plan = lat_units.plan(choice)
        assert model.predict(plan) == pytest.approx(truth(plan), rel=0.02)
        # the per-option form the solver uses is the same prediction
        parts = model.constant_ms + sum(model.option_ms(i)[k] for i, k in enumerate(choice))
        assert parts == pytest.approx(model.predict(choice))
        assert model.predict(choice) == pytest.approx(model.predict(plan))


def test_one_measurement_gives_a_mac_proportional_model(lat_units: UnitSpace) -> None:
    model = LatencyModel(lat_units, MACS).fit([(None, 4.0)])
    for choice in _choices(lat_units, 5):
        assert model.predict(choice) == pytest.approx(4.0, rel=1e-3)
    rates = model.rates()
    assert set(rates) == set(CATEGORIES)
    assert all(r == pytest.approx(4.0, rel=1e-3) for r in rates.values())


def test_many_trials_fit_fixed_costs_and_layer_corrections(lat_units: UnitSpace) -> None:
    rates = {"float": 2.0, "int8": 0.6, "int8_sat": 1.0, "simulated": 2.4}
    delta = {("l1", "int8"): 0.3, ("l3", "simulated"): -0.2, ("l0", "float"): 0.15}
    truth = _truth(lat_units, 0.5, rates, delta, noise=0.01)
    train = [lat_units.plan(c) for c in _choices(lat_units, 80, seed=2)]
    test = [lat_units.plan(c) for c in _choices(lat_units, 30, seed=3)]
    model = LatencyModel(lat_units, MACS).fit([(p, truth(p)) for p in train])
    y = np.array([truth(p) for p in test])
    pred = np.array([model.predict(p) for p in test])
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert r2 > 0.95
    prior_only = LatencyModel(lat_units, MACS).fit([(p, truth(p)) for p in train[:3]])
    pred0 = np.array([prior_only.predict(p) for p in test])
    assert ((y - pred) ** 2).mean() < ((y - pred0) ** 2).mean()  # more trials, better model


def test_latency_model_errors(lat_units: UnitSpace) -> None:
    model = LatencyModel(lat_units, MACS)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(None)
    with pytest.raises(ValueError, match="at least one measurement"):
        model.fit([])
    with pytest.raises(ValueError, match="finite and > 0"):
        model.fit([(None, 0.0)])
    with pytest.raises(ValueError, match="ridge_layer=0"):
        LatencyModel(lat_units, MACS, ridge_layer=0)
    with pytest.raises(Exception, match="layer_macs lacks \\['l3'\\]"):
        LatencyModel(lat_units, {k: v for k, v in MACS.items() if k != "l3"})
