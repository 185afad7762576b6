"""Distillation: the loss against a hand computation, teacher logits aligned with the steps the
QAT loop takes, and the logits cache (memory, disk, keys, prefixes)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.tasks import Task
from autoquant.train import (
    Distillation,
    TeacherLogitsCache,
    cached_teacher_logits,
    distillation_loss,
    materialize_batches,
    qat_finetune,
    teacher_key,
    teacher_logits,
)


def _hand_kd(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """Mean over samples of sum_c p_t log(p_t / p_s), both softmaxes at temperature t."""

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        ps, pt = softmax(s_row), softmax(t_row)
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    return total / len(student)


@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 4.0), (1.0, 2.0), (0.0, 1.0), (0.3, 1)])
def test_distillation_loss_matches_hand_computation(alpha: float, temperature: float) -> None:
    s = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]
    t = [[1.5, 0.0, -0.5], [-1.0, 2.0, 1.0]]
    task = torch.tensor(0.8)
    got = distillation_loss(torch.tensor(s), torch.tensor(t), task, alpha, temperature)
    expected = alpha * temperature**2 * _hand_kd(s, t, temperature) + (1 - alpha) * 0.8
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(Distillation(alpha, temperature).loss(torch.tensor(s), torch.tensor(t), task)) == (
        pytest.approx(expected, rel=1e-5)
    )


def test_distillation_gradient_pulls_the_student_towards_the_teacher() -> None:
    s = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    distillation_loss(s, torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor(0.0), 1.0, 1.0).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]  # descent raises class 0, lowers the others


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"alpha": 1.5},
            "distill.alpha=1.5 is not allowed; allowed values: a number in \\[0, 1\\]",
        ),
        ({"temperature": 0}, "distill.temperature=0"),
        ({"temperature": float("inf")}, "distill.temperature=inf"),
        ({"alpha": True}, "distill.alpha=True"),
    ],
)
def test_bad_distillation_settings_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Distillation(**kwargs)


def test_distillation_from_a_study_table() -> None:
    assert Distillation.from_dict({"alpha": 1, "temperature": 3}) == Distillation(1.0, 3.0)
    with pytest.raises(ValueError, match="unknown distill key\\(s\\) \\['t'\\]; allowed keys"):
        Distillation.from_dict({"t": 3})


def _task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (96, 6), generator=g, dtype=torch.uint8)
    y = torch.arange(96) % 3

    def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # random, seeded
        return xb.roll(int(torch.randint(0, 6, (1,), generator=gen)), dims=1)

    return Task.from_tensors(
        "toy",
        lambda: nn.Linear(6, 3).eval(),
        train=(x[:64], y[:64]),
        eval=(x[64:], y[64:]),
        preprocess=lambda xb: xb.float() / 255,
        augment=augment,
        batch_size=8,
    )


def test_cached_logits_equal_a_fresh_teacher_forward_on_the_batches_qat_sees(tmp_path) -> None:
    task = _task()
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    stream = {"task": "toy", "seed": 5, "batch_size": 8}

    def make() -> object:
        return task.train_batches(8, seed=5)

    first = TeacherLogitsCache(tmp_path).get(teacher, make, steps=12, stream=stream)
    fresh_cache = TeacherLogitsCache(tmp_path)  # new process: memory empty, disk warm
    again = fresh_cache.get(teacher, lambda: pytest.fail("recomputed"), steps=12, stream=stream)
    assert torch.equal(first, again) and fresh_cache.hits == 1 and fresh_cache.misses == 0
    # The batches the QAT loop actually trains on, captured through its loss function.
    seen: list[torch.Tensor] = []
    student = copy.deepcopy(teacher)
    student.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    qat_finetune(
        student,
        make(),
        F.cross_entropy,
        steps=12,
        lr=1e-3,
        distill=Distillation(0.5, 2.0),
        teacher_logits=again,
    )
    with torch.no_grad():
        expected = torch.stack([teacher(x) for x in seen])
    assert len(seen) == 12 and torch.equal(again, expected)


def test_first_distilled_step_uses_row_zero() -> None:
    task = _task()
    student = nn.Linear(6, 3)
    x0, y0 = next(task.train_batches(8, seed=0))
    logits = torch.randn(4, 8, 3)
    with torch.no_grad():
        out = student(x0)
        expected = float(distillation_loss(out, logits[0], F.cross_entropy(out, y0), 0.7, 3.0))
    history = qat_finetune(
        student,
        task.train_batches(8, seed=0),
        F.cross_entropy,
        steps=4,
        lr=1e-2,
        distill=Distillation(0.7, 3.0),
        teacher_logits=logits,
    )
    assert history[0] == pytest.approx(expected, rel=1e-6)


def test_cache_key_follows_weights_and_stream_and_requests_reuse_prefixes(tmp_path) -> None:
    teacher = nn.Linear(4, 2)
    data = [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)) for _ in range(3)]
    key = teacher_key(teacher, {"seed": 0})
    assert key == teacher_key(copy.deepcopy(teacher), {"seed": 0})
    assert key != teacher_key(teacher, {"seed": 1})
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.bias[0] += 1e-3
    assert key != teacher_key(changed, {"seed": 0})

    cache = TeacherLogitsCache(tmp_path)
    short = cache.get(teacher, lambda: data, steps=2, stream={"seed": 0})
    longer = cache.get(teacher, lambda: data, steps=7, stream={"seed": 0})  # recomputed
    again = cache.get(teacher, lambda: pytest.fail("recomputed"), steps=5, stream={"seed": 0})
    assert (cache.misses, cache.hits) == (2, 1)
    assert torch.equal(longer[:2], short) and torch.equal(again, longer[:5])
    assert torch.equal(longer[3], longer[0])  # a list of 3 batches is cycled, as QAT does
    assert torch.load(cache.path(key), weights_only=True).shape == (7, 5, 2)
    assert longer.dtype == torch.float32 and longer.nbytes == 7 * 5 * 2 * 4


def test_corrupt_cache_file_is_recomputed(tmp_path) -> None:
    teacher = nn.Linear(4, 2)
    data = [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))]
    path = TeacherLogitsCache(tmp_path).path(teacher_key(teacher, {"s": 1}))
    path.write_bytes(b"not a tensor")
    out = cached_teacher_logits(teacher, lambda: data, steps=2, stream={"s": 1}, cache_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(out[1], teacher(data[0][0]))
    assert torch.load(path, weights_only=True).shape == (2, 5, 2)


def test_teacher_logits_restore_mode_and_reject_ragged_batches() -> None:
    teacher = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5)).train()
    data = [(torch.randn(5, 4), torch.zeros(5)), (torch.randn(3, 4), torch.zeros(3))]
    with pytest.raises(ValueError, match="batches of one size: step 1"):
        teacher_logits(teacher, data, steps=2)
    assert teacher.training
    out = teacher_logits(teacher, data[:1], steps=2)
    assert torch.equal(out[0], out[1])  # eval mode: dropout off, deterministic


def test_distill_arguments_are_checked() -> None:
    data = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))]
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="distill needs teacher_logits"):
        qat_finetune(net, data, F.cross_entropy, steps=1, lr=0.1, distill=Distillation())
    with pytest.raises(ValueError, match="without distill"):
        qat_finetune(net, data, F.cross_entropy, steps=1, lr=0.1, teacher_logits=torch.zeros(1))
    with pytest.raises(ValueError, match="at least steps=3 rows; got \\(2, 4, 2\\)"):
        qat_finetune(
            net,
            data,
            F.cross_entropy,
            steps=3,
            lr=0.1,
            distill=Distillation(),
            teacher_logits=torch.zeros(2, 4, 2),
        )
    with pytest.raises(ValueError, match="one shape \\[N, classes\\]"):
        qat_finetune(
            net,
            data,
            F.cross_entropy,
            steps=1,
            lr=0.1,
            distill=Distillation(),
            teacher_logits=torch.zeros(1, 4, 5),
        )


def test_materialized_stream_gives_a_trial_the_same_batches() -> None:
    task = _task()
    kept = materialize_batches(task.train_batches(8, seed=3), 6)
    live = task.train_batches(8, seed=3)
    for x, y in kept:
        lx, ly = next(live)
        assert torch.equal(x, lx) and torch.equal(y, ly)
    net_a, net_b = nn.Linear(6, 3), nn.Linear(6, 3)
    net_b.load_state_dict(net_a.state_dict())
    ha = qat_finetune(net_a, kept, F.cross_entropy, steps=6, lr=0.1)
    hb = qat_finetune(net_b, task.train_batches(8, seed=3), F.cross_entropy, steps=6, lr=0.1)
    assert ha == hb
