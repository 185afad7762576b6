"""Where each integer layer's output goes: onto the next grid exactly, calibrated, or float.

The chains (which grid a layer's output reaches) are found on either graph with the same rules
and walk (:mod:`autoquant.transform._grid_rules`): over the ONNX export for ONNX Runtime
(:func:`autoquant.measure.onnx.layer_chains`) and over the ``torch.fx`` graph for torch-x86
(:func:`fx_chains`), which therefore needs no ``onnx``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import fx, nn

from autoquant.measure._deploy import DeployedLayer, IntQ, output_ranges, uint8_qparams
from autoquant.measure._formats import act_storage
from autoquant.quant import FakeQuantize
from autoquant.transform import (
    IDENTITY_RULE,
    RELU_RULE,
    GridUse,
    Inputs,
    QuantizedLayer,
    fx_reads_shape_only,
    fx_rule,
    has_own_forward,
    reached_grid,
    trace_quantized,
)


@dataclass(frozen=True)
class Requant:
    """How an integer layer's output is quantized (integer kernels produce integer outputs).

    ``mode`` is ``exact`` (every consumer the output reaches through ops that commute with
    quantization reads it on one grid: a quantized layer's input grid, or the grid of a
    quantized add's operand or output; the output is quantized straight onto it, which adds
    no rounding), ``calibrated`` (an 8-bit grid from the output range observed on the
    calibration inputs: an extra, small rounding step the simulation does not have) or
    ``float`` (no output quantization). ``grid`` names the exact grid's qparams
    (``<grid>_scale``); ``consumer`` is the layer whose input grid it is, if any.
    ``after_relu``: the grid is applied after the ReLU that follows the layer (a calibrated
    ``[0, max]`` grid, or an exact grid whose lowest code is 0).
    """

    mode: str
    q: IntQ | None = None
    consumer: str | None = None
    after_relu: bool = False
    grid: str | None = None

    def describe(self, backend: str) -> str:
        if self.mode == "exact":
            where = f"{self.consumer}'s input grid" if self.consumer else f"the {self.grid} grid"
            return f"{act_storage(self.q.storage, backend)} on {where}"
        if self.mode == "calibrated":
            return f"{act_storage('uint8', backend)} (calibrated range)"
        return "float"


def layer_grid(name: str) -> str:
    """Grid id of a layer's input quantizer (the FQN of its ``act_fq``)."""
    return f"{name}.act_fq"


def grid_prefix(grid: str) -> str:
    """Prefix of a grid's qparam names: a layer's quantizer loses its ``_fq`` (``conv.act_fq``
    -> ``conv.act``, ``mha.matmul.key_fq`` -> ``mha.matmul.key``), others are unchanged."""
    return grid[: -len("_fq")] if is_layer_grid(grid) else grid


def is_layer_grid(grid: str) -> bool:
    """The grid is a layer's own input quantizer (``<layer>.<operand>_fq``), whose qparams the
    size counts (roles ``act_scale``/``act_zero_point``), not a quantized add's."""
    return grid.endswith("_fq")


def plan_requant(
    layers: Mapping[str, DeployedLayer],
    chains: Mapping[str, tuple[str | None, bool]],
    ranges: Mapping[str, tuple[float, float]],
    *,
    float_output_ok: set[str],
    grids: Mapping[str, IntQ] | None = None,
) -> dict[str, Requant]:
    """Choose each integer layer's output quantization.

    Args:
        layers: the deployed layers.
        chains: per integer layer ``(grid, starts_with_relu)``: ``grid`` is the one grid id
            (see :func:`layer_grid`) every consumer of its output reads, through
            quantization-commuting ops, or None.
        ranges: observed output ranges (min, max) of each integer layer.
        float_output_ok: layers whose integer kernel may have a float output (ONNX Runtime's
            QGemm / MatMulIntegerToFloat): they get no calibrated requantization.
        grids: integer grids other than the layers' input grids (quantized adds), by id.
    """
    known = {layer_grid(n): dl.act_q for n, dl in layers.items() if dl.act_q is not None}
    known.update(grids or {})
    out: dict[str, Requant] = {}
    for name, layer in layers.items():
        if not layer.format.int_kernel:
            continue
        grid, relu = chains.get(name, (None, False))
        q = known.get(grid) if grid else None
        if q is not None and q.axis is None:
            consumer = grid[: -len(".act_fq")] if grid.endswith(".act_fq") else None
            # After a following ReLU when the grid starts at 0 (the ReLU is then implied).
            after = relu and int(q.zero_point) == q.qmin
            out[name] = Requant("exact", q, consumer, after, grid_prefix(grid))
        elif name in float_output_ok:
            out[name] = Requant("float")
        else:
            lo, hi = ranges.get(name, (0.0, 1.0))
            if relu:
                lo = 0.0
            out[name] = Requant("calibrated", uint8_qparams(lo, hi), after_relu=relu)
    return out


def fx_chains(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[str | None, bool]]:
    """Per named layer of a fake-quant ``model``: the one grid (:func:`layer_grid`, or an add
    quantizer's target) every reader of its output reads it on, and whether its only reader is
    a ReLU; over the model's ``torch.fx`` graph. Empty when ``torch.fx`` cannot trace the model
    (every integer output then gets a calibrated grid)."""
    try:
        gm = trace_quantized(model)
    except Exception:  # noqa: BLE001 - any tracing failure: no exact grids
        return {}

    def module(node: fx.Node) -> nn.Module | None:
        return gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def readers(node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if not fx_reads_shape_only(u)]

    def uses(node: fx.Node) -> list[GridUse]:
        out = []
        for user in readers(node):
            mod = module(user)
            if user.op == "output":
                return []
            if (
                isinstance(mod, QuantizedLayer)
                and user.args
                and user.args[0] is node
                and not has_own_forward(mod)
            ):
                out.append(GridUse(grid=layer_grid(str(user.target))))
            elif isinstance(mod, FakeQuantize):
                out.append(GridUse(grid=str(user.target)))
            elif user.args and user.args[0] is node and fx_rule(gm, user) is not None:
                out.append(GridUse(passes=user))
            else:
                out.append(GridUse())
        return out

    def relu_follows(node: fx.Node) -> bool:
        # Through identities (a folded BatchNorm): the ONNX export has no node for them.
        while len(users := readers(node)) == 1 and fx_rule(gm, users[0]) is IDENTITY_RULE:
            node = users[0]
        users = readers(node)
        return len(users) == 1 and fx_rule(gm, users[0]) is RELU_RULE

    def chain(node: fx.Node) -> tuple[str | None, bool]:
        if has_own_forward(module(node)):  # type: ignore[arg-type]
            return None, False  # its own forward runs between the kernel and the readers
        return reached_grid(node, uses), relu_follows(node)

    wanted = set(names)
    return {
        str(n.target): chain(n)
        for n in gm.graph.nodes
        if n.op == "call_module" and str(n.target) in wanted
    }


def choose_requant(
    model: nn.Module,
    layers: Mapping[str, DeployedLayer],
    chains: Mapping[str, tuple[str | None, bool]],
    grids: Mapping[str, IntQ],
    inputs: Iterable[Inputs],
    *,
    float_output_ok: set[str],
) -> dict[str, Requant]:
    """:func:`plan_requant` with the output ranges of the integer layers observed on
    ``inputs`` (the calibration batches)."""
    need = [n for n, dl in layers.items() if dl.format.int_kernel]
    ranges = output_ranges(model, need, inputs) if need else {}
    return plan_requant(layers, chains, ranges, float_output_ok=float_output_ok, grids=grids)
