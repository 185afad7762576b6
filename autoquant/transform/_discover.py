"""Layer discovery that tells the truth: which layers can be quantized, and why not the others.

:func:`quantizable_layers` runs the model once on an example input, as
:func:`~autoquant.transform.apply_plan` would run it (attention explicit, fused transformer paths
off, every layer wrapped with pass-through quantizers), and reports per layer one
:class:`LayerStatus`:

* ``ok``: called once, its output reaches the model output;
* ``never_called``: the forward pass never calls it (it cannot be calibrated);
* ``reused``: one module called at several places (a deployed graph has one layer per call);
* ``output_unused``: called, but its output never reaches the model output (a Hugging Face
  pooler whose result is dropped): quantizing it changes nothing;
* ``not_wrappable``: the wrapper would not be exact, e.g. a subclass whose own ``forward``
  bypasses the primitive the wrapper intercepts, or an embedding with ``max_norm``.

A search quantizes the ``ok`` layers only; :func:`excluded_layers_message` is the one warning
that lists the others and says how to include them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import nn

from autoquant.transform._attention import (
    AttentionMatmul,
    ExplicitMultiheadAttention,
    explicit_attention_,
    explicit_view,
    keep_slow_path_,
    structural_copy,
    unsupported_attention,
)
from autoquant.transform._dataflow import MacsFn, trace_dataflow
from autoquant.transform._registry import (
    QuantizedLayer,
    is_quantizable,
    registered_base,
    wrap_,
    wrapper_type,
)
from autoquant.types import FP32, LayerPlan, QuantPlan, QuantSpec


class LayerStatus(str, Enum):
    """What layer discovery found for one layer (see module doc)."""

    OK = "ok"
    NEVER_CALLED = "never_called"
    REUSED = "reused"
    OUTPUT_UNUSED = "output_unused"
    NOT_WRAPPABLE = "not_wrappable"


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer.

    Attributes:
        name: FQN, the key a plan uses.
        type_name: the registered type it is quantized as (``Linear``, ``Conv2d``,
            ``Embedding``, ...), also for subclasses.
        params: own parameter count.
        macs: multiply-accumulates for the example input (whole batch; 0 if never called).
        calls: how often the example forward pass called it.
        status: :class:`LayerStatus`; only ``ok`` layers should be searched.
        reason: one line on why it is not ``ok`` and how to include it (empty when ``ok``).
        quantizes_input: False when the layer's input is never quantized (embeddings): a plan
            must give it an fp32 activation spec.
        quantizes_weight: False for a layer without a weight (attention matmuls): a plan must
            give it an fp32 weight spec.
    """

    name: str
    type_name: str
    params: int
    macs: int
    calls: int = 1
    status: LayerStatus = LayerStatus.OK
    reason: str = ""
    quantizes_input: bool = True
    quantizes_weight: bool = True

    @property
    def ok(self) -> bool:
        return self.status is LayerStatus.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type_name": self.type_name,
            "params": self.params,
            "macs": self.macs,
            "calls": self.calls,
            "status": self.status.value,
            "reason": self.reason,
            "quantizes_input": self.quantizes_input,
            "quantizes_weight": self.quantizes_weight,
        }


def quantizable_names(model: nn.Module) -> list[str]:
    """FQNs of the quantizable layers of ``model`` (any status), in module order.

    A ``nn.MultiheadAttention`` contributes its sub-layers ``<mha>.in_proj`` (or
    ``q_proj``/``k_proj``/``v_proj`` when kdim/vdim differ), ``<mha>.matmul`` (the attention
    matmuls, weightless) and ``<mha>.out_proj``.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 8), nn.MultiheadAttention(8, 2))
        >>> quantizable_names(net)
        ['0', '1.in_proj', '1.matmul', '1.out_proj']
    """
    return [n for n, m in explicit_view(model).named_modules() if is_quantizable(m)]


def _type_name(module: nn.Module) -> str:
    base = registered_base(type(module))
    return base.__name__ if base is not None else type(module).__name__


