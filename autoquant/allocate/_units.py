"""Units and options: what the search decides jointly, and the mapping to plans and parameters.

A *unit* is a tie group or a single searched layer: the prefix of its trial parameters
(``<unit>/<knob>``). Its *weight options* are the product of its ``w_*`` knob choices and its
*activation options* the product of its ``a_*`` knob choices; an *option* is one pair of them,
numbered ``weight_index * n_activation + activation_index``. A *choice* is one option index
per unit, a tuple in unit order.

Plans are built by :func:`autoquant.space.plan_from_trial` itself (replaying the parameter
dict), so a choice gives exactly the plan a trial with the same parameters gives.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from autoquant.space import KNOBS, SearchSpace, baseline_params, plan_from_trial
from autoquant.types import FP32, LayerPlan, PlanError, QuantPlan

WEIGHT_KNOBS = tuple(k for k in KNOBS if k.startswith("w_"))
ACTIVATION_KNOBS = tuple(k for k in KNOBS if k.startswith("a_"))

Choice = tuple[int, ...]


class _Replay:
    """A :class:`~autoquant.space.ChoiceTrial` that answers from a parameter dict (what
    ``optuna.trial.FixedTrial`` does, without importing optuna)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if name not in self.params:
            raise PlanError(f"parameter {name!r} is missing; allowed values: {list(choices)}")
        value = self.params[name]
        if value not in choices:
            raise PlanError(f"parameter {name}={value!r}; allowed values: {list(choices)}")
        return value

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        if name not in self.params:
            raise PlanError(f"parameter {name!r} is missing; allowed values: [{low}, {high}]")
        return float(self.params[name])


@dataclass(frozen=True)
class Unit:
    """One decision of the search: a tie group or a searched layer.

    Attributes:
        name: the parameter prefix (tie group name or layer name).
        layers: its layers, in model order.
        weight_options: each weight option as ``{w_knob: value}`` (all four ``w_*`` knobs).
        activation_options: each activation option as ``{a_knob: value}``.
        searched: the knobs with more than one choice (those are trial parameters).
    """

    name: str
    layers: tuple[str, ...]
    weight_options: tuple[Mapping[str, Any], ...]
    activation_options: tuple[Mapping[str, Any], ...]
    searched: tuple[str, ...]

    @property
    def n_weight(self) -> int:
        return len(self.weight_options)

    @property
    def n_activation(self) -> int:
        return len(self.activation_options)

    @property
    def n_options(self) -> int:
        return self.n_weight * self.n_activation

    def split(self, option: int) -> tuple[int, int]:
        """``(weight_index, activation_index)`` of an option index."""
        if not 0 <= option < self.n_options:
            raise PlanError(
                f"unit {self.name!r}: option={option!r}; allowed values: 0..{self.n_options - 1}"
            )
        return divmod(option, self.n_activation)

    def option(self, weight: int, activation: int) -> int:
        """The option index of a weight and an activation option."""
        return weight * self.n_activation + activation

    def knobs(self, option: int) -> dict[str, Any]:
        """All eight knob values of an option."""
        w, a = self.split(option)
        return {**self.weight_options[w], **self.activation_options[a]}

    def label(self, option: int) -> str:
        """Short text of the searched knob values, e.g. ``w_bits=4 a_calib=mse``."""
        knobs = self.knobs(option)
        return " ".join(f"{k}={knobs[k]}" for k in self.searched) or "fixed"


