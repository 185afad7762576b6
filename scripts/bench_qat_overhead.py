"""How much does a QAT training step cost compared with a float32 step?

Trains a CIFAR-shaped ResNet-20 (3x32x32, random data: only the time matters) with:

* ``float32``: the float model, BatchNorm in training mode (the baseline);
* ``float32-folded``: the float model with BN folded (what autoquant's QAT model computes,
  minus the fake-quant) - shows how much of the difference comes from dropping BN;
* ``torch.ao-qat``: ``torch.ao.quantization`` eager QAT, conv-bn(-relu) fused with
  ``fuse_modules_qat``, ``prepare_qat`` with the x86 QAT qconfig (observers on, as in a normal
  QAT run);
* ``torch.ao-qat-frozen``: the same with observers disabled (ranges frozen, as autoquant does);
* ``autoquant-w8a8`` / ``autoquant-w4a8``: ``apply_plan`` (weights per-channel symmetric,
  activations per-tensor asymmetric) after a calibration pass;
* ``autoquant-w4a8-lsq``: the same with learned scales (LSQ) and activation zero-points (LSQ+);
* ``--compile``: ``<variant>+compiled`` for the folded float model and the autoquant variants,
  ``torch.compile`` (Inductor) of the model, forward and backward; the first (compiling) steps
  are timed apart and reported as the compile cost;
* ``--channels-last``: ``<variant>+cl`` for the folded float model and ``autoquant-w4a8``, with
  model and input in ``torch.channels_last`` (oneDNN's native layout: no reorders per conv).

Each step is forward + cross-entropy + backward + SGD step. After warm-up, rounds run one step
of every variant in a rotating order, so machine noise hits all variants alike; the script
prints the median (and quartiles) of each variant, its ratio to ``float32`` and to the
**folded** float model (what the fake-quant model computes without fake-quant: the fake-quant
cost proper), and the same for the fastest step (the least disturbed one on a busy machine).

Usage:
    .venv/bin/python scripts/bench_qat_overhead.py --threads 2 --rounds 40 --compile
    .venv/bin/python scripts/bench_qat_overhead.py --rounds 2 --warmup 1 --compile  # smoke run
    .venv/bin/python scripts/bench_qat_overhead.py --device cuda --batch-size 256 --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao import quantization as tq
from torch.ao.nn.quantized import FloatFunctional

from autoquant.transform import apply_plan, calibration, fold_batchnorm, quantizable_layers
from autoquant.types import QuantPlan, QuantSpec


class BasicBlock(nn.Module):
    """ResNet basic block with the option-A shortcut (stride-2 subsample, zero channel pad)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.add = FloatFunctional()  # a plain add in float; observed by torch.ao QAT
        self.pad = planes - in_planes
        self.stride = stride

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add.add(out, self.shortcut(x)))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.quant(x))))
        x = self.pool(self.layers(x)).flatten(1)
        return self.dequant(self.fc(x))


def torch_ao_qat(model: nn.Module) -> nn.Module:
    model = model.train()
    groups = [["conv1", "bn1", "relu"]]
    for i in range(len(model.layers)):
        groups += [
            [f"layers.{i}.conv1", f"layers.{i}.bn1", f"layers.{i}.relu1"],
            [f"layers.{i}.conv2", f"layers.{i}.bn2"],
        ]
    model = tq.fuse_modules_qat(model, groups)
    model.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(model)


def autoquant_qat(
    model: nn.Module, weight_bits: int, calib: list[Tensor], learned: bool = False
) -> nn.Module:
    names = [i.name for i in quantizable_layers(model, calib[0][:1])]
    plan = QuantPlan.uniform(
        names,
        QuantSpec(bits=weight_bits, granularity="per_channel", learned_scale=learned),
        QuantSpec(bits=8, symmetric=False, learned_scale=learned, learned_zero_point=learned),
    )
    q = apply_plan(model, plan)
    with calibration(q):
        for x in calib:
            q(x)
    return q.train()


