"""``torch.compile`` for QAT and evaluation, with a fallback to eager and a recompile count.

Semantics of ``compile``: ``False`` runs eager; ``True`` compiles (Inductor) and falls back to
eager, for the rest of the run, when compiling or running the compiled code raises (logged as a
warning and recorded); ``"auto"`` compiles on CUDA and stays eager on the CPU. Compiling costs
tens of seconds per model structure on a 2-core CPU, paid once per process (the fake-quant
modules keep their qparams as tensors under compile, so plans of one architecture that differ
in bits, symmetry, calibration, weight granularity or scale values reuse one graph; only a
change of structure - a layer left float, learned vs frozen qparams, int8 vs float adds -
compiles again). Whether that pays on the CPU depends on the steps per trial and trials per
process: ``scripts/bench_qat_overhead.py`` measures it; ``"auto"`` follows that measurement.

Compiled code that runs but computes wrong gradients is worse than an error: torch 2.11 on
CUDA once compiled a QAT graph that passed no gradient to the weights, and the run trained
nothing without a word. So the first compiled training step is checked against an eager one
(:func:`gradient_mismatch`); a mismatch falls back to eager like an error does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from autoquant.train._errors import NonFiniteLossError
from autoquant.transform import Inputs, call_model

log = logging.getLogger("autoquant.train")

COMPILE_CHOICES: tuple[Any, ...] = ("auto", True, False)

T = TypeVar("T")


def check_compile(compile: bool | str) -> bool | str:
    """``compile`` validated against :data:`COMPILE_CHOICES`."""
    if not any(compile is c or (isinstance(c, str) and compile == c) for c in COMPILE_CHOICES):
        raise ValueError(f"compile={compile!r} is not allowed; allowed values: 'auto', True, False")
    return compile


def wants_compile(compile: bool | str, device: torch.device) -> bool:
    """Whether ``compile`` (see the module docstring) means compiling on ``device``."""
    check_compile(compile)
    if compile == "auto":
        return device.type == "cuda"
    return bool(compile)


#: Below this cosine similarity of the whole gradient, compiled and eager steps disagree. Not
#: tight: dropout draws other masks in compiled code, and bf16 rounds differently.
MIN_GRAD_COSINE = 0.5


def gradient_mismatch(model: nn.Module, eager: dict[str, torch.Tensor | None]) -> str | None:
    """Why the gradients now in ``model`` disagree with ``eager`` (name -> gradient), or None.

    They disagree when a parameter with a non-zero eager gradient has none (or only zeros), a
    gradient is not finite where the eager one is, or the cosine similarity of all gradients
    together is below :data:`MIN_GRAD_COSINE`.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> ref = {n: p.grad.clone() for n, p in net.named_parameters()}
        >>> gradient_mismatch(net, ref) is None
        True
        >>> net.weight.grad = None
        >>> gradient_mismatch(net, ref)
        'no gradient for weight'
    """
    dot = norm_a = norm_b = 0.0
    for name, p in model.named_parameters():
        ref = eager.get(name)
        if ref is None or not bool(ref.any()):
            continue
        got = p.grad
        if got is None or not bool(got.any()):
            return f"no gradient for {name}"
        if bool(ref.isfinite().all()) and not bool(got.isfinite().all()):
            return f"non-finite gradient for {name}"
        a, b = ref.double().flatten(), got.double().flatten()
        dot, norm_a, norm_b = dot + float(a @ b), norm_a + float(a @ a), norm_b + float(b @ b)
    if norm_a > 0 and dot / max((norm_a * norm_b) ** 0.5, 1e-300) < MIN_GRAD_COSINE:
        return f"gradient cosine similarity {dot / (norm_a * norm_b) ** 0.5:.2f} with eager"
    return None


_FX_CLASSES: dict[str, type[nn.Module]] = {}


def share_fx_class(model: nn.Module) -> None:
    """Give a ``torch.fx.GraphModule`` the class of earlier ones whose generated code is equal.

    fx gives every GraphModule its own class, with a forward compiled from generated source,
    and Dynamo caches compiled graphs per code object and guards on the module's type: every
    trial's model (a GraphModule when its residual adds are quantized) would compile anew. The
    generated code depends only on the graph, so modules with equal ``code`` can share one
    class. Only edit the graph of a deep copy afterwards (``deepcopy`` makes a new class, as
    ``autoquant.measure`` does before it rewrites graphs): an in-place ``recompile()`` would
    change the shared class.
    """
    if isinstance(model, torch.fx.GraphModule):
        cls = _FX_CLASSES.setdefault(model.code, type(model))
        if type(model) is not cls:
            model.__class__ = cls


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledRunner:
    """Runs a model compiled or eagerly; the first failure of the compiled code switches to
    eager for good, after redoing the failed work eagerly.

    Args:
        model: the model (compiled lazily with ``torch.compile(model)``; the module itself is
            not changed, so its state dict and the eager path stay as they were).
        enabled: compile at all.

    Attributes:
        fallback: None, or why compiling failed (``"ExceptionType: message"``).

    Example:
        >>> runner = CompiledRunner(nn.Linear(2, 2), enabled=False)
        >>> runner.run(lambda forward: forward(torch.ones(1, 2)).shape)
        torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.model = model
        self.requested = enabled
        self._compiled: Callable[..., Any] | None = None
        if enabled:
            share_fx_class(model)
            self._compiled = torch.compile(model)
        self.fallback: str | None = None
        self._graphs_before = compiled_graphs() if enabled else 0
        self._checked = False

    @property
    def compiled(self) -> bool:
        """The compiled code is in use (requested, and no failure so far)."""
        return self._compiled is not None

    def forward(self, inputs: Inputs) -> Any:
        """One call of the current model (compiled or eager)."""
        return call_model(self.model if self._compiled is None else self._compiled, inputs)

    def run(self, work: Callable[[Callable[[Inputs], Any]], T]) -> T:
        """``work(forward)``; if it raises while compiled, warn, record, and redo it eagerly.

        ``work`` must be safe to redo (e.g. it clears gradients first). An error that is not
        the compiler's also surfaces from the eager retry. The first ``work`` that leaves
        gradients is also run eagerly first, and compiled gradients that disagree
        (:func:`gradient_mismatch`) fall back too, keeping the eager result.
        """
        if self._compiled is None:
            return work(self._eager_forward)
        eager: dict[str, torch.Tensor | None] | None = None
        if not self._checked and torch.is_grad_enabled():
            self._checked = True
            eager_value = work(self._eager_forward)
            eager = {n: p.grad for n, p in self.model.named_parameters()}
            if not any(g is not None for g in eager.values()):  # work leaves no gradients
                eager = None
        try:
            value = work(self.forward)
        except NonFiniteLossError:  # a training outcome, not the compiler's
            raise
        except Exception as e:
            self._fall_back(f"{type(e).__name__}: {e}")
            return work(self._eager_forward)
        if eager is not None and (why := gradient_mismatch(self.model, eager)) is not None:
            self._fall_back(f"compiled gradients disagree with eager: {why}")
            for n, p in self.model.named_parameters():
                p.grad = eager[n]
            return eager_value
        return value

    def _fall_back(self, why: str) -> None:
        self.fallback = why[:500]
        self._compiled = None
        log.warning("torch.compile failed, running eagerly from now on: %s", self.fallback)

    def _eager_forward(self, inputs: Inputs) -> Any:
        return call_model(self.model, inputs)

    def info(self) -> dict[str, Any]:
        """What happened, for a trial's record: requested, used, fallback, new graphs."""
        return {
            "requested": self.requested,
            "used": self.compiled,
            "fallback": self.fallback,
            "graphs_compiled": compiled_graphs() - self._graphs_before if self.requested else 0,
        }
