"""Built-in tasks on real data: digits CNN, MNIST LeNet-5 and CIFAR-10 ResNet-20/32/56
(``sst2-minilm`` lives in ``_nlp``; what they share in ``_common``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.tasks._common import (
    CACHE_VERSION,
    SUBSETS_VERSION,
    StateDict,
    arrays_split,
    cached_float_accuracy,
    calib_eval_subsets,
    load_checkpoint,
    save_checkpoint,
    state_factory,
)
from autoquant.tasks._datasets import load_cifar10, load_digits_arrays, load_mnist32
from autoquant.tasks._files import (
    cache_dir,
    cached_artifact,
    cached_json,
    config_key,
    data_file,
    file_sha256,
)
from autoquant.tasks._models import CifarResNet, DigitsCNN, LeNet5
from autoquant.tasks._subsets import stratified_subset
from autoquant.tasks._task import Task, TensorSplits
from autoquant.train import evaluate, qat_finetune, torch_threads

log = logging.getLogger("autoquant.tasks")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
RESNET_WEIGHTS = {
    20: "weights/resnet20-12fca82f.th",
    32: "weights/resnet32-d509ac18.th",
    56: "weights/resnet56-4bfd9763.th",
}
# --------------------------------------------------------------------------- digits-cnn


def digits_cnn_task(
    *,
    seed: int = 0,
    test_fraction: float = 0.4,
    calib_size: int = 256,
    eval_size: int | None = None,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    train_epochs: int = 30,
) -> Task:
    """Small CNN on scikit-learn's 8×8 digits; trained on first use (seconds) and cached.

    The 1797 images are split with ``seed`` into train and a held-out test split
    (``test_fraction``, stratified by class); calibration samples come from train. The
    calibration and evaluation subsets are stratified by class and shuffled, so that any
    prefix of them is balanced. Training is deterministic
    (seeded init and batch order, Adam with cosine decay).

    Args:
        seed: seed for the split, calibration subset, init and batch order.
        test_fraction: share of images held out for evaluation.
        calib_size: calibration samples drawn from the training split.
        eval_size: evaluate on this many held-out images (default all).
        batch_size: default training/calibration batch size.
        eval_batch_size: default evaluation batch size.
        train_epochs: epochs for the cached float training.

    Example:
        >>> task = digits_cnn_task()  # doctest: +SKIP
        >>> task.float_accuracy > 0.95  # doctest: +SKIP
        True
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} is not allowed; allowed values: (0, 1)")
    x_all, y_all = load_digits_arrays()
    n = len(x_all)
    n_test = round(test_fraction * n)
    test_idx = np.sort(stratified_subset(y_all, n_test, seed))
    train_idx = np.setdiff1d(np.arange(n), test_idx)  # sorted; train_batches shuffles

    def t(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(x_all[idx]), torch.from_numpy(y_all[idx])

    train, test = t(train_idx), t(test_idx)
    calib, evals, eval_idx = calib_eval_subsets(train, test, seed, calib_size, eval_size)
    splits = TensorSplits(
        train, calib, evals, batch_size=batch_size, eval_batch_size=eval_batch_size
    )
    test_splits = TensorSplits(train, calib, test)
    config = {
        "version": CACHE_VERSION,
        "subsets": SUBSETS_VERSION,  # the split decides the training data
        "seed": seed,
        "test_fraction": test_fraction,
        "epochs": train_epochs,
        "recipe": "adam-3e-3-cosine-bs32",
    }

    def build() -> dict[str, Any]:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsCNN()
        steps = train_epochs * (len(train_idx) // 32)
        # One thread: tiny models train faster (a loaded machine can make two spinning threads
        # 10x slower), and it pins the float reduction order, so the weights are the same
        # everywhere.
        with torch_threads(1):
            qat_finetune(
                model,
                splits.train_batches(32, seed=seed),
                F.cross_entropy,
                steps=steps,
                lr=3e-3,
                optimizer="adam",
                schedule="cosine",
                log_every=steps,
            )
            acc = evaluate(model, test_splits.eval_batches())
        meta = {"test_accuracy": acc, "train_seconds": time.perf_counter() - t0, **config}
        log.info(
            "trained digits CNN: %.2f%% held-out accuracy in %.1f s",
            100 * acc,
            meta["train_seconds"],
        )
        return {"state_dict": model.state_dict(), "meta": meta}

    path = cache_dir() / "digits-cnn" / f"digits-cnn-{config_key(config)}.pt"
    ckpt, built = cached_artifact(path, build, save_checkpoint, load_checkpoint)
    meta = ckpt["meta"]
    task = Task(
        name="digits-cnn",
        model_factory=state_factory(DigitsCNN, ckpt["state_dict"]),
        train_batches=splits.train_batches,
        calib_batches=splits.calib_batches,
        eval_batches=splits.eval_batches,
        example_input=splits.example_input,
        loss_fn=F.cross_entropy,
        info={
            "train_size": len(train_idx),
            "calib_size": len(calib[1]),
            "eval_size": len(eval_idx),
            "test_accuracy": meta["test_accuracy"],
            "train_seconds": meta["train_seconds"],
            "trained_now": built,
            "checkpoint": str(path),
        },
    )
    if len(eval_idx) == n_test:
        task.float_accuracy = float(meta["test_accuracy"])
    else:
        task.measure_float_accuracy()
    return task


# --------------------------------------------------------------------------- mnist-lenet5


def _mnist_preprocess(x: Tensor) -> Tensor:
    return ((x.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def mnist_lenet5_task(
    *,
    seed: int = 0,
    calib_size: int = 512,
    eval_size: int | None = None,
    batch_size: int = 64,
    eval_batch_size: int = 500,
) -> Task:
    """Pretrained LeNet-5 (``weights/lenet5_mnist.pt``) on MNIST (``mnist.npz``).

    Inputs are 1×32×32 (PIL bilinear resize 28→32, cached), normalised with mean 0.1307,
    std 0.3081. The model ends in LogSoftmax, so the loss is NLL. Train and calibration
    batches come from ``x_train``; evaluation from ``x_test``.

    Args:
        seed: seed for the calibration and evaluation subsets.
        calib_size: calibration samples drawn from the training split.
        eval_size: evaluate on this many test images (default all 10,000).
        batch_size: default training/calibration batch size.
        eval_batch_size: default evaluation batch size.

    Example:
        >>> task = mnist_lenet5_task(eval_size=2000)  # doctest: +SKIP
        >>> task.float_accuracy > 0.98  # doctest: +SKIP
        True
    """
    weights = data_file("weights/lenet5_mnist.pt")
    data = load_mnist32()
    state = torch.load(weights, weights_only=True, map_location="cpu")
    train = arrays_split(data, "train")
    calib, evals, eval_idx = calib_eval_subsets(
        train, arrays_split(data, "test"), seed, calib_size, eval_size
    )
    n_train = len(train[1])
    splits = TensorSplits(
        train,
        calib,
        evals,
        preprocess=_mnist_preprocess,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
    )
    task = Task(
        name="mnist-lenet5",
        model_factory=state_factory(LeNet5, state),
        train_batches=splits.train_batches,
        calib_batches=splits.calib_batches,
        eval_batches=splits.eval_batches,
        example_input=splits.example_input,
        loss_fn=F.nll_loss,  # the model outputs log-probabilities
        info={
            "train_size": n_train,
            "calib_size": len(calib[1]),
            "eval_size": len(eval_idx),
            "weights": str(weights),
        },
    )
    task.float_accuracy = cached_float_accuracy(
        task,
        "mnist-lenet5",
        {
            "version": CACHE_VERSION,
            "subsets": SUBSETS_VERSION,
            "weights": file_sha256(weights),
            "eval": config_key({"indices": eval_idx.tolist()}),
        },
    )
    return task


# --------------------------------------------------------------------------- cifar10-resnet


def _cifar_preprocess(x: Tensor) -> Tensor:
    """uint8 NHWC -> normalised float NCHW."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _cifar_augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random 32×32 crop of the zero-padded (4 px) image and random horizontal flip (NHWC)."""
    n = x.shape[0]
    padded = F.pad(x, (0, 0, 4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(32)[None, :])[:, :, None]  # [n, 32, 1]
    cols = dx[:, None] + torch.arange(32)[None, :]  # [n, 32]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # [n, 1, 32]
    return padded[torch.arange(n)[:, None, None], rows, cols]


def _resnet_factory(depth: int, state: StateDict) -> Callable[[], nn.Module]:
    return state_factory(lambda: CifarResNet(depth), state)


def cifar10_resnet_task(
    depth: int = 20,
    *,
    seed: int = 0,
    calib_size: int = 512,
    eval_size: int | None = None,
    batch_size: int = 128,
    eval_batch_size: int = 500,
    augment: bool = True,
    finetune_epochs: int = 3,
    finetune_lr: float = 0.01,
    finetune_batch_size: int = 128,
    device: str = "cpu",
) -> Task:
    """Pretrained CIFAR-10 ResNet-``depth`` (option-A shortcuts) on the JPEG CIFAR-10 copy.

    The checkpoints were trained on the original CIFAR-10 and lose ~10 points on the JPEG
    copy, so the float model is first fine-tuned on the JPEG train split
    (``finetune_epochs`` of SGD, momentum 0.9, cosine decay, random crop + flip) and cached;
    ``info`` reports the float accuracy on the full test split before and after.
    ``finetune_epochs=0`` uses the checkpoint as is.

    Args:
        depth: 20, 32 or 56.
        seed: seed for subsets and the fine-tune's batch order and augmentation.
        calib_size: calibration samples drawn from the training split.
        eval_size: evaluate on this many test images (default all 10,000).
        batch_size: default training/calibration batch size.
        eval_batch_size: default evaluation batch size.
        augment: random crop + flip in ``train_batches``.
        finetune_epochs: epochs of float fine-tuning on the JPEG train split (cached).
        finetune_lr: fine-tune learning rate.
        finetune_batch_size: fine-tune batch size.
        device: device for the one-off fine-tune.

    Example:
        >>> task = cifar10_resnet_task(20, eval_size=1000)  # doctest: +SKIP
        >>> info = task.info  # doctest: +SKIP
        >>> info["accuracy_after_finetune"] > info["accuracy_before_finetune"]  # doctest: +SKIP
        True
    """
    if depth not in RESNET_WEIGHTS:
        raise ValueError(
            f"depth={depth!r} is not allowed; allowed values: {', '.join(map(str, RESNET_WEIGHTS))}"
        )
    if (
        isinstance(finetune_epochs, bool)
        or not isinstance(finetune_epochs, int)
        or finetune_epochs < 0
    ):
        raise ValueError(
            f"finetune_epochs={finetune_epochs!r} is not allowed; allowed values: an integer >= 0"
        )
    name = f"cifar10-resnet{depth}"
    weights = data_file(RESNET_WEIGHTS[depth])
    data = load_cifar10()
    train, test = arrays_split(data, "train"), arrays_split(data, "test")
    calib, evals, eval_idx = calib_eval_subsets(train, test, seed, calib_size, eval_size)
    n_train, n_test = len(train[1]), len(test[1])
    splits = TensorSplits(
        train,
        calib,
        evals,
        preprocess=_cifar_preprocess,
        augment=_cifar_augment if augment else None,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
    )
    full = TensorSplits(
        train,
        calib,
        test,
        preprocess=_cifar_preprocess,
        augment=_cifar_augment,
        eval_batch_size=500,
    )
    ckpt = torch.load(weights, weights_only=True, map_location="cpu")
    pretrained = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    base_config = {
        "version": CACHE_VERSION,
        "weights": file_sha256(weights),
        "data": file_sha256(data_file("cifar10_jpeg.tar.gz")),
    }

    before = float(
        cached_json(
            cache_dir()
            / name
            / f"float-accuracy-{config_key({**base_config, 'eval': 'full'})}.json",
            lambda: {
                "accuracy": evaluate(_resnet_factory(depth, pretrained)(), full.eval_batches())
            },
        )["accuracy"]
    )
    info: dict[str, Any] = {
        "train_size": n_train,
        "calib_size": len(calib[1]),
        "eval_size": len(eval_idx),
        "weights": str(weights),
        "checkpoint_best_prec1": float(ckpt.get("best_prec1", float("nan"))),
        "accuracy_before_finetune": before,
        "finetune_epochs": finetune_epochs,
    }
    state = pretrained
    if finetune_epochs > 0:
        ft_config = {
            **base_config,
            "epochs": finetune_epochs,
            "lr": finetune_lr,
            "batch_size": finetune_batch_size,
            "seed": seed,
            "recipe": "sgd-m0.9-wd5e-4-cosine-cropflip",
        }

        def build() -> dict[str, Any]:
            t0 = time.perf_counter()
            model = _resnet_factory(depth, pretrained)()
            steps = finetune_epochs * (n_train // finetune_batch_size)
            log.info("fine-tuning %s on the JPEG train split: %d steps", name, steps)

            def progress(step: int, loss: float) -> None:
                if (step + 1) % 100 == 0:
                    log.info(
                        "%s fine-tune step %d/%d loss %.3f (%.0f s)",
                        name,
                        step + 1,
                        steps,
                        loss,
                        time.perf_counter() - t0,
                    )

            qat_finetune(
                model,
                full.train_batches(finetune_batch_size, seed=seed),
                F.cross_entropy,
                steps=steps,
                lr=finetune_lr,
                momentum=0.9,
                weight_decay=5e-4,
                schedule="cosine",
                device=device,
                log_every=50,
                callback=progress,
            )
            model.cpu()
            seconds = time.perf_counter() - t0
            acc = evaluate(model, full.eval_batches())
            log.info(
                "%s: float accuracy %.2f%% -> %.2f%% after %.0f s",
                name,
                100 * before,
                100 * acc,
                seconds,
            )
            return {
                "state_dict": model.state_dict(),
                "meta": {
                    "accuracy_after_finetune": acc,
                    "finetune_seconds": seconds,
                    "finetune_device": device,
                    **ft_config,
                },
            }

        path = cache_dir() / name / f"{name}-finetuned-{config_key(ft_config)}.pt"
        ft, built = cached_artifact(path, build, save_checkpoint, load_checkpoint)
        state = ft["state_dict"]
        info.update(
            accuracy_after_finetune=float(ft["meta"]["accuracy_after_finetune"]),
            finetune_seconds=float(ft["meta"]["finetune_seconds"]),
            finetuned_now=built,
            checkpoint=str(path),
        )
        full_acc = info["accuracy_after_finetune"]
        state_key = ft_config
    else:
        full_acc = before
        state_key = base_config

    task = Task(
        name=name,
        model_factory=_resnet_factory(depth, state),
        train_batches=splits.train_batches,
        calib_batches=splits.calib_batches,
        eval_batches=splits.eval_batches,
        example_input=splits.example_input,
        loss_fn=F.cross_entropy,
        info=info,
    )
    if len(eval_idx) == n_test:
        task.float_accuracy = full_acc
    else:
        task.float_accuracy = cached_float_accuracy(
            task,
            name,
            {
                "model": state_key,
                "subsets": SUBSETS_VERSION,
                "eval": config_key({"indices": eval_idx.tolist()}),
            },
        )
    return task
