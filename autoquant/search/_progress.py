"""The progress bar of a worker: the study's judged trials, front size, best accuracy."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._budget import judged
from ._pareto import pareto_front
from ._record import read_record
from ._spec import StudySpec


def count(study: optuna.Study, *states: TrialState) -> int:
    """Number of the study's trials in any of ``states``."""
    return len(study.get_trials(deepcopy=False, states=states))


def judged_count(study: optuna.Study) -> int:
    """Number of the study's judged trials (complete, or stopped by the pruning rule)."""
    return sum(judged(t) for t in study.get_trials(deepcopy=False))


class Progress:
    """tqdm bar: trials judged (of the budget, if any), current front size, best accuracy
    inside the constraint, and the trials pruned early and failed."""

    def __init__(self, study: optuna.Study, spec: StudySpec, budget: int | None) -> None:
        from tqdm.auto import tqdm

        self.spec = spec
        self.bar = tqdm(
            total=budget,
            initial=judged_count(study),
            desc=f"autoquant {spec.name}",
            unit="trial",
        )
        self(study, None)

    def __call__(self, study: optuna.Study, trial: FrozenTrial | None) -> None:
        # Other workers complete trials too: show the study's count, not this process's.
        n = judged_count(study)
        self.bar.n = n if self.bar.total is None else min(n, self.bar.total)
        front = pareto_front(study, self.spec.max_accuracy_drop)
        accuracies = [read_record(t).accuracy for t in front]
        best = max((a for a in accuracies if a is not None), default=float("nan"))
        pruned = n - count(study, TrialState.COMPLETE)
        self.bar.set_postfix(
            front=len(front),
            best_acc=f"{best:.4f}",
            pruned=pruned,
            failed=count(study, TrialState.FAIL),
        )

    def close(self) -> None:
        self.bar.close()
