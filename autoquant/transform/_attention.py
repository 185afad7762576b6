"""``nn.MultiheadAttention`` computed from quantizable sub-layers, and no fused fast paths.

PyTorch's ``nn.MultiheadAttention`` multiplies by its packed in-projection parameter with
``F.linear`` (no module to wrap) and, in eval mode, runs a fused kernel that reads
``out_proj.weight`` directly; ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` have
fused eval paths of their own that skip every submodule. :class:`ExplicitMultiheadAttention`
computes the same function from real modules::

    in_proj (Linear E -> 3E; or q_proj/k_proj/v_proj when kdim/vdim differ)
      -> split heads -> matmul (softmax(q k^T / sqrt(d) + mask) v) -> merge heads -> out_proj

so a plan addresses ``<mha>.in_proj`` and ``<mha>.out_proj`` like any ``Linear``, and may
quantize the operands of the two attention matmuls with ``<mha>.matmul``
(:class:`QAttentionMatmul`, activation spec only; layer discovery lists it only on request).
:func:`keep_slow_path_` makes every transformer layer that holds a converted or quantized module
run its Python path (per module: a no-op forward pre-hook on the layer, which PyTorch's fast path
checks for, and ``use_nested_tensor = False`` on the encoder), so no fused kernel bypasses the
simulation. Nothing global is switched.

Example:
    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    >>> x = torch.randn(3, 5, 8)
    >>> explicit = explicit_attention_(copy.deepcopy(nn.Sequential(mha)))[0]
    >>> [n for n, _ in explicit.named_children()]
    ['in_proj', 'matmul', 'out_proj']
    >>> torch.allclose(explicit(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.quant import FakeQuantize
from autoquant.transform._registry import QuantizedLayer, register_quantizable
from autoquant.types import LayerPlan, PlanError

_FORWARD = nn.MultiheadAttention.forward


def unsupported_attention(module: nn.MultiheadAttention) -> str | None:
    """Why a ``MultiheadAttention`` cannot be converted exactly (``None`` if it can)."""
    cls = type(module)
    if not isinstance(module, ExplicitMultiheadAttention) and cls.forward is not _FORWARD:
        return f"{cls.__qualname__} overrides MultiheadAttention.forward"
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True is not supported"
    if module.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


def _linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` holding these very parameters (no new storage)."""
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    lin.weight = weight
    lin.bias = bias
    return lin


def _bias_part(bias: Tensor | None, i: int, n: int) -> nn.Parameter | None:
    if bias is None:
        return None
    part = bias.detach()[i * n : (i + 1) * n].clone()
    return nn.Parameter(part, requires_grad=bias.requires_grad)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not allowed) as ``-inf``/``0``; a float mask as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    if not torch.is_floating_point(mask):
        raise TypeError(f"attention masks must be bool or float, got {mask.dtype}")
    return mask.to(dtype)


