"""Errors of the training loop."""

from __future__ import annotations

from typing import Any


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite.

    Attributes:
        step: 0-based index of the optimizer step whose loss was not finite (the parameters
            are those left by the previous step; the bad step was not applied).
        value: the loss value (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, step: int, value: float) -> None:
        self.step = step
        self.value = value
        super().__init__(
            f"training loss is {value} at step {step} (0-based); lower the learning rate "
            "or use more bits for the layers that diverge"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their args (the message) by default; search workers may send
        # this across processes, so rebuild from the fields instead.
        return (type(self), (self.step, self.value))
