"""Samplers by name (``[study] sampler``), each reseeded per trial.

:data:`SAMPLERS` maps a name to a factory ``seed -> optuna sampler``; study files are
validated against its keys, so a sampler added to it is accepted by study files at once.

Example:
    >>> sorted(SAMPLERS)
    ['gp', 'nsga2', 'random', 'tpe']
    >>> type(SAMPLERS["random"](0)).__name__
    'RandomSampler'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial

from ._optuna_compat import reseed_sampler

if TYPE_CHECKING:
    from ._spec import StudySpec

SamplerFactory = Callable[[int], optuna.samplers.BaseSampler]

# The accuracy-drop constraint reaches every sampler through ``Trial.set_constraint``.
SAMPLERS: dict[str, SamplerFactory] = {
    # multivariate TPE; the constant liar keeps parallel workers off each other's plans
    "tpe": lambda seed: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, constant_liar=True
    ),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """The study file's sampler (TPE by default), seeded per trial.

    Example:
        >>> make_sampler(StudySpec(name="s", task="digits-cnn"), 0)  # doctest: +SKIP
    """
    if spec.sampler not in SAMPLERS:
        raise ValueError(
            f"sampler={spec.sampler!r} is not allowed; allowed values: "
            f"{', '.join(repr(s) for s in SAMPLERS)}"
        )
    sampler = SAMPLERS[spec.sampler](seed)
    seed_per_trial(sampler, seed)
    return sampler


def seed_per_trial(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Reseed ``sampler`` from (seed, trial number) before each trial.

    Parallel workers share the study's seed; seeded once, they would propose the same plans.
    Trial numbers are unique across workers, and a single worker stays reproducible.
    """
    before_trial = sampler.before_trial

    def reseeding_before_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        reseed_sampler(sampler, (seed * 1_000_003 + trial.number) % 2**32)
        before_trial(study, trial)

    sampler.before_trial = reseeding_before_trial  # type: ignore[method-assign]