def _static_reasons(view: nn.Module) -> dict[str, str]:
    """Layers that cannot be wrapped exactly whatever the forward does."""
    reasons: dict[str, str] = {}
    for name, module in view.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not isinstance(
            module, ExplicitMultiheadAttention
        ):
            why = unsupported_attention(module)
            for sub, m in module.named_modules(prefix=name):
                if sub != name and is_quantizable(m):
                    reasons[sub] = (
                        f"inside {name!r}, a MultiheadAttention that cannot be made explicit "
                        f"({why}): it reads the weight without calling the layer; a plain "
                        "nn.MultiheadAttention without add_bias_kv/add_zero_attn is quantizable"
                    )
        elif is_quantizable(module) and not isinstance(module, QuantizedLayer):
            cls = wrapper_type(type(module))
            why = cls.unsupported(module) if cls is not None else None
            if why is not None:
                reasons.setdefault(name, why)
    return reasons


def _hint(status: LayerStatus, module: nn.Module) -> str:
    cls = type(module).float_type if isinstance(module, QuantizedLayer) else type(module)
    return {
        LayerStatus.NEVER_CALLED: "make the example input reach it to quantize it",
        LayerStatus.REUSED: "give each call its own module (e.g. copy.deepcopy) to quantize it",
        LayerStatus.OUTPUT_UNUSED: "use its output, or remove it from the model",
        LayerStatus.NOT_WRAPPABLE: (
            f"register an exact wrapper for {cls.__qualname__} with "
            "autoquant.transform.register_quantizable to quantize it"
        ),
    }.get(status, "")


def quantizable_layers(
    model: nn.Module, example_input: Any, *, attention_matmuls: bool = False
) -> list[LayerInfo]:
    """Every quantizable layer with its size, MACs and discovery status (see module doc).

    Runs one eval-mode forward pass (with autograd on, to follow where outputs go; no backward)
    on a structural copy of ``model`` that shares its tensors: ``model`` itself, its train/eval
    flags and its BatchNorm statistics are left as they were.

    Args:
        model: float (or already quantized) model.
        example_input: a tensor, or a tuple of positional inputs.
        attention_matmuls: also list the attention matmuls (``<mha>.matmul``), which have no
            weight (off by default: a search then leaves them float).

    Example:
        >>> import torch
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 10)
        ...         self.pooler = nn.Linear(10, 10)  # called, output dropped
        ...     def forward(self, x):
        ...         y = self.fc(self.conv(x).flatten(1))
        ...         self.pooler(y)
        ...         return y
        >>> infos = quantizable_layers(Net(), torch.zeros(1, 1, 8, 8))
        >>> [(i.name, i.type_name, i.params, i.macs, i.status.value)
        ...  for i in infos]  # doctest: +NORMALIZE_WHITESPACE
        [('conv', 'Conv2d', 40, 1296, 'ok'), ('fc', 'Linear', 1450, 1440, 'ok'),
         ('pooler', 'Linear', 110, 100, 'output_unused')]
    """
    view = explicit_attention_(structural_copy(model))
    static = _static_reasons(view)
    layers = {n: m for n, m in view.named_modules() if is_quantizable(m)}
    for name, module in layers.items():
        if name not in static and not isinstance(module, QuantizedLayer):
            wrap_(module, LayerPlan())  # pass-through quantizers: counts the primitive's calls
    keep_slow_path_(view)  # again, now that the layers are wrappers
    probe = _PrimitiveProbe(layers)
    macs: dict[str, MacsFn] = {
        n: type(m).macs for n, m in layers.items() if isinstance(m, QuantizedLayer)
    }
    try:
        flow = trace_dataflow(view, example_input, layers, macs)
    finally:
        probe.remove()
    infos = []
    for name, module in layers.items():
        wrapper = wrapper_type(type(module)) or type(module)
        if not attention_matmuls and issubclass(wrapper, AttentionMatmul):
            continue
        trace = flow.modules[name]
        if name in static:
            status, reason = LayerStatus.NOT_WRAPPABLE, static[name]
        else:
            status, reason = _status(module, trace.calls, probe, name, flow.output_used(name))
        infos.append(
            LayerInfo(
                name=name,
                type_name=_type_name(module),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                macs=trace.macs,
                calls=trace.calls,
                status=status,
                reason=reason,
                quantizes_input=getattr(wrapper, "quantizes_input", True),
                quantizes_weight=getattr(wrapper, "quantizes_weight", True),
            )
        )
    return infos