class AttentionMatmul(nn.Module):
    """``softmax(q k^T * scale + mask) v`` per head, with dropout on the probabilities.

    Inputs ``[N, H, L, D]``, ``[N, H, S, D]``, ``[N, H, S, D]`` and an additive mask
    broadcastable to ``[N, H, L, S]``; returns the output ``[N, H, L, D]`` and the
    probabilities ``[N, H, L, S]`` the output was computed with. The operands of the two
    matmuls pass through :meth:`score_operands` and :meth:`output_operands`, the points
    :class:`QAttentionMatmul` quantizes.
    """

    def score_operands(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The operands of ``q k^T`` (``q`` already scaled by ``1/sqrt(D)``)."""
        return q, k

    def output_operands(self, probs: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The operands of ``probs v``."""
        return probs, v

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float
    ) -> tuple[Tensor, Tensor]:
        q, k = self.score_operands(q * (1.0 / math.sqrt(q.shape[-1])), k)
        scores = torch.matmul(q, k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        probs, v = self.output_operands(probs, v)
        return torch.matmul(probs, v), probs


@register_quantizable(AttentionMatmul)
class QAttentionMatmul(QuantizedLayer, AttentionMatmul):
    """Fake-quant attention matmuls: the plan's activation spec (per tensor) on the scaled
    query (``act_fq``), the key (``key_fq``), the probabilities (``prob_fq``) and the value
    (``value_fq``), each calibrated on its own range. No weight: the plan's weight must be
    fp32. Plans address it as ``<mha>.matmul``; off unless a plan names it."""

    quantizes_weight = False
    input_quantizers = ("act_fq", "key_fq", "prob_fq", "value_fq")
    key_fq: FakeQuantize
    prob_fq: FakeQuantize
    value_fq: FakeQuantize

    def _init_quant(self, layer_plan: LayerPlan) -> None:
        act = layer_plan.activation
        if layer_plan.weight.bits != "fp32":
            raise PlanError(
                f"weight bits={layer_plan.weight.bits!r} is not allowed: AttentionMatmul "
                "layers have no weight; allowed values: 'fp32'"
            )
        if act.per_channel:
            raise PlanError(
                "activation granularity='per_channel' is not allowed for AttentionMatmul; "
                "allowed values: 'per_tensor'"
            )
        self.layer_plan = layer_plan
        for name in self.input_quantizers:
            setattr(self, name, FakeQuantize(act))

    def score_operands(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.act_fq(q), self.key_fq(k)

    def output_operands(self, probs: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.prob_fq(probs), self.value_fq(v)

    @staticmethod
    def macs(module: nn.Module, args: tuple[Any, ...], output: Any) -> int:
        q, k = args[0], args[1]
        return 2 * int(q.numel()) * int(k.shape[-2])  # q k^T and probs v


class ExplicitMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computed from its sub-layers (see module doc).

    It is a ``MultiheadAttention`` (same attributes and call signature, batch_first or not,
    batched or unbatched, boolean or float ``key_padding_mask`` / ``attn_mask``,
    ``need_weights``, ``average_attn_weights``, ``is_causal``), so code around it keeps
    working; ``in_proj_weight`` and friends are read-only views of the sub-layers' parameters.
    Build it with :meth:`convert_`. Self-attention (``query is key is value``) calls
    ``in_proj`` once; cross-attention with a packed in-projection calls it once per distinct
    input (query, key, value), which layer discovery reports as a reused layer.
    """

    in_proj: nn.Linear
    out_proj: nn.Linear
    matmul: AttentionMatmul

    @classmethod
    def convert_(cls, module: nn.MultiheadAttention) -> ExplicitMultiheadAttention:
        """Turn ``module`` into an explicit attention **in place**, sharing its parameters
        (the in-projection bias is split when kdim/vdim differ from embed_dim).

        Raises:
            TypeError: the module cannot be converted exactly (see
                :func:`unsupported_attention`).
        """
        if isinstance(module, ExplicitMultiheadAttention):
            return module
        reason = unsupported_attention(module)
        if reason is not None:
            raise TypeError(f"cannot convert {type(module).__name__}: {reason}")
        params = module._parameters
        weight, bias = params.pop("in_proj_weight"), params.pop("in_proj_bias")
        separate = [params.pop(f"{p}_proj_weight") for p in "qkv"]
        children: dict[str, nn.Module | None] = {}
        if module._qkv_same_embed_dim:
            assert weight is not None
            children["in_proj"] = _linear(weight, bias)
        else:
            for i, (p, w) in enumerate(zip("qkv", separate, strict=True)):
                assert w is not None
                children[f"{p}_proj"] = _linear(w, _bias_part(bias, i, module.embed_dim))
        children["matmul"] = AttentionMatmul()
        out_proj = module.out_proj
        if type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear:
            out_proj.__class__ = nn.Linear  # the subclass only blocks torch.ao dynamic quant
        children["out_proj"] = out_proj
        module._modules = {**children, **module._modules}  # sub-layers in call order
        module.__class__ = cls
        return module  # type: ignore[return-value]

    # Read-only views, so code written for nn.MultiheadAttention reads the live parameters.
    @property
    def in_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return self.in_proj.weight if self._qkv_same_embed_dim else None

    @property
    def in_proj_bias(self) -> Tensor | None:  # type: ignore[override]
        if self._qkv_same_embed_dim:
            return self.in_proj.bias
        biases = [getattr(self, f"{p}_proj").bias for p in "qkv"]
        return None if biases[0] is None else torch.cat(biases)

    @property
    def q_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.get_submodule("q_proj").weight

    @property
    def k_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.get_submodule("k_proj").weight

    @property
    def v_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.get_submodule("v_proj").weight

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        if not self._qkv_same_embed_dim:
            return tuple(
                self.get_submodule(f"{p}_proj")(t)
                for p, t in zip("qkv", (query, key, value), strict=True)
            )
        e = self.embed_dim
        if query is key and key is value:
            return tuple(self.in_proj(query).split(e, dim=-1))
        q = self.in_proj(query)[..., :e]
        if key is value:
            k, v = self.in_proj(key)[..., e:].split(e, dim=-1)
            return q, k, v
        return q, self.in_proj(key)[..., e : 2 * e], self.in_proj(value)[..., 2 * e :]

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        same_kv, same_qk = key is value, query is key
        if not batched:  # [L, E]: a batch of one
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask[None]
        elif not self.batch_first:  # [L, N, E] -> [N, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if same_kv:  # keep the identities the projection relies on
            value = key
            if same_qk:
                key = value = query
        q, k, v = self._project(query, key, value)
        n, tgt, src, heads = q.shape[0], q.shape[1], k.shape[1], self.num_heads
        q, k, v = (t.reshape(n, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, is_causal, n, tgt, src, q.dtype, q.device)
        out, probs = self.matmul(q, k, v, mask, self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.embed_dim))
        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = probs.mean(dim=1) if average_attn_weights else probs
        return out, weights if batched else weights[0]

    def _mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        n: int,
        tgt: int,
        src: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor | None:
        """One additive mask broadcastable to ``[N, H, L, S]``."""
        if attn_mask is None and is_causal:  # the hint without a mask: build the causal mask
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=device).triu(1)
        mask = _additive(attn_mask, dtype)
        if mask is not None and mask.dim() == 3:  # [N * H, L, S]
            mask = mask.reshape(n, self.num_heads, tgt, src)
        pad = _additive(key_padding_mask, dtype)
        if pad is not None:  # [N, S]
            pad = pad.reshape(n, 1, 1, src)
            mask = pad if mask is None else mask + pad
        return mask


def structural_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer with ``model``
    (cheap: no tensor data is copied; changing the copy's structure leaves ``model`` alone)."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def convertible_attention(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """FQN -> each plain (not yet explicit) ``MultiheadAttention`` that can be converted."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        and not isinstance(m, ExplicitMultiheadAttention)
        and unsupported_attention(m) is None
    }


def explicit_attention_(model: nn.Module, names: set[str] | None = None) -> nn.Module:
    """In place: convert every convertible ``MultiheadAttention`` (or only those in ``names``)
    to :class:`ExplicitMultiheadAttention`, then :func:`keep_slow_path_`. Returns ``model``."""
    for name, module in convertible_attention(model).items():
        if names is None or name in names:
            ExplicitMultiheadAttention.convert_(module)
    keep_slow_path_(model)
    return model


def explicit_view(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no convertible attention, else a :func:`structural_copy`
    with every attention explicit: the module tree that plans name."""
    if not convertible_attention(model):
        return model
    return explicit_attention_(structural_copy(model))


def _slow_path_pre_hook(module: nn.Module, args: Any) -> None:
    """No-op. Its presence makes ``nn.TransformerEncoderLayer.forward`` take the Python path
    ("forward pre-/hooks are attached to the module"), which calls the submodules."""
    return None


def _simulated(module: nn.Module) -> bool:
    return any(
        isinstance(m, (QuantizedLayer, ExplicitMultiheadAttention)) for m in module.modules()
    )


def keep_slow_path_(model: nn.Module) -> None:
    """In place: every ``TransformerEncoderLayer`` / ``TransformerEncoder`` holding an explicit
    attention or a fake-quant layer never takes its fused fast path (see module doc)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and _simulated(module):
            if _slow_path_pre_hook not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_slow_path_pre_hook)
        elif isinstance(module, nn.TransformerEncoder) and _simulated(module):
            module.use_nested_tensor = False  # the nested-tensor path feeds the fused layers
