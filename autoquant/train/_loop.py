"""The QAT fine-tuning loop and top-k evaluation.

The loop optimises every ``requires_grad`` parameter of the model; learned quantizer
parameters (LSQ scales, LSQ+ zero-points) get their own optimizer groups and learning rate
(:mod:`autoquant.train._optim`) and are projected back onto valid values after each step.
Optional: distillation from precomputed teacher logits, ``torch.compile`` with an eager
fallback, bfloat16 autocast, CUDA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from autoquant.quant import constrain_quantizers_
from autoquant.train._compile import CompiledRunner, check_compile, wants_compile
from autoquant.train._data import Batch, split_batch, stream
from autoquant.train._distill import Distillation
from autoquant.train._errors import NonFiniteLossError
from autoquant.train._optim import (
    DEFAULT_QUANT_LR,
    check_quant_lr,
    learned_quantizers,
    make_optimizer,
)
from autoquant.transform import inputs_to

LossFn = Callable[[Tensor, Tensor], Tensor]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
METRICS = ("top1", "top5")
#: ``autocast`` choices: None (float32) or ``"bf16"`` (bfloat16 matmuls/convs; the fake-quant
#: codes and the losses stay float32).
AUTOCAST = (None, "bf16")


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}"
        )


def autocast_context(
    device: torch.device, autocast: str | None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``autocast="bf16"`` on ``device``, else a no-op context."""
    _check_choice("autocast", autocast, AUTOCAST)
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _float_scores(out: Any) -> Any:
    return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out


