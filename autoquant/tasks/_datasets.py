"""Loading the real data sets: scikit-learn digits, MNIST (npz) and CIFAR-10 (JPEG tarball).

Decoded or resized arrays are cached as ``.npz`` under :func:`cache_dir`, keyed by the
source file's SHA-256, so a changed source never reuses a stale cache.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import IO

import numpy as np

from autoquant.tasks._files import cache_dir, cached_artifact, data_file, file_sha256

log = logging.getLogger("autoquant.tasks")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")  # fmt: skip
Arrays = dict[str, np.ndarray]


def _save_npz(arrays: Arrays, f: IO[bytes]) -> None:
    np.savez(f, **arrays)


def _load_npz(path: Path) -> Arrays:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as ``float32 [1797, 1, 8, 8]`` in [0, 1] and ``int64 [1797]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, d.target.astype(np.int64)


def _resize_to_32(images: np.ndarray) -> np.ndarray:
    from PIL import Image

    # PIL bilinear on uint8, as the LeNet-5 checkpoint's training pipeline
    # (torchvision Resize on PIL images) did: 99.05% vs 99.04% with torch's interpolate.
    return np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR))
                     for im in images])  # fmt: skip


@lru_cache(maxsize=1)
def _load_mnist32(src: str, digest: str) -> Arrays:
    def build() -> Arrays:
        t0 = time.perf_counter()
        with np.load(src, allow_pickle=False) as z:
            out = {
                "x_train": _resize_to_32(z["x_train"]),
                "y_train": z["y_train"].astype(np.int64),
                "x_test": _resize_to_32(z["x_test"]),
                "y_test": z["y_test"].astype(np.int64),
            }
        log.info("resized MNIST to 32x32 in %.1f s", time.perf_counter() - t0)
        return out

    path = cache_dir() / "mnist" / f"mnist32-{digest[:16]}.npz"
    return cached_artifact(path, build, _save_npz, _load_npz)[0]


def load_mnist32() -> Arrays:
    """MNIST resized to 32×32 (uint8 ``x_*: [N, 32, 32]``, int64 ``y_*``), cached.

    Raises:
        FileNotFoundError: ``mnist.npz`` is missing from the data folder.
    """
    src = data_file("mnist.npz")
    return _load_mnist32(str(src), file_sha256(src))


def _decode_jpegs(blobs: Sequence[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def _read_cifar_tar(path: Path) -> dict[str, list[tuple[str, int, bytes]]]:
    """Members per split as (name, label, bytes), sorted by (label, name)."""
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    splits: dict[str, list[tuple[str, int, bytes]]] = {"train": [], "test": []}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith(".jpg"):
                continue
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[-3] not in splits or parts[-2] not in index:
                continue
            f = tar.extractfile(member)
            assert f is not None
            splits[parts[-3]].append((parts[-1], index[parts[-2]], f.read()))
    for items in splits.values():
        items.sort(key=lambda t: (t[1], t[0]))
    return splits


def _decode_split(items: list[tuple[str, int, bytes]], workers: int) -> np.ndarray:
    blobs = [b for _, _, b in items]
    if workers <= 1:
        return _decode_jpegs(blobs)
    chunk = max(1, len(blobs) // (4 * workers))
    parts = [blobs[i : i + chunk] for i in range(0, len(blobs), chunk)]
    # spawn, not fork: the parent may hold torch's thread pool, and fork with threads is unsafe.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(_decode_jpegs, parts)))


@lru_cache(maxsize=1)
def _load_cifar10(src: str, digest: str) -> Arrays:
    def build() -> Arrays:
        t0 = time.perf_counter()
        splits = _read_cifar_tar(Path(src))
        workers = min(os.cpu_count() or 1, 8)
        out: Arrays = {}
        for split, items in splits.items():
            out[f"x_{split}"] = _decode_split(items, workers)  # [N, 32, 32, 3] uint8
            out[f"y_{split}"] = np.array([label for _, label, _ in items], dtype=np.int64)
        n_train, n_test = len(out["y_train"]), len(out["y_test"])
        if n_train != 50000 or n_test != 10000:
            raise ValueError(
                f"{src} holds {n_train} train / {n_test} test images; expected 50000 / 10000"
            )
        log.info("decoded CIFAR-10 JPEGs in %.1f s (%d workers)", time.perf_counter() - t0, workers)
        return out

    path = cache_dir() / "cifar10" / f"cifar10-uint8-{digest[:16]}.npz"
    return cached_artifact(path, build, _save_npz, _load_npz)[0]


def load_cifar10() -> Arrays:
    """CIFAR-10 from the JPEG tarball as uint8 ``x_*: [N, 32, 32, 3]``, int64 ``y_*``.

    Decoded once with Pillow (in a process pool) and cached under ``cache_dir()/cifar10``.
    Images are ordered by class, then file name.

    Raises:
        FileNotFoundError: ``cifar10_jpeg.tar.gz`` is missing from the data folder.
    """
    src = data_file("cifar10_jpeg.tar.gz")
    return _load_cifar10(str(src), file_sha256(src))