def make_step(model: nn.Module, x: Tensor, y: Tensor, compiled: bool = False) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    run = torch.compile(model) if compiled else model
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        opt.step()
        sync()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--profile", default="", help="print a torch.profiler table for a variant")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd variants")
    ap.add_argument("--channels-last", action="store_true", help="add channels_last variants")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)

    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    base = ResNet20().train()
    with torch.no_grad():  # non-trivial BN statistics, so folding is not an identity
        for _ in range(3):
            base(torch.randn(args.batch_size, 3, 32, 32))
    base.eval()
    calib = [torch.randn(args.batch_size, 3, 32, 32) for _ in range(2)]

    variants = {
        "float32": copy.deepcopy(base).train(),
        "float32-folded": fold_batchnorm(base).train(),
    }
    if dev.type == "cpu":  # torch.ao's eager QAT runs on the CPU only
        ao = torch_ao_qat(ResNet20().train())
        ao_frozen = torch_ao_qat(ResNet20().train())
        ao_frozen.apply(tq.disable_observer)
        variants |= {"torch.ao-qat": ao, "torch.ao-qat-frozen": ao_frozen}
    variants |= {
        "autoquant-w8a8": autoquant_qat(base, 8, calib),
        "autoquant-w4a8": autoquant_qat(base, 4, calib),
        "autoquant-w4a8-lsq": autoquant_qat(base, 4, calib, learned=True),
    }
    steps = {name: make_step(m.to(dev), x.to(dev), y.to(dev)) for name, m in variants.items()}
    if args.channels_last:
        cl = torch.channels_last
        xc = x.to(dev).contiguous(memory_format=cl)
        for name in ("float32-folded", "autoquant-w4a8"):
            m = copy.deepcopy(variants[name]).to(dev, memory_format=cl)
            steps[f"{name}+cl"] = make_step(m, xc, y.to(dev))
    compile_s: dict[str, float] = {}
    if args.compile:
        for name in ("float32-folded", "autoquant-w8a8", "autoquant-w4a8", "autoquant-w4a8-lsq"):
            m = copy.deepcopy(variants[name]).to(dev)
            step = make_step(m, x.to(dev), y.to(dev), compiled=True)
            t0 = time.perf_counter()
            step()  # compiles forward and backward
            compile_s[f"{name}+compiled"] = time.perf_counter() - t0
            steps[f"{name}+compiled"] = step

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for _ in range(3):
            steps[args.profile]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                steps[args.profile]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)

    ref = statistics.median(times["float32"])
    ref_min = min(times["float32"])
    folded = statistics.median(times["float32-folded"])
    folded_min = min(times["float32-folded"])
    where = f"CUDA ({torch.cuda.get_device_name()})" if dev.type == "cuda" else "CPU"
    print(
        f"ResNet-20, batch {args.batch_size}, 3x32x32, {where}, {args.threads} threads, "
        f"torch {torch.__version__}, {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up steps"
    )
    print(
        f"{'variant':<32}{'median ms':>10}{'q25':>8}{'q75':>8}{'x float32':>11}{'x folded':>10}"
        f"{'min ms':>9}{'x (min)':>9}{'x folded (min)':>16}"
    )
    for name, ts in times.items():
        q1, _, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0], ts[0], ts[0])
        med = statistics.median(ts)
        print(
            f"{name:<32}{med * 1e3:>10.1f}{q1 * 1e3:>8.1f}{q3 * 1e3:>8.1f}{med / ref:>11.2f}"
            f"{med / folded:>10.2f}{min(ts) * 1e3:>9.1f}{min(ts) / ref_min:>9.2f}"
            f"{min(ts) / folded_min:>16.2f}"
        )
    for name, secs in compile_s.items():
        print(f"compile time (first step) of {name}: {secs:.1f} s")


if __name__ == "__main__":
    main()
