"""Knowledge distillation from the float model, with the teacher's logits computed once per
training stream and reused by every trial.

A study's training stream is fixed by its task, seed and batch size, so the float teacher's
logits for its first ``steps`` batches are the same for every trial: :func:`teacher_logits`
computes them in one no-grad pass, and :class:`TeacherLogitsCache` keeps them in memory and
(optionally) on disk, keyed by what determines the stream and a hash of the teacher's weights.
A trial then pays nothing for its teacher. Memory and disk: ``steps × batch × classes × 4``
bytes (ResNet-20 on CIFAR-10, 200 steps of 64: 512 KB).

Example:
    >>> import torch
    >>> from torch import nn
    >>> teacher = nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> cache = TeacherLogitsCache()  # memory only; pass a directory to keep them on disk
    >>> logits = cache.get(teacher, lambda: data, steps=5, stream={"task": "toy", "seed": 0})
    >>> tuple(logits.shape), cache.get(teacher, lambda: data, steps=3, stream={"task": "toy",
    ...     "seed": 0}).data_ptr() == logits.data_ptr()  # a prefix of the cached stream
    ((5, 8, 3), True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.train._data import stream as batch_stream
from autoquant.transform import call_model, inputs_to

log = logging.getLogger("autoquant.train")

#: Bump when the stored format or the way logits are computed changes.
TEACHER_CACHE_VERSION = 1


@dataclass(frozen=True)
class Distillation:
    """Distillation loss settings: ``alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-alpha)·task``.

    Args:
        alpha: weight of the distillation term in [0, 1] (1: the teacher alone).
        temperature: softening temperature ``T > 0`` (the ``T²`` keeps the gradient scale of
            the soft term independent of ``T``, as in Hinton et al. 2015).

    Example:
        >>> d = Distillation.from_dict({"alpha": 0.7, "temperature": 2})
        >>> d, d.to_dict()
        (Distillation(alpha=0.7, temperature=2.0), {'alpha': 0.7, 'temperature': 2.0})
    """

    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        for name, ok, allowed in (
            ("alpha", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
            ("temperature", lambda v: v > 0, "a finite number > 0"),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not ok(value)
            ):
                raise ValueError(
                    f"distill.{name}={value!r} is not allowed; allowed values: {allowed}"
                )
            object.__setattr__(self, name, float(value))

    def loss(self, student: Tensor, teacher: Tensor, task_loss: Tensor) -> Tensor:
        """:func:`distillation_loss` with these settings."""
        return distillation_loss(student, teacher, task_loss, self.alpha, self.temperature)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Distillation:
        """From a study file's ``[qat] distill = { alpha = ..., temperature = ... }``.

        Raises:
            ValueError: an unknown key or a bad value (named, with the allowed values).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"distill must be a table {{alpha, temperature}}, got {data!r}")
        unknown = sorted(set(data) - {"alpha", "temperature"})
        if unknown:
            raise ValueError(f"unknown distill key(s) {unknown}; allowed keys: alpha, temperature")
        return cls(**data)


