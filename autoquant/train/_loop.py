"""A plain QAT fine-tuning loop and top-k evaluation.

Fake-quant modules with learnable scales are ordinary parameters here: the loop optimises
every ``requires_grad`` parameter of the model and knows nothing about quantization.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from autoquant.transform import Inputs, call_model, inputs_to

Batch = tuple[Inputs, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
METRICS = ("top1", "top5")


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


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}"
        )


def _split_batch(batch: Any) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"each batch must be a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def _stream(batches: Iterable[Any], steps: int) -> Iterator[Batch]:
    """Yield ``steps`` batches: cycle a re-iterable collection, drain a one-shot iterator."""
    one_shot = isinstance(batches, Iterator)
    served = 0
    while True:
        served_this_pass = 0
        for batch in batches:
            served += 1
            served_this_pass += 1
            yield _split_batch(batch)
        if served_this_pass == 0 or one_shot:
            raise ValueError(
                f"batches ran out after {served} batch(es) but steps={steps}; pass an infinite "
                "iterator (e.g. Task.train_batches) or a re-iterable list of batches"
            )


def qat_finetune(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    device: str | torch.device = "cpu",
    log_every: int = 1,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps (quantization-aware training).

    The model is moved to ``device`` in place, put in training mode for the loop and left in
    the mode it came in. Every parameter with ``requires_grad`` is optimised, learnable
    quantizer scales included. The loss is checked before each update, so a non-finite loss
    never reaches the weights.

    Args:
        model: the (fake-quantized) model; BatchNorm, if any, trains as usual.
        batches: ``(inputs, targets)`` pairs. An iterator is consumed; a list or other
            re-iterable collection is cycled until ``steps`` is reached.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar tensor``.
        steps: number of optimizer steps (0 does nothing).
        lr: (initial) learning rate.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty (coupled, as in torch.optim).
        schedule: ``"constant"`` or ``"cosine"`` (decays to 0 over ``steps``).
        device: ``"cpu"``, ``"cuda"`` or a torch.device.
        log_every: keep the loss of every ``log_every``-th step (step 0 always).
        callback: called as ``callback(step, loss)`` after each step (e.g. progress, timing).

    Returns:
        The loss history (floats), one entry per ``log_every`` steps.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
        ValueError: a bad argument, or ``batches`` ran out before ``steps``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
        >>> losses = qat_finetune(net, data, nn.functional.cross_entropy, steps=5, lr=0.1)
        >>> len(losses)
        5
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("schedule", schedule, SCHEDULES)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is not allowed; allowed values: an integer >= 0")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is not allowed; allowed values: a finite number > 0")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum!r} is not allowed; allowed values: [0, 1)")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} is not allowed; allowed values: >= 0")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every={log_every!r} is not allowed; allowed values: an integer >= 1")
    if steps == 0:
        return []

    dev = torch.device(device)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True to fine-tune")
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        if schedule == "cosine"
        else None
    )

    history: list[float] = []
    was_training = model.training
    model.train()
    try:
        stream = _stream(batches, steps)
        for step in range(steps):
            x, y = next(stream)
            x, y = inputs_to(x, dev, non_blocking=True), y.to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(call_model(model, x), y)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(step, value)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if step % log_every == 0:
                history.append(value)
            if callback is not None:
                callback(step, value)
    finally:
        model.train(was_training)
    return history


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    metric: str = "top1",
    device: str | torch.device = "cpu",
) -> float:
    """Top-k accuracy of ``model`` over all ``batches``, weighted by sample count.

    The model is moved to ``device`` in place and run in eval mode under ``torch.no_grad``;
    its training flag is restored afterwards.

    Args:
        model: a classifier returning ``[N, classes]`` scores (logits or log-probabilities).
        batches: ``(inputs, targets)`` pairs with integer class targets of shape ``[N]``.
        metric: ``"top1"`` or ``"top5"``.
        device: ``"cpu"``, ``"cuda"`` or a torch.device.

    Returns:
        The fraction of samples classified correctly, in [0, 1].

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Identity()
        >>> x = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> evaluate(net, [(x, torch.tensor([0, 1, 1]))])
        0.6666666666666666
    """
    _check_choice("metric", metric, METRICS)
    k = int(metric[3:])
    dev = torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    try:
        with torch.no_grad():
            for batch in batches:
                x, y = _split_batch(batch)
                y = y.to(dev)
                scores = call_model(model, inputs_to(x, dev))
                if scores.dim() != 2 or y.dim() != 1 or scores.shape[0] != y.shape[0]:
                    raise ValueError(
                        f"evaluate needs scores [N, classes] and targets [N]; got scores "
                        f"{tuple(scores.shape)} and targets {tuple(y.shape)}"
                    )
                top = scores.topk(min(k, scores.shape[1]), dim=1).indices
                correct += int((top == y[:, None]).any(dim=1).sum())
                total += y.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate got no samples: batches is empty")
    return correct / total


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run torch on ``threads`` intra-op threads; restore the previous count on exit.

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
