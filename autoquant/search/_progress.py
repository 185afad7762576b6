"""The progress bar of a worker: the study's complete trials, front size, best accuracy."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._pareto import pareto_front
from ._record import read_record
from ._spec import StudySpec


def count(study: optuna.Study, *states: TrialState) -> int:
    """Number of the study's trials in any of ``states``."""
    return len(study.get_trials(deepcopy=False, states=states))


class Progress:
    """tqdm bar: trials done, current front size and best accuracy inside the constraint."""

    def __init__(self, study: optuna.Study, spec: StudySpec, budget: int) -> None:
        from tqdm.auto import tqdm

        self.spec = spec
        self.bar = tqdm(
            total=budget,
            initial=count(study, TrialState.COMPLETE),
            desc=f"autoquant {spec.name}",
            unit="trial",
        )
        self(study, None)

    def __call__(self, study: optuna.Study, trial: FrozenTrial | None) -> None:
        # Other workers complete trials too: show the study's count, not this process's.
        self.bar.n = min(count(study, TrialState.COMPLETE), self.bar.total)
        front = pareto_front(study, self.spec.max_accuracy_drop)
        accuracies = [read_record(t).accuracy for t in front]
        best = max((a for a in accuracies if a is not None), default=float("nan"))
        self.bar.set_postfix(
            front=len(front), best_acc=f"{best:.4f}", failed=count(study, TrialState.FAIL)
        )

    def close(self) -> None:
        self.bar.close()
