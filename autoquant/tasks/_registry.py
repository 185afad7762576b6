"""Task lookup: built-in names and user ``package.module:function`` import paths."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from autoquant.tasks._builtin import cifar10_resnet_task, digits_cnn_task, mnist_lenet5_task
from autoquant.tasks._nlp import sst2_minilm_task
from autoquant.tasks._task import Task


class TaskError(ValueError):
    """An unknown task name, a bad import path, or options the task does not take."""


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "digits-cnn": digits_cnn_task,
    "mnist-lenet5": mnist_lenet5_task,
    "cifar10-resnet20": partial(cifar10_resnet_task, 20),
    "cifar10-resnet32": partial(cifar10_resnet_task, 32),
    "cifar10-resnet56": partial(cifar10_resnet_task, 56),
    "sst2-minilm": sst2_minilm_task,  # needs the nlp extra
}
_IMPORT_FORM = "an import path 'package.module:function' whose function returns a Task"


def _import_builder(path: str) -> Callable[..., Task]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise TaskError(f"task {path!r} is not a valid import path; expected {_IMPORT_FORM}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import module {module_name!r} for task {path!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"module {module_name!r} has no attribute {attr!r} (task {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TaskError(f"task {path!r} names a {type(obj).__name__}, not a function")
    return obj


def _check_options(name: str, builder: Callable[..., Task], options: dict[str, Any]) -> None:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TaskError(
            f"task {name!r} does not take option(s) {unknown}; allowed options: "
            f"{', '.join(allowed) or '(none)'}"
        )


def get_task(name: str, **options: Any) -> Task:
    """A built-in task by name, or a user task by import path, built with ``options``.

    Args:
        name: one of :data:`BUILTIN_TASKS` (``digits-cnn``, ``mnist-lenet5``,
            ``cifar10-resnet20/32/56``, ``sst2-minilm``) or ``"package.module:function"``;
            the function is called with ``options`` and must return a :class:`Task`.
        **options: task options, e.g. ``eval_size``, ``calib_size``, ``batch_size``,
            ``seed``, ``finetune_epochs``.

    Raises:
        TaskError: unknown name, import failure, unknown option, or not a Task returned.
        FileNotFoundError: a data file is missing (names it and ``AUTOQUANT_DATA``).
        MissingExtraError: the task needs an optional extra (``sst2-minilm``: ``nlp``).

    Example:
        >>> task = get_task("digits-cnn", eval_size=200)  # doctest: +SKIP
        >>> task.info["eval_size"]  # doctest: +SKIP
        200
    """
    if not isinstance(name, str) or not name:
        raise TaskError(f"task name must be a non-empty string, got {name!r}")
    if name in BUILTIN_TASKS:
        builder = BUILTIN_TASKS[name]
    elif ":" in name:
        builder = _import_builder(name)
    else:
        raise TaskError(
            f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}; "
            f"or give {_IMPORT_FORM}"
        )
    _check_options(name, builder, options)
    task = builder(**options)
    if not isinstance(task, Task):
        raise TaskError(
            f"task {name!r} returned a {type(task).__name__}, not an autoquant.tasks.Task"
        )
    return task