def _product(choices: Mapping[str, tuple[Any, ...]], knobs: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(
        MappingProxyType(dict(zip(knobs, values, strict=True)))
        for values in itertools.product(*(choices[k] for k in knobs))
    )


class UnitSpace:
    """The units of a :class:`~autoquant.space.SearchSpace` over a model's layers.

    Maps a choice (one option index per unit) to a :class:`~autoquant.types.QuantPlan` (the
    plan :func:`~autoquant.space.plan_from_trial` gives) and to the trial parameters
    ``{"<unit>/<knob>": value}`` that ``optuna.trial.FixedTrial`` replays, and back.

    Args:
        space: the search space.
        layer_names: the model's quantizable layer names, in model order.

    Example:
        >>> space = SearchSpace(w_bits=(4, 8), a_bits=(6, 8))
        >>> units = UnitSpace(space, ["conv", "fc"])
        >>> [u.n_options for u in units.units]
        [4, 4]
        >>> units.params((1, 0))
        {'conv/w_bits': 4, 'conv/a_bits': 8, 'fc/w_bits': 4, 'fc/a_bits': 6}
        >>> units.plan((1, 0)).layers["fc"].short()
        'w4ca6a'
    """

    def __init__(self, space: SearchSpace, layer_names: Sequence[str]) -> None:
        self.space = space
        self.layer_names = tuple(layer_names)
        selected = space.select(self.layer_names)
        members: dict[str, list[str]] = {}
        for layer in selected:
            members.setdefault(space.group_of(layer), []).append(layer)
        units = []
        for name, layers in members.items():
            choices = space.knob_choices(layers[0])  # select() checked that a tie agrees
            units.append(
                Unit(
                    name=name,
                    layers=tuple(layers),
                    weight_options=_product(choices, WEIGHT_KNOBS),
                    activation_options=_product(choices, ACTIVATION_KNOBS),
                    searched=tuple(k for k in KNOBS if len(choices[k]) > 1),
                )
            )
        self.units: tuple[Unit, ...] = tuple(units)
        self._index = {u.name: i for i, u in enumerate(self.units)}
        self._layer_plans: list[list[LayerPlan]] = [[] for _ in self.units]
        for k in range(max(u.n_options for u in self.units)):
            plan = self._plan_of(tuple(min(k, u.n_options - 1) for u in self.units), {})
            for i, u in enumerate(self.units):
                if k < u.n_options:
                    self._layer_plans[i].append(plan.layers[u.layers[0]])
        self._lookup = [{lp: k for k, lp in enumerate(lps)} for lps in self._layer_plans]

    # -- basic facts -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.units)

    def index(self, unit: str) -> int:
        """Position of a unit by name."""
        if unit not in self._index:
            raise PlanError(f"unknown unit {unit!r}; allowed values: {list(self._index)}")
        return self._index[unit]

    @property
    def extra_names(self) -> tuple[str, ...]:
        """Trial parameters that are not unit knobs: ``adds``, ``qat/lr``, ``qat/steps``."""
        out = []
        if len(self.space.adds) > 1:
            out.append("adds")
        if self.space.lr is not None:
            out.append("qat/lr")
        if self.space.qat_steps is not None and len(self.space.qat_steps) > 1:
            out.append("qat/steps")
        return tuple(out)

    @property
    def default_adds(self) -> str:
        """The ``adds`` choice used when none is given: ``int8`` when the space allows it."""
        return "int8" if "int8" in self.space.adds else self.space.adds[0]

    def layer_plan(self, unit: int, option: int) -> LayerPlan:
        """The :class:`~autoquant.types.LayerPlan` every layer of ``unit`` gets at ``option``."""
        self.units[unit].split(option)  # validates
        return self._layer_plans[unit][option]

    def weight_plan(self, unit: int, weight: int) -> LayerPlan:
        """The layer plan of a weight option with float activations."""
        u = self.units[unit]
        return LayerPlan(weight=self.layer_plan(unit, u.option(weight, 0)).weight, activation=FP32)

    def activation_plan(self, unit: int, activation: int) -> LayerPlan:
        """The layer plan of an activation option with float weights."""
        lp = self.layer_plan(unit, self.units[unit].option(0, activation))
        return LayerPlan(weight=FP32, activation=lp.activation)

    def single_plan(self, unit: int, layer_plan: LayerPlan) -> QuantPlan:
        """A plan that quantizes only ``unit``'s layers (the rest float, float adds)."""
        return QuantPlan({layer: layer_plan for layer in self.units[unit].layers})

    def option_classes(self, ignore: Sequence[str] = ()) -> list[list[int]]:
        """Per unit, a class id per option: options whose knobs agree except for ``ignore``
        (e.g. ``("w_calib", "a_calib")``) share a class.

        Example:
            >>> units = UnitSpace(SearchSpace(w_bits=(4, 8), a_calib=("minmax", "mse")), ["fc"])
            >>> units.option_classes(["a_calib"])
            [[0, 0, 1, 1]]
        """
        bad = sorted(set(ignore) - set(KNOBS))
        if bad:
            raise PlanError(f"unknown knob(s) {bad}; allowed values: {list(KNOBS)}")
        out = []
        for u in self.units:
            ids: dict[tuple[Any, ...], int] = {}
            keys = [
                tuple(v for k, v in u.knobs(o).items() if k not in ignore)
                for o in range(u.n_options)
            ]
            out.append([ids.setdefault(key, len(ids)) for key in keys])
        return out

    # -- choice <-> parameters <-> plan -----------------------------------------------

    def check(self, choice: Sequence[int] | Mapping[str, int]) -> Choice:
        """A choice as a validated tuple; a mapping ``{unit name: option}`` must name all."""
        if isinstance(choice, Mapping):
            missing = [u.name for u in self.units if u.name not in choice]
            unknown = sorted(set(choice) - set(self._index))
            if missing or unknown:
                raise PlanError(
                    f"a choice must give one option per unit; missing {missing}, unknown "
                    f"{unknown}; allowed units: {list(self._index)}"
                )
            choice = [choice[u.name] for u in self.units]
        out = tuple(int(k) for k in choice)
        if len(out) != len(self.units):
            raise PlanError(
                f"a choice has {len(out)} options; allowed: one per unit ({len(self.units)})"
            )
        for u, k in zip(self.units, out, strict=True):
            u.split(k)
        return out

    def extra_params(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The non-unit trial parameters: ``extra`` where given, else defaults (``adds``:
        :attr:`default_adds`, ``qat/steps``: the first choice). ``qat/lr`` has no default.

        Raises:
            PlanError: ``extra`` names an unknown parameter, or ``qat/lr`` is searched and
                missing.
        """
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(self.extra_names))
        if unknown:
            raise PlanError(
                f"unknown extra parameter(s) {unknown}; allowed: {list(self.extra_names)}"
            )
        out: dict[str, Any] = {}
        for name in self.extra_names:
            if name in extra:
                out[name] = extra[name]
            elif name == "adds":
                out[name] = self.default_adds
            elif name == "qat/steps":
                out[name] = self.space.qat_steps[0]  # type: ignore[index]
            else:
                raise PlanError(
                    "space.lr is searched: pass extra={'qat/lr': <value>} (the QAT learning "
                    f"rate in [{self.space.lr[0]}, {self.space.lr[1]}])"  # type: ignore[index]
                )
        return out

    def params(
        self, choice: Sequence[int] | Mapping[str, int], extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The trial parameters of a choice (``FixedTrial(params)`` replays it), with the
        non-unit parameters from :meth:`extra_params`."""
        return {**self._unit_params(self.check(choice)), **self.extra_params(extra)}

    def _unit_params(self, choice: Choice) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for u, k in zip(self.units, choice, strict=True):
            knobs = u.knobs(k)
            for knob in u.searched:
                params[f"{u.name}/{knob}"] = knobs[knob]
        return params

    def _plan_of(self, choice: Choice, extra: Mapping[str, Any]) -> QuantPlan:
        params = {**self._unit_params(choice), **extra}
        if "adds" not in params:
            params["adds"] = self.default_adds
        return plan_from_trial(_Replay(params), self.space, self.layer_names)

    def plan(self, choice: Sequence[int] | Mapping[str, int], adds: str | None = None) -> QuantPlan:
        """The plan of a choice, exactly as :func:`~autoquant.space.plan_from_trial` builds it
        from :meth:`params` (``adds``: ``int8``/``fp32``, default :attr:`default_adds`)."""
        adds = adds or self.default_adds
        if adds not in self.space.adds:
            raise PlanError(f"adds={adds!r}; allowed values: {list(self.space.adds)}")
        return self._plan_of(self.check(choice), {"adds": adds})

    def choice_of(self, plan: QuantPlan) -> Choice | None:
        """The choice that gives ``plan``'s layer plans, or None if the space cannot express it
        (a searched layer missing or with a spec outside its options, or a tie broken)."""
        out = []
        for i, u in enumerate(self.units):
            lps = {plan.layers.get(layer) for layer in u.layers}
            if len(lps) != 1:
                return None
            k = self._lookup[i].get(lps.pop())  # type: ignore[arg-type]
            if k is None:
                return None
            out.append(k)
        return tuple(out)

    def choice_of_params(self, params: Mapping[str, Any]) -> Choice:
        """The choice of a trial's parameters (unknown or missing ones raise PlanError)."""
        plan = plan_from_trial(
            _Replay({"adds": self.default_adds, **params}), self.space, self.layer_names
        )
        choice = self.choice_of(plan)
        assert choice is not None  # plan_from_trial only builds plans of the space
        return choice

    def baseline_choice(self, w_bits: int = 8, a_bits: int = 8) -> Choice | None:
        """The choice of the uniform ``w{w_bits}a{a_bits}`` baseline
        (:func:`~autoquant.space.baseline_params`), or None if the space cannot express it."""
        params = baseline_params(self.space, self.layer_names, w_bits, a_bits)
        return None if params is None else self.choice_of_params(params)
