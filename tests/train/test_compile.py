"""Compiled QAT and evaluation: no recompilation across plans of one architecture, the eager
fallback, and compiled vs eager trial metrics."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.tasks import get_task
from autoquant.train import compiled_graphs, evaluate, qat_finetune
from autoquant.train._compile import gradient_mismatch, share_fx_class
from autoquant.transform import (
    apply_plan,
    calibration,
    quantizable_layers,
    strip_add_quantizers,
)
from autoquant.types import LayerPlan, QuantPlan, QuantSpec


class _Net(nn.Module):
    """Conv-BN-ReLU, a residual add, a linear head: the structures a ResNet trial has."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h) + h)
        return self.fc(h.mean(dim=(2, 3)))


NAMES = ["conv1", "conv2", "fc"]


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.arange(8) % 4) for _ in range(2)]


def _plans(learned: bool) -> list[QuantPlan]:
    """Five plans that differ in bits, symmetry, granularity and calibration (so in every scale
    value), all of one structure: quantized convs, linear and adds. (8-bit activations would be
    another structure: an add's output then shares the next conv's input grid.)"""
    out = []
    for wb, ab, gran, sym, calib in [
        (8, 7, "per_channel", False, "minmax"),
        (4, 6, "per_tensor", True, "percentile"),
        (2, 4, "per_channel", False, "mse"),
        (3, 5, "per_tensor", False, "minmax"),
        (6, 7, "per_channel", True, "percentile"),
    ]:
        w = QuantSpec(bits=wb, granularity=gran, learned_scale=learned)
        a = QuantSpec(bits=ab, symmetric=sym, calibration=calib, axis=1, learned_scale=learned)
        out.append(
            QuantPlan({n: LayerPlan(w, a) for n in NAMES}, adds=QuantSpec(bits=8, symmetric=False))
        )
    return out


def _trial(model: nn.Module, plan: QuantPlan, compile: bool | str, steps: int = 2) -> tuple:
    torch.manual_seed(0)
    data = _data()
    q = apply_plan(model, plan)
    with calibration(q):
        for x, _ in data:
            q(x)
    rec_qat: dict = {}
    rec_eval: dict = {}
    history = qat_finetune(
        q,
        data,
        F.cross_entropy,
        steps=steps,
        lr=1e-3,
        optimizer="adam",
        compile=compile,
        record=rec_qat,
    )
    acc = evaluate(q, data, compile=compile, record=rec_eval)
    return history, acc, rec_qat["compile"], rec_eval["compile"]


@pytest.fixture
def fast_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo's guards and recompilations do not depend on the backend: ``aot_eager`` traces
    forward and backward like Inductor but skips code generation (seconds, not a minute)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()


@pytest.mark.parametrize("learned", [False, True], ids=["frozen", "lsq"])
def test_plans_of_one_architecture_compile_once(fast_compile: None, learned: bool) -> None:
    model = _Net().eval()
    graphs = []
    for plan in _plans(learned):
        _, _, qat_info, eval_info = _trial(model, plan, compile=True)
        assert qat_info["used"] and eval_info["used"] and qat_info["fallback"] is None
        graphs.append((qat_info["graphs_compiled"], eval_info["graphs_compiled"]))
    first, rest = graphs[0], graphs[1:]
    assert first[0] >= 1 and first[1] >= 1  # QAT (forward+backward) and evaluation compiled once
    # Then reused: no recompilation for new bits, symmetry, calibration or scales. Frozen
    # per-tensor weight qparams are expanded per channel (granularity is data); a learned
    # per-tensor scale is a 0-dim parameter, a per-channel one [C]: two structures for LSQ.
    expected = [(1, 1), (0, 0), (0, 0), (0, 0)] if learned else [(0, 0)] * 4
    assert rest == expected, graphs
    before = compiled_graphs()
    _trial(model, _plans(learned)[2], compile=True)
    assert compiled_graphs() == before


def test_compiled_forward_matches_eager_and_auto_stays_eager_on_cpu(fast_compile: None) -> None:
    model = _Net().eval()
    plan = _plans(False)[2]
    eager = _trial(model, plan, compile=False)
    compiled = _trial(model, plan, compile=True)
    auto = _trial(model, plan, compile="auto")
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5) and compiled[1] == eager[1]
    assert auto[2] == {"requested": False, "used": False, "fallback": None, "graphs_compiled": 0}
    with pytest.raises(ValueError, match="compile='yes' is not allowed; allowed values: 'auto'"):
        qat_finetune(model, _data(), F.cross_entropy, steps=1, lr=0.1, compile="yes")


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        raise RuntimeError("backward codegen failed")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failing_compile_falls_back_to_eager_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    def broken_compile(model: nn.Module, **kwargs: object):
        def run(*args: torch.Tensor) -> torch.Tensor:
            if where == "forward":
                raise RuntimeError("forward codegen failed")
            return _FailingBackward.apply(model(*args))

        return run

    model = _Net().eval()
    plan = _plans(False)[1]
    eager = _trial(model, plan, compile=False, steps=3)
    monkeypatch.setattr(torch, "compile", broken_compile)
    fallen = _trial(model, plan, compile=True, steps=3)
    assert fallen[0] == eager[0] and fallen[1] == eager[1]  # the failed step was redone eagerly
    assert fallen[2]["requested"] and not fallen[2]["used"]
    assert fallen[2]["fallback"] == f"RuntimeError: {where} codegen failed"


