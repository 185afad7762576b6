"""How a search chooses plans: the study file's ``[strategy]`` table and ``[study] timeout``.

Defaults are the new search: a sensitivity pre-pass (``sensitivity = "kl"``), solver-proposed
plans (``proposals = 8``) and multi-fidelity pruning (``prune = true``). Each part is turned
off on its own: ``sensitivity = "off"`` (no pre-pass, hence no proposals), ``proposals = 0``,
``prune = false``.

Example:
    >>> s = strategy_from_dict("s.toml", {"proposals": 4, "fidelities": [0.0]})
    >>> s.proposals, s.fidelities, s.proposing
    (4, (0.0,), True)
    >>> parse_duration("10m", "study.timeout")
    600.0
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from autoquant.types import PlanError

SENSITIVITY = ("kl", "hessian", "off")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class StrategyError(PlanError):
    """A bad ``[strategy]`` key or timeout; the message names the key and the allowed values.

    ``_spec`` re-raises it as a :class:`StudyFileError` (the file's name in front).
    """


@dataclass(frozen=True)
class StrategySettings:
    """The ``[strategy]`` table of a study file.

    Attributes:
        sensitivity: the pre-pass and its damage metric: ``"kl"`` (held-out KL to the float
            outputs), ``"hessian"`` (adds the Hutchinson estimate and uses it) or ``"off"``.
        held_out: held-out samples the pre-pass scores on.
        proposals: solver plans per refresh (0: none). Proposals need the pre-pass.
        refresh: re-fit the surrogate and propose again after this many newly completed trials.
        proposal_share: at most this share of the trial budget comes from the solver.
        prune: multi-fidelity, constraint-aware pruning.
        fidelities: fractions of the QAT steps at which a trial is scored before its end
            (0.0: right after calibration), each in [0, 1).
        prune_eval: held-out samples of the intermediate scores (final scores use all).
        prune_min_trials: complete trials scored at a fidelity before pruning there.
    """

    sensitivity: str = "kl"
    held_out: int = 1024
    proposals: int = 8
    refresh: int = 4
    proposal_share: float = 0.6
    prune: bool = True
    fidelities: tuple[float, ...] = (0.0, 0.5)
    prune_eval: int = 512
    prune_min_trials: int = 3

    def __post_init__(self) -> None:
        check_strategy(self)

    @property
    def proposing(self) -> bool:
        """Whether the solver proposes plans (it needs the pre-pass's table)."""
        return self.sensitivity != "off" and self.proposals > 0

    @property
    def metric(self) -> str:
        """The sensitivity-table metric the surrogate uses."""
        return "hessian" if self.sensitivity == "hessian" else "eval_kl"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["fidelities"] = list(self.fidelities)
        return out


def _bad(key: str, value: Any, allowed: str) -> StrategyError:
    return StrategyError(f"{key} = {value!r} is not allowed; allowed values: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_strategy(s: StrategySettings) -> None:
    """Raise :class:`StrategyError` naming the first bad field and its allowed values."""
    k = "strategy."
    if s.sensitivity not in SENSITIVITY:
        raise _bad(k + "sensitivity", s.sensitivity, ", ".join(map(repr, SENSITIVITY)))
    for name in ("held_out", "proposals", "refresh", "prune_eval", "prune_min_trials"):
        v, low = getattr(s, name), 0 if name == "proposals" else 1
        if not _is_int(v) or v < low:
            raise _bad(k + name, v, f"an integer >= {low}")
    if not _is_num(s.proposal_share) or not 0.0 <= s.proposal_share <= 1.0:
        raise _bad(k + "proposal_share", s.proposal_share, "a number in [0, 1]")
    if not isinstance(s.prune, bool):
        raise _bad(k + "prune", s.prune, "true or false")
    fid = s.fidelities
    if (
        not isinstance(fid, tuple)
        or not all(_is_num(f) and 0.0 <= f < 1.0 for f in fid)
        or list(fid) != sorted(set(fid))
    ):
        raise _bad(
            k + "fidelities",
            list(fid) if isinstance(fid, tuple) else fid,
            "increasing fractions of the QAT steps in [0, 1), e.g. [0.0, 0.5]",
        )


def strategy_from_dict(path: str, data: Any) -> StrategySettings:
    """Validate a parsed ``[strategy]`` table (``path`` names the file in errors).

    ``sensitivity = "off"`` turns proposals off unless ``proposals`` is given, which is then
    an error (the solver needs the pre-pass's table).
    """
    if not isinstance(data, Mapping):
        raise StrategyError(f"[strategy] = {data!r} is {type(data).__name__}; expected a table")
    known = {f.name for f in fields(StrategySettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise StrategyError(
            f"unknown key(s) {unknown} in [strategy]; allowed keys: {', '.join(sorted(known))}"
        )
    kwargs = dict(data)
    if "fidelities" in kwargs:
        f = kwargs["fidelities"]
        kwargs["fidelities"] = tuple(f) if isinstance(f, list) else f
    if isinstance(kwargs.get("proposal_share"), int) and not isinstance(
        kwargs.get("proposal_share"), bool
    ):
        kwargs["proposal_share"] = float(kwargs["proposal_share"])
    if kwargs.get("sensitivity") == "off":
        if kwargs.get("proposals", 0) not in (0, None):
            raise StrategyError(
                f"strategy.proposals = {kwargs['proposals']!r} needs the sensitivity table; "
                "set strategy.sensitivity to 'kl' or 'hessian', or strategy.proposals = 0"
            )
        kwargs["proposals"] = 0
    return StrategySettings(**kwargs)


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a number of seconds or a string such as ``"90s"``, ``"10m"``, ``"2h"``.

    Raises:
        StrategyError: not a positive duration (the message names ``key``).

    Example:
        >>> parse_duration(90, "study.timeout"), parse_duration("1.5h", "study.timeout")
        (90.0, 5400.0)
    """
    seconds: float | None = None
    if _is_num(value):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds is None or not seconds > 0:
        raise _bad(key, value, 'a number of seconds > 0, or a string such as "90s", "10m", "2h"')
    return seconds


def format_duration(seconds: float) -> str:
    """``"90 s"``, ``"10 min"``, ``"2 h"``: how a time budget is shown.

    Example:
        >>> format_duration(600), format_duration(45.5), format_duration(5400)
        ('10 min', '45.5 s', '1.5 h')
    """
    if seconds >= 3600 and seconds % 360 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 6 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