def distillation_loss(
    student: Tensor, teacher: Tensor, task_loss: Tensor, alpha: float, temperature: float
) -> Tensor:
    """``alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1-alpha)·task_loss``.

    The KL divergence is summed over classes and averaged over the batch, computed in float32
    (logits may come from a bfloat16 autocast). Log-probabilities work as logits too: a
    softmax ignores the per-sample constant they differ by.

    Args:
        student: ``[N, classes]`` scores of the model being trained.
        teacher: the teacher's ``[N, classes]`` scores for the same inputs.
        task_loss: the task's own loss on ``student`` (a scalar).
        alpha: weight of the distillation term in [0, 1].
        temperature: softening temperature ``T > 0``.

    Raises:
        ValueError: the shapes differ, or are not ``[N, classes]``.

    Example:
        >>> s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> # KL = sigmoid(1)·1 - sigmoid(-1)·1 = 0.4621; 0.5·0.4621 + 0.5·2
        >>> round(float(distillation_loss(s, t, torch.tensor(2.0), 0.5, 1.0)), 4)
        1.2311
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"distillation needs student and teacher scores of one shape [N, classes]; got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)} (are the teacher logits for "
            "this training stream and batch size?)"
        )
    t = float(temperature)
    log_s = F.log_softmax(student.float() / t, dim=1)
    log_t = F.log_softmax(teacher.float() / t, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    if alpha == 1.0:
        return kl * (t * t)
    return alpha * t * t * kl + (1.0 - alpha) * task_loss


@torch.no_grad()
def teacher_logits(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int,
    *,
    device: str | torch.device = "cpu",
) -> Tensor:
    """The teacher's scores for the first ``steps`` batches, as the QAT loop will serve them.

    One float32 forward per batch in eval mode (the training flag is restored). ``batches`` is
    consumed exactly like :func:`~autoquant.train.qat_finetune` consumes it (a list is cycled),
    so step ``i`` of a trial on the same stream meets row ``i``.

    Returns:
        ``[steps, batch, classes]`` float32 on the CPU.

    Raises:
        ValueError: the batches differ in size (the result is one tensor), or ran out.

    Example:
        >>> data = [(torch.ones(2, 3), torch.zeros(2))]
        >>> teacher_logits(nn.Linear(3, 4), data, steps=3).shape
        torch.Size([3, 2, 4])
    """
    dev = torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    rows: list[Tensor] = []
    try:
        for x, _ in batch_stream(batches, steps):
            out = call_model(model, inputs_to(x, dev)).float()
            if rows and out.shape != rows[0].shape:
                raise ValueError(
                    f"teacher_logits needs batches of one size: step {len(rows)} gives scores "
                    f"{tuple(out.shape)}, step 0 gave {tuple(rows[0].shape)}"
                )
            rows.append(out.to("cpu"))
    finally:
        model.train(was_training)
    if not rows:
        return torch.empty(0)
    return torch.stack(rows)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's structure (``repr``) and state dict (names, dtypes, shapes, bytes).

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> weights_sha256(a) == weights_sha256(a), weights_sha256(a) == weights_sha256(b)
        (True, False)
    """
    h = hashlib.sha256(repr(model).encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_key(model: nn.Module, stream: Mapping[str, Any]) -> str:
    """Cache key of a teacher on a training stream: the stream description (JSON), the
    teacher's :func:`weights_sha256` and the cache version. ``steps`` is not part of it: the
    first ``n`` batches of a stream do not depend on how many follow."""
    try:
        text = json.dumps(
            {
                "stream": dict(stream),
                "teacher": weights_sha256(model),
                "version": TEACHER_CACHE_VERSION,
            },
            sort_keys=True,
        )
    except TypeError as e:
        raise ValueError(f"stream must be a JSON-serialisable mapping: {e}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TeacherLogitsCache:
    """Teacher logits per training stream: in memory (LRU) and, given ``directory``, on disk.

    An entry holds the logits of the longest prefix computed so far; a request for fewer steps
    is a slice (no copy), for more steps a recomputation that replaces the entry. Disk files
    (``<directory>/<key>.pt``, a float32 tensor ``[steps, batch, classes]``) are written
    atomically, so workers sharing a directory never read a partial file (two that miss at
    once both compute, and one file wins). Files are loaded with ``weights_only=True``.

    Args:
        directory: where to keep the files (e.g. ``autoquant.tasks.cache_dir() /
            "teacher-logits"``); None keeps them in memory only.
        max_entries: entries kept in memory (one per stream and teacher).

    Attributes:
        hits, misses: in-memory or on-disk hits, and computations.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, max_entries: int = 4):
        self.directory = Path(directory) if directory is not None else None
        self.max_entries = max_entries
        self._memory: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(
        self,
        teacher: nn.Module,
        make_batches: Callable[[], Iterable[Any]],
        *,
        steps: int,
        stream: Mapping[str, Any],
        device: str | torch.device = "cpu",
    ) -> Tensor:
        """Logits ``[steps, batch, classes]`` of ``teacher`` on the stream, computed on a miss.

        Args:
            teacher: the float model (eval-mode forward; its training flag is restored).
            make_batches: returns the stream from its start, e.g.
                ``lambda: task.train_batches(batch_size, seed=seed)``; called on a miss only.
            steps: number of QAT steps (batches) needed.
            stream: everything that determines the batches, JSON-serialisable, e.g.
                ``{"task": name, "options": task_options, "seed": seed, "batch_size": 64}``.
            device: where the teacher runs on a miss.
        """
        key = teacher_key(teacher, stream)
        logits = self._memory.get(key)
        if logits is None:
            logits = self._load(key)
        if logits is not None and logits.shape[0] >= steps:
            self.hits += 1
        else:
            self.misses += 1
            logits = teacher_logits(teacher, make_batches(), steps, device=device)
            self._save(key, logits)
        self._memory[key] = logits
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)
        return logits[:steps]

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.pt"

    def _load(self, key: str) -> Tensor | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            logits = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file is recomputed, never trusted
            log.warning("ignoring unreadable teacher logits %s (%s)", path, e)
            return None
        return logits if isinstance(logits, Tensor) and logits.dim() == 3 else None

    def _save(self, key: str, logits: Tensor) -> None:
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        torch.save(logits, tmp)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one


_CACHES: dict[Path | None, TeacherLogitsCache] = {}


def cached_teacher_logits(
    teacher: nn.Module,
    make_batches: Callable[[], Iterable[Any]],
    *,
    steps: int,
    stream: Mapping[str, Any],
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """One call for the search: the process-wide :class:`TeacherLogitsCache` for ``cache_dir``.

    Example:
        >>> data = [(torch.ones(2, 3), torch.zeros(2))]
        >>> cached_teacher_logits(nn.Linear(3, 4), lambda: data, steps=2,
        ...                       stream={"task": "doc"}).shape
        torch.Size([2, 2, 4])
    """
    key = Path(cache_dir) if cache_dir is not None else None
    cache = _CACHES.setdefault(key, TeacherLogitsCache(key))
    return cache.get(teacher, make_batches, steps=steps, stream=stream, device=device)