def test_compiled_gradients_that_disagree_with_eager_fall_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compiled code that runs but passes no gradient to the weights (as torch 2.11 on CUDA
    did) is caught on the first step: that step keeps the eager gradients, the rest runs
    eagerly, so the run equals an eager one."""

    def silent_compile(model: nn.Module, **kwargs: object):
        return lambda x: model(x).detach() + model.fc.bias  # only the head's bias learns

    model = _Net().eval()
    plan = _plans(True)[1]
    eager = _trial(model, plan, compile=False, steps=3)
    monkeypatch.setattr(torch, "compile", silent_compile)
    fallen = _trial(model, plan, compile=True, steps=3)
    assert fallen[0] == eager[0] and fallen[1] == eager[1]
    assert fallen[2]["requested"] and not fallen[2]["used"]
    assert fallen[2]["fallback"].startswith("compiled gradients disagree with eager: no gradient")


def test_gradient_mismatch_tolerates_noise_and_flags_a_wrong_direction() -> None:
    net = nn.Linear(4, 2)
    net(torch.randn(3, 4)).sum().backward()
    ref = {n: p.grad.clone() for n, p in net.named_parameters()}
    for p in net.parameters():  # bf16-sized rounding noise: still the same gradient
        p.grad = p.grad.to(torch.bfloat16).float()
    assert gradient_mismatch(net, ref) is None
    for p in net.parameters():
        p.grad = -p.grad
    assert gradient_mismatch(net, ref) == "gradient cosine similarity -1.00 with eager"
    net.bias.grad = torch.full_like(net.bias, float("nan"))
    assert gradient_mismatch(net, ref) == "non-finite gradient for bias"


@pytest.mark.slow
def test_compiled_and_eager_trials_give_the_same_metrics() -> None:
    """Inductor on a real task. Tolerance: step 0 runs the same float32 math (rel 1e-5);
    afterwards Inductor's fused kernels sum in another order, parameters differ by ~1e-7
    relative per step, and an occasional flipped rounding in a 4-bit fake-quant moves the loss
    by up to ~1e-3 over 60 steps (measured) - so 2e-2 absolute on the loss and one point of
    accuracy on 1797-sample digits' held-out set (~7 images)."""
    task = get_task("digits-cnn")
    model = task.model_factory()
    names = [i.name for i in quantizable_layers(model, task.example_input(1))]
    w4 = QuantSpec(bits=4, granularity="per_channel", learned_scale=True)
    a4 = QuantSpec(bits=4, symmetric=False, axis=1, learned_scale=True, learned_zero_point=True)
    plan = QuantPlan({n: LayerPlan(w4, a4) for n in names})
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        q = apply_plan(model, plan)
        with calibration(q):
            for x, _ in task.calib_batches(64)[:4]:
                q(x)
        rec: dict = {}
        history = qat_finetune(
            q,
            task.train_batches(64, seed=0),
            task.loss_fn,
            steps=60,
            lr=1e-3,
            optimizer="adam",
            quant_lr=1e-2,
            compile=compile,
            record=rec,
        )
        results.append((history, evaluate(q, task.eval_batches(), compile=compile), rec))
    (h_eager, acc_eager, _), (h_comp, acc_comp, rec) = results
    assert rec["compile"]["used"] and rec["compile"]["fallback"] is None
    assert h_comp[0] == pytest.approx(h_eager[0], rel=1e-5)
    assert max(abs(a - b) for a, b in zip(h_eager, h_comp, strict=True)) < 2e-2
    assert abs(acc_comp - acc_eager) <= 0.01


def test_graph_modules_with_equal_code_share_a_class_and_copies_stay_apart() -> None:
    model = _Net().eval()
    a, b = (apply_plan(model, p) for p in _plans(False)[1:3])
    assert isinstance(a, torch.fx.GraphModule) and type(a) is not type(b)
    share_fx_class(a)
    share_fx_class(b)
    assert type(a) is type(b)  # one class: Dynamo's type guard holds across trials
    x = _data()[0][0]
    with calibration(b):
        b(x)
    with torch.no_grad():
        before = b(x)
    c = copy.deepcopy(b)
    assert type(c) is not type(b)
    strip_add_quantizers(c)  # rewrites and recompiles the copy's graph, as measure does
    with torch.no_grad():
        assert torch.equal(b(x), before) and not torch.equal(c(x), before)
