from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoquant.tasks import CifarResNet, PadShortcut, get_task, load_cifar10
from autoquant.tasks._builtin import RESNET_WEIGHTS, _cifar_augment
from autoquant.train import evaluate


def _checkpoint(depth: int, require_data: Callable[[str], Path]) -> dict[str, torch.Tensor]:
    path = require_data(RESNET_WEIGHTS[depth])
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_checkpoint_loads_strict(depth: int, require_data: Callable[[str], Path]) -> None:
    state = _checkpoint(depth, require_data)
    model = CifarResNet(depth)
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key
    params = dict(model.named_parameters())
    # Every parameter comes from the checkpoint, which holds nothing else but BN statistics.
    assert set(params) == {k for k in state if not k.endswith(("running_mean", "running_var"))}
    assert sum(p.numel() for p in params.values()) == sum(state[k].numel() for k in params)
    assert all(torch.equal(params[k], state[k]) for k in params)


def test_resnet20_shape_and_parameter_count() -> None:
    model = CifarResNet(20).eval()
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19  # 1 stem + 3 stages × 3 blocks × 2


def test_option_a_shortcut_is_parameter_free_subsample_and_pad() -> None:
    model = CifarResNet(20)
    shortcuts = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(shortcuts) == 2  # entry of stage 2 and stage 3
    assert all(not list(m.parameters()) and not list(m.buffers()) for m in shortcuts)
    x = torch.randn(2, 16, 8, 8)
    out = shortcuts[0](x)
    ref = torch.cat([torch.zeros(2, 8, 4, 4), x[:, :, ::2, ::2], torch.zeros(2, 8, 4, 4)], 1)
    assert torch.equal(out, ref)


def test_augment_is_a_crop_of_the_padded_image_or_its_mirror() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=g)
    out = _cifar_augment(x, torch.Generator().manual_seed(1))
    padded = F.pad(x, (0, 0, 4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        crops = [padded[i, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[i], c) for c in crops)
        mirrored = any(torch.equal(out[i], c.flip(1)) for c in crops)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 0 < flips < len(x)


@pytest.mark.slow
def test_decode_and_pretrained_accuracy(
    tmp_cache: Path, require_data: Callable[[str], Path]
) -> None:
    require_data("cifar10_jpeg.tar.gz")
    data = load_cifar10()
    assert data["x_train"].shape == (50000, 32, 32, 3) and data["x_train"].dtype == np.uint8
    assert np.bincount(data["y_train"]).tolist() == [5000] * 10
    assert np.bincount(data["y_test"]).tolist() == [1000] * 10
    task = get_task("cifar10-resnet20", finetune_epochs=0, eval_size=2000)
    acc = evaluate(task.model_factory(), task.eval_batches())
    # Measured 81.0% on the full JPEG test split (the original CIFAR-10 gives 91.7%).
    assert 0.77 <= acc <= 0.85
    assert acc == pytest.approx(task.float_accuracy)
    assert task.info["accuracy_before_finetune"] == pytest.approx(0.8103, abs=0.005)
