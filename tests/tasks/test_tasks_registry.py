from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from autoquant.tasks import BUILTIN_TASKS, Task, TaskError, get_task

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from autoquant.tasks import Task

    def make(n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, 3, generator=g), torch.arange(n) % 2
        half = n // 2
        return Task.from_tensors("user-toy", lambda: nn.Linear(3, 2).eval(),
                                 train=(x[:half], y[:half]), eval=(x[half:], y[half:]),
                                 calib_size=8, batch_size=4)

    def not_a_task():
        return 42

    CONSTANT = 3
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "aq_user_tasks.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "aq_user_tasks"


def test_unknown_name_lists_builtins_and_import_form() -> None:
    with pytest.raises(TaskError) as info:
        get_task("resnet9000")
    msg = str(info.value)
    assert all(name in msg for name in BUILTIN_TASKS)
    assert "package.module:function" in msg
    assert set(BUILTIN_TASKS) == {
        "digits-cnn",
        "mnist-lenet5",
        "cifar10-resnet20",
        "cifar10-resnet32",
        "cifar10-resnet56",
        "sst2-minilm",
    }


def test_import_path_task_with_options(user_module: str) -> None:
    task = get_task(f"{user_module}:make", n=60)
    assert isinstance(task, Task) and task.name == "user-toy"
    assert task.info == {"train_size": 30, "calib_size": 8, "eval_size": 30}
    assert [len(y) for _, y in task.calib_batches()] == [4, 4]
    assert task.measure_float_accuracy() == task.float_accuracy
    assert 0.0 <= task.float_accuracy <= 1.0


@pytest.mark.parametrize(
    ("path", "options", "match"),
    [
        ("{m}:make", {"bogus": 1}, "allowed options: n, seed"),
        ("{m}:not_a_task", {}, "returned a int"),
        ("{m}:missing", {}, "no attribute"),
        ("{m}:CONSTANT", {}, "not a function"),
        ("no_such_module_xyz:make", {}, "cannot import"),
        (":make", {}, "import path"),
    ],
)
def test_bad_import_paths(user_module: str, path: str, options: dict, match: str) -> None:
    with pytest.raises(TaskError, match=match):
        get_task(path.format(m=user_module), **options)


def test_builtin_rejects_unknown_option() -> None:
    with pytest.raises(TaskError, match="eval_size"):
        get_task("digits-cnn", evalsize=10)


def test_from_tensors_splits_and_batching() -> None:
    x = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 2)
    y = torch.arange(50) % 3
    task = Task.from_tensors(
        "t",
        lambda: nn.Linear(2, 3),
        train=(x[:40], y[:40]),
        eval=(x[40:], y[40:]),
        calib_size=10,
        seed=3,
        batch_size=8,
        preprocess=lambda t: t * 2,
    )
    calib = torch.cat([b for b, _ in task.calib_batches()])
    assert len(calib) == 10 and set((calib[:, 0] / 2).tolist()) <= set(range(40))
    ev = task.eval_batches(4)
    assert [len(b) for b, _ in ev] == [4, 4, 2]
    assert torch.equal(torch.cat([b for b, _ in ev]), x[40:] * 2)  # ordered, preprocessed
    it = task.train_batches()
    seen = torch.cat([next(it)[0] for _ in range(5)])  # one epoch: 5 full batches of 8
    assert sorted((seen[:, 0] / 2).tolist()) == list(range(40))
    assert task.example_input(12).shape == (12, 2)


def test_task_validates_fields() -> None:
    with pytest.raises(ValueError, match="metric"):
        Task.from_tensors(
            "t",
            nn.Identity,
            train=(torch.zeros(2, 1), torch.zeros(2)),
            eval=(torch.zeros(2, 1), torch.zeros(2)),
            metric="f1",
        )