def _teacher_rows(
    distill: Distillation | None, logits: Tensor | Iterable[Tensor] | None, steps: int
) -> Iterator[Tensor] | None:
    if distill is None and logits is None:
        return None
    if distill is None:
        raise ValueError("teacher_logits were given without distill=Distillation(...)")
    if not isinstance(distill, Distillation):
        raise ValueError(f"distill must be a Distillation, got {type(distill).__name__}")
    if logits is None:
        raise ValueError(
            "distill needs teacher_logits: the teacher's scores per step, e.g. from "
            "autoquant.train.cached_teacher_logits(float_model, make_batches, steps=..., ...)"
        )
    if isinstance(logits, Tensor):
        if logits.dim() != 3 or logits.shape[0] < steps:
            raise ValueError(
                f"teacher_logits must be [steps, batch, classes] with at least steps={steps} "
                f"rows; got {tuple(logits.shape)}"
            )
        return iter(logits.unbind(0))
    return iter(logits)


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
    quant_lr: float = DEFAULT_QUANT_LR,
    distill: Distillation | None = None,
    teacher_logits: Tensor | Iterable[Tensor] | None = None,
    compile: bool | str = False,
    autocast: str | None = None,
    record: dict[str, Any] | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps (quantization-aware training).

    The model is moved to ``device`` in place, put in training mode for the loop and left in
    the mode it came in. Every parameter with ``requires_grad`` is optimised; learned
    quantizer scales and zero-points at ``quant_lr`` (relative to their size, see
    :func:`~autoquant.train.param_groups`), kept valid after each step (scale > 0, zero-point
    on the grid). The loss is checked before each update, so a non-finite loss never reaches
    the weights.

    Args:
        model: the (fake-quantized) model; BatchNorm, if any, trains as usual.
        batches: ``(inputs, targets)`` pairs. An iterator is consumed; a list or other
            re-iterable collection is cycled until ``steps`` is reached.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar tensor``.
        steps: number of optimizer steps (0 does nothing).
        lr: (initial) learning rate of the model's weights.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty on the weights (coupled, as in torch.optim); never on
            quantizer parameters.
        schedule: ``"constant"`` or ``"cosine"`` (decays every group to 0 over ``steps``).
        device: ``"cpu"``, ``"cuda"`` or a torch.device.
        log_every: keep the loss of every ``log_every``-th step (step 0 always).
        callback: called as ``callback(step, loss)`` after each step (e.g. progress, timing).
        quant_lr: relative learning rate of learned quantizer parameters (0 freezes them).
        distill: train against the teacher too (:class:`~autoquant.train.Distillation`); the
            loss becomes ``distill.loss(scores, teacher_row, loss_fn(scores, targets))``.
        teacher_logits: the teacher's scores per step, ``[steps, batch, classes]`` or an
            iterable of ``[batch, classes]`` (see :func:`~autoquant.train.teacher_logits`).
        compile: ``False``, ``True`` or ``"auto"`` (see :mod:`autoquant.train._compile`);
            compiles the forward and backward, falling back to eager if that fails.
        autocast: None or ``"bf16"`` (bfloat16 autocast on ``device``).
        record: a dict to fill with what the run did (optimizer groups, quantizer parameters,
            distillation, autocast, compile outcome and graphs compiled).

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
    _check_choice("autocast", autocast, AUTOCAST)
    check_compile(compile)
    quant_lr = check_quant_lr(quant_lr)
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
    teacher = _teacher_rows(distill, teacher_logits, steps)
    if steps == 0:
        return []

    dev = torch.device(device)
    model.to(dev)
    opt = make_optimizer(
        model, optimizer, lr=lr, quant_lr=quant_lr, momentum=momentum, weight_decay=weight_decay
    )
    learned = learned_quantizers(model)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        if schedule == "cosine"
        else None
    )
    runner = CompiledRunner(model, wants_compile(compile, dev))

    def step_loss(x: Any, y: Tensor, t: Tensor | None, step: int) -> Callable[..., float]:
        def work(forward: Callable[[Any], Any]) -> float:
            opt.zero_grad(set_to_none=True)
            with autocast_context(dev, autocast):
                out = forward(x)
            out = _float_scores(out)
            loss = loss_fn(out, y)
            if t is not None:
                loss = distill.loss(out, t, loss)  # type: ignore[union-attr]
            value = float(loss.detach())  # one host sync per step: the finiteness check
            if not math.isfinite(value):
                raise NonFiniteLossError(step, value)
            loss.backward()
            return value

        return work

    history: list[float] = []
    was_training = model.training
    model.train()
    try:
        data = stream(batches, steps)
        for step in range(steps):
            x, y = next(data)
            x, y = inputs_to(x, dev, non_blocking=True), y.to(dev, non_blocking=True)
            t = next(teacher).to(dev, non_blocking=True) if teacher is not None else None
            value = runner.run(step_loss(x, y, t, step))
            opt.step()
            if learned:
                constrain_quantizers_(learned)
            if sched is not None:
                sched.step()
            if step % log_every == 0:
                history.append(value)
            if callback is not None:
                callback(step, value)
    finally:
        model.train(was_training)
        if record is not None:
            record.update(
                {
                    "device": str(dev),
                    "optimizer": optimizer,
                    "lr_groups": [float(g["lr"]) for g in opt.param_groups],
                    "quant_params": sum(len(fq.quant_parameters()) for fq in learned),
                    "quant_lr": quant_lr,
                    "distill": distill.to_dict() if distill is not None else None,
                    "autocast": autocast,
                    "compile": runner.info(),
                }
            )
    return history


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    metric: str = "top1",
    device: str | torch.device = "cpu",
    *,
    compile: bool | str = False,
    autocast: str | None = None,
    record: dict[str, Any] | None = None,
) -> float:
    """Top-k accuracy of ``model`` over all ``batches``, weighted by sample count.

    The model is moved to ``device`` in place and run in eval mode under
    ``torch.inference_mode`` (no autograd bookkeeping at all); its training flag is restored
    afterwards.

    Args:
        model: a classifier returning ``[N, classes]`` scores (logits or log-probabilities).
        batches: ``(inputs, targets)`` pairs with integer class targets of shape ``[N]``.
        metric: ``"top1"`` or ``"top5"``.
        device: ``"cpu"``, ``"cuda"`` or a torch.device.
        compile: ``False``, ``True`` or ``"auto"``, as in :func:`qat_finetune`.
        autocast: None or ``"bf16"``.
        record: a dict to fill with the compile outcome.

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
    _check_choice("autocast", autocast, AUTOCAST)
    check_compile(compile)
    k = int(metric[3:])
    dev = torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    runner = CompiledRunner(model, wants_compile(compile, dev))
    correct = 0
    total = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                x, y = split_batch(batch)
                y = y.to(dev)
                x = inputs_to(x, dev)

                def work(forward: Callable[[Any], Any], x: Any = x) -> Any:
                    with autocast_context(dev, autocast):
                        return forward(x)

                scores = runner.run(work)
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
        if record is not None:
            record["compile"] = runner.info()
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
