"""autoquant.tasks: a pretrained model with its data, loss and metric, as a :class:`Task`.

Built-in tasks use real data and weights found through ``AUTOQUANT_DATA`` (see
:func:`data_dir`; ``sst2-minilm`` also needs the ``nlp`` extra for its encoder); derived
artifacts (trained or fine-tuned weights, decoded images, token arrays) are cached under
``AUTOQUANT_CACHE`` (see :func:`cache_dir`). Calibration and evaluation subsets are
stratified by class and shuffled (:func:`stratified_subset`), so any prefix is balanced.
Bring your own task with an import path ``"package.module:function"`` returning a
:class:`Task`.

Example:
    >>> from autoquant.tasks import get_task
    >>> task = get_task("digits-cnn")  # doctest: +SKIP
    >>> model = task.model_factory()  # doctest: +SKIP
    >>> model(task.example_input(4)).shape  # doctest: +SKIP
    torch.Size([4, 10])
"""

from __future__ import annotations

from autoquant.tasks._builtin import cifar10_resnet_task, digits_cnn_task, mnist_lenet5_task
from autoquant.tasks._datasets import CIFAR10_CLASSES, load_cifar10, load_mnist32
from autoquant.tasks._files import (
    CACHE_ENV,
    DATA_ENV,
    DataIntegrityError,
    MissingDataError,
    cache_dir,
    data_dir,
    data_file,
)
from autoquant.tasks._models import (
    BasicBlock,
    BertClassifier,
    CifarResNet,
    DigitsCNN,
    LeNet5,
    PadShortcut,
)
from autoquant.tasks._nlp import (
    NLP_EXTRA,
    NLP_INSTALL,
    MissingExtraError,
    load_sst2_tokens,
    require_nlp,
    sst2_minilm_task,
)
from autoquant.tasks._registry import BUILTIN_TASKS, TaskError, get_task
from autoquant.tasks._subsets import stratified_subset
from autoquant.tasks._task import Batch, Task, TensorSplits

__all__ = [
    "BUILTIN_TASKS",
    "NLP_EXTRA",
    "NLP_INSTALL",
    "BertClassifier",
    "MissingDataError",
    "MissingExtraError",
    "load_sst2_tokens",
    "require_nlp",
    "sst2_minilm_task",
    "CACHE_ENV",
    "CIFAR10_CLASSES",
    "DATA_ENV",
    "BasicBlock",
    "Batch",
    "CifarResNet",
    "DataIntegrityError",
    "DigitsCNN",
    "LeNet5",
    "PadShortcut",
    "Task",
    "TaskError",
    "TensorSplits",
    "cache_dir",
    "cifar10_resnet_task",
    "data_dir",
    "data_file",
    "digits_cnn_task",
    "get_task",
    "load_cifar10",
    "load_mnist32",
    "mnist_lenet5_task",
    "stratified_subset",
]