class _PrimitiveProbe:
    """Counts, per wrapper, the calls of the quantizer its intercept calls first (the weight's,
    or the input's for weightless layers), and whether the weight passed is the module's own."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.reached = dict.fromkeys(layers, 0)
        self.foreign = dict.fromkeys(layers, False)
        self._handles: list[Any] = []
        for name, module in layers.items():
            if not isinstance(module, QuantizedLayer):
                continue
            weighted = module.quantizes_weight
            fq = module.weight_fq if weighted else module.act_fq

            def hook(
                _: nn.Module, args: tuple[Any, ...], name: str = name, weighted: bool = weighted
            ) -> None:
                self.reached[name] += 1
                if weighted and layers[name].weight is not args[0]:
                    self.foreign[name] = True

            self._handles.append(fq.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _status(
    module: nn.Module, calls: int, probe: _PrimitiveProbe, name: str, used: bool | None
) -> tuple[LayerStatus, str]:
    if calls == 0:
        status, reason = LayerStatus.NEVER_CALLED, "never called by the example forward pass"
    elif probe.foreign[name] or probe.reached[name] != calls:
        status = LayerStatus.NOT_WRAPPABLE
        cls = type(module).float_type  # type: ignore[union-attr]
        reason = (
            f"{cls.__qualname__}.forward passes another tensor than its weight to the primitive"
            if probe.foreign[name]
            else f"{cls.__qualname__}.forward reaches the quantized primitive "
            f"{probe.reached[name]} time(s) in {calls} call(s)"
        )
    elif calls > 1:
        status, reason = LayerStatus.REUSED, f"called {calls} times in one forward pass"
    elif used is False:
        status, reason = LayerStatus.OUTPUT_UNUSED, "its output never reaches the model output"
    else:
        return LayerStatus.OK, ""
    return status, f"{reason}; {_hint(status, module)}"


def excluded_layers_message(layers: Iterable[LayerInfo]) -> str | None:
    """One warning text listing every layer that is not ``ok``, why, and how to include it;
    ``None`` when all are ``ok``.

    Example:
        >>> print(excluded_layers_message([
        ...     LayerInfo("fc", "Linear", 10, 10),
        ...     LayerInfo("pool", "Linear", 10, 10, 1, LayerStatus.OUTPUT_UNUSED, "unused"),
        ... ]))
        autoquant: 1 layer excluded from quantization (it stays float):
          pool (Linear, output_unused): unused
    """
    bad = [i for i in layers if not i.ok]
    if not bad:
        return None
    lines = [
        f"autoquant: {len(bad)} layer{'s' if len(bad) > 1 else ''} excluded from quantization "
        f"({'they stay' if len(bad) > 1 else 'it stays'} float):"
    ]
    lines += [f"  {i.name} ({i.type_name}, {i.status.value}): {i.reason}" for i in bad]
    return "\n".join(lines)


def uniform_plan(
    layers: Iterable[LayerInfo], weight: QuantSpec, activation: QuantSpec, adds: QuantSpec = FP32
) -> QuantPlan:
    """The same specs for every given layer, with an fp32 activation where the layer does not
    quantize its input (embeddings) and an fp32 weight where it has none (attention matmuls).

    Example:
        >>> import torch
        >>> infos = quantizable_layers(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2)),
        ...                            torch.tensor([[1, 2]]))
        >>> uniform_plan(infos, QuantSpec(bits=4), QuantSpec(bits=8)).summary()
        'w4afp32 w4a8'
    """
    return QuantPlan(
        {
            i.name: LayerPlan(
                weight if i.quantizes_weight else FP32, activation if i.quantizes_input else FP32
            )
            for i in layers
        },
        adds=adds,
    )
