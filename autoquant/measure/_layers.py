"""How each quantizable layer type deploys: its ONNX node and its x86 int8 module, declared once.

A layer type's simulation is its fake-quant wrapper (``@register_quantizable`` in
:mod:`autoquant.transform`); its deployment is one :func:`register_deployment` call here, which
both backends read through :func:`deployment_of`: the ONNX export finds the layer's node by its
op types and rewrites the declared weight and data inputs; the torch-x86 backend builds the
declared quantized module, or simulates the layer in float when there is none. Nothing in the
backends tests a layer's class.

A new type is one declaration; e.g. an embedding, deployed weight-only as ``Gather`` on its
dequantized weight (the plan keeps its input, token ids, float)::

    register_deployment(
        nn.Embedding,
        onnx=[OnnxOp("Gather", weight_input=0, data_input=1, bias_input=None, lookup=True)],
        x86=_x86_embedding,
        integer_kernel=False,
    )

Subclasses of a registered type deploy like it (the nearest registered base class wins).

Example:
    >>> deployment_of(nn.Linear(4, 2)).onnx[0].op_type
    'Gemm'
    >>> deployment_of(nn.Conv2d(1, 1, 1)).x86(nn.Conv2d(1, 1, 1)).__class__.__name__
    'Conv2d'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.types import PlanError

_LAYOUTS = ("as_is", "transposed", "transB")


@dataclass(frozen=True)
class OnnxOp:
    """One ONNX op a layer type exports to.

    Attributes:
        op_type: the node's op type.
        weight_input: index of the weight initializer among the node's inputs.
        data_input: index of the activation input (quantized on the layer's input grid).
        bias_input: index of the bias, or None when the op has none (a bias then follows as
            its own node, e.g. MatMul + Add).
        layout: how the initializer holds the weight: ``as_is``, ``transposed`` (``W^T``,
            e.g. a MatMul after the exporter folded the transpose) or ``transB`` (``W^T``
            unless the Gemm's ``transB`` attribute is set).
        float_output: ONNX Runtime's integer kernel for it may keep a float output (QGemm,
            MatMulIntegerToFloat), so the output needs no calibrated grid.
        lookup: the op selects rows of the weight by its data input (``Gather``): the integer
            codes, scales and zero-points are gathered and only the rows read are dequantized
            (``(q - zp) * scale``, exact), instead of the whole table on every run.
    """

    op_type: str
    weight_input: int = 1
    data_input: int = 0
    bias_input: int | None = 2
    layout: str = "as_is"
    float_output: bool = False
    lookup: bool = False

    def __post_init__(self) -> None:
        if self.layout not in _LAYOUTS:
            raise ValueError(
                f"layout={self.layout!r} is not allowed; allowed values: {', '.join(_LAYOUTS)}"
            )


#: Given a torch.ao quantized module with its weight set, a function computing the layer's float
#: output from its float input and the input grid (scale, zero-point), on integer kernels.
FloatOutput = Callable[[nn.Module], Callable[[Tensor, float, int], Tensor]]


@dataclass(frozen=True)
class LayerDeployment:
    """How one layer type deploys on both backends (see :func:`register_deployment`)."""

    float_type: type[nn.Module]
    onnx: tuple[OnnxOp, ...]
    x86: Callable[[nn.Module], nn.Module | None] | None = None
    integer_kernel: bool = True
    input_rank: int | None = None
    x86_float_output: FloatOutput | None = None
    export_as: type[nn.Module] | None = None
    primitive: str = "forward"

    def onnx_op(self, op_type: str) -> OnnxOp | None:
        """The declaration of ``op_type``, if this type exports to it."""
        return next((o for o in self.onnx if o.op_type == op_type), None)


_DEPLOYMENTS: dict[type[nn.Module], LayerDeployment] = {}


def register_deployment(
    float_type: type[nn.Module],
    *,
    onnx: Sequence[OnnxOp],
    x86: Callable[[nn.Module], nn.Module | None] | None = None,
    integer_kernel: bool = True,
    input_rank: int | None = None,
    x86_float_output: FloatOutput | None = None,
    export_as: type[nn.Module] | None = None,
    primitive: str = "forward",
) -> LayerDeployment:
    """Declare how ``float_type`` layers deploy (replacing an earlier declaration).

    Args:
        float_type: the float module class (what ``@register_quantizable`` wraps).
        onnx: the ONNX ops its TorchScript export gives, e.g. a Linear exports as ``Gemm``
            (2-D input) or ``MatMul`` + ``Add`` (other ranks).
        x86: builds an empty ``torch.ao.nn.quantized`` module from a float layer (weights are
            set by the backend: ``set_weight_bias`` for an integer kernel, ``set_weight`` with
            an 8-bit rowwise ``quint8`` table for a weight-only type), or returns None where x86
            has no kernel for it; None: always simulated in float.
        integer_kernel: False for a weight-only type (no integer kernel whatever the plan: its
            input must stay float; the weight is dequantized at run time).
        input_rank: rank of the layer's input, for per-channel input bounds (default: the
            weight's rank, as for convolutions).
        x86_float_output: the x86 module can give a float output straight from its integer
            kernel (``fbgemm``'s int8 linear with an fp32 output): the output then needs no
            calibrated grid where no exact one follows (as ONNX Runtime's ``float_output``).
        export_as: a subclass of ``float_type`` whose ``forward`` exports to the declared ops
            where the type's own does not (the ONNX export swaps the class of the layer's float
            copy; same parameters). It may raise :class:`~autoquant.types.PlanError` for a call
            it cannot export so (its ``deployed_name`` attribute holds the layer's name).
        primitive: the method of ``float_type`` the simulation intercepts (``forward``, or
            ``_conv_forward(input, weight, bias)`` for convolutions): in a subclass with a
            forward of its own, the x86 kernel takes its place, so the subclass's forward still
            runs around it. A ``forward`` primitive passes its other arguments on to the kernel
            (an embedding bag's offsets); another gives the kernel its first argument only.

    Example:
        >>> class Scale(nn.Linear):  # a subclass deploys like nn.Linear ...
        ...     pass
        >>> deployment_of(Scale(2, 2)).float_type is nn.Linear
        True
    """
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise TypeError(f"float_type must be an nn.Module subclass, got {float_type!r}")
    ops = tuple(onnx)
    if not ops or not all(isinstance(o, OnnxOp) for o in ops):
        raise ValueError(f"onnx={onnx!r} is not allowed; allowed values: one or more OnnxOp")
    if export_as is not None and not (
        isinstance(export_as, type) and issubclass(export_as, float_type)
    ):
        raise ValueError(
            f"export_as={export_as!r} is not allowed; allowed values: None or a subclass of "
            f"{float_type.__name__}"
        )
    if not callable(getattr(float_type, primitive, None)):
        raise ValueError(
            f"primitive={primitive!r} is not allowed; allowed values: a method of "
            f"{float_type.__name__}"
        )
    dep = LayerDeployment(
        float_type, ops, x86, integer_kernel, input_rank, x86_float_output, export_as, primitive
    )
    _DEPLOYMENTS[float_type] = dep
    return dep


def unregister_deployment(float_type: type[nn.Module]) -> None:
    """Remove ``float_type``'s declaration (tests, plug-ins)."""
    _DEPLOYMENTS.pop(float_type, None)


def deployment_of(module: nn.Module | type[nn.Module]) -> LayerDeployment | None:
    """The declaration for a layer (or its class; a fake-quant wrapper counts as its float
    type), from the nearest registered class in its MRO; None when there is none."""
    cls = module if isinstance(module, type) else type(module)
    cls = getattr(cls, "float_type", cls)
    for base in cls.__mro__:
        if base in _DEPLOYMENTS:
            return _DEPLOYMENTS[base]
    return None


def deployments() -> dict[type[nn.Module], LayerDeployment]:
    """A copy of the registry."""
    return dict(_DEPLOYMENTS)


# Built-in types ------------------------------------------------------------------------------
def _x86_linear(f: nn.Module) -> nn.Module | None:
    import torch.ao.nn.quantized as nnq

    assert isinstance(f, nn.Linear)
    return nnq.Linear(f.in_features, f.out_features, bias_=f.bias is not None)


def _x86_conv(f: nn.Module) -> nn.Module | None:
    import torch.ao.nn.quantized as nnq

    assert isinstance(f, (nn.Conv1d, nn.Conv2d))
    if f.padding_mode != "zeros" or isinstance(f.padding, str):
        return None
    cls = nnq.Conv2d if isinstance(f, nn.Conv2d) else nnq.Conv1d
    return cls(
        f.in_channels,
        f.out_channels,
        f.kernel_size,
        stride=f.stride,
        padding=f.padding,
        dilation=f.dilation,
        groups=f.groups,
        bias=f.bias is not None,
    )


def _x86_linear_float_output(q: nn.Module) -> Callable[[Tensor, float, int], Tensor]:
    import torch

    packed = q._packed_params._packed_params  # type: ignore[union-attr]
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return lambda x, scale, zero_point: op(x, scale, zero_point, packed)


def _x86_embedding(f: nn.Module) -> nn.Module | None:
    import torch.ao.nn.quantized as nnq

    assert isinstance(f, nn.Embedding)
    return nnq.Embedding(f.num_embeddings, f.embedding_dim, padding_idx=f.padding_idx)


def _x86_embedding_bag(f: nn.Module) -> nn.Module | None:
    import torch.ao.nn.quantized as nnq

    assert isinstance(f, nn.EmbeddingBag)
    # torch.ao's 8-bit rowwise bag reduces exactly by sum only (its mean and max are wrong in
    # torch 2.13, checked), and has no padding_idx (which leaves rows out of a bag).
    if f.mode != "sum" or f.padding_idx is not None:
        return None
    return nnq.EmbeddingBag(
        f.num_embeddings, f.embedding_dim, mode="sum", include_last_offset=f.include_last_offset
    )


class BagAsGather(nn.EmbeddingBag):
    """``nn.EmbeddingBag`` with fixed-size bags (a 2-D input, no offsets) computed as a lookup
    then a reduction over the bag axis, which exports as ``Gather`` -> ``ReduceSum`` /
    ``ReduceMean`` / ``ReduceMax`` (PyTorch's own export of a bag is a ``Loop``)."""

    deployed_name = ""

    def forward(
        self,
        input: Tensor,
        offsets: Tensor | None = None,
        per_sample_weights: Tensor | None = None,
    ) -> Tensor:
        if input.dim() != 2 or offsets is not None or self.padding_idx is not None:
            raise PlanError(
                f"layer {self.deployed_name!r} (EmbeddingBag) deploys on ONNX Runtime with "
                "fixed-size bags only: a 2-D input of indices, offsets=None and "
                f"padding_idx=None (got a {input.dim()}-D input, offsets "
                f"{'given' if offsets is not None else 'None'}, padding_idx={self.padding_idx})"
            )
        rows = F.embedding(input, self.weight)
        if per_sample_weights is not None:
            rows = rows * per_sample_weights.unsqueeze(-1)
        if self.mode == "sum":
            return rows.sum(1)
        return rows.mean(1) if self.mode == "mean" else rows.amax(1)


register_deployment(
    nn.Linear,
    onnx=[
        OnnxOp("Gemm", layout="transB", float_output=True),
        OnnxOp("MatMul", bias_input=None, layout="transposed", float_output=True),
    ],
    x86=_x86_linear,
    input_rank=2,
    x86_float_output=_x86_linear_float_output,
)
register_deployment(nn.Conv1d, onnx=[OnnxOp("Conv")], x86=_x86_conv, primitive="_conv_forward")
register_deployment(nn.Conv2d, onnx=[OnnxOp("Conv")], x86=_x86_conv, primitive="_conv_forward")
register_deployment(
    nn.Embedding,
    onnx=[OnnxOp("Gather", weight_input=0, data_input=1, bias_input=None, lookup=True)],
    x86=_x86_embedding,
    integer_kernel=False,
)
register_deployment(
    nn.EmbeddingBag,
    onnx=[OnnxOp("Gather", weight_input=0, data_input=1, bias_input=None, lookup=True)],
    x86=_x86_embedding_bag,
    integer_kernel=False,
    export_as=BagAsGather,
)
