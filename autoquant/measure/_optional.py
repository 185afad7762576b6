"""The optional ONNX export: loaded on first use, with a clear error when ``onnx`` is missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def onnx_export() -> ModuleType:
    """The :mod:`autoquant.measure.onnx` package (imports ``onnx``).

    Raises:
        ImportError: ``onnx`` is not installed, naming the extra that brings it.
    """
    try:
        return importlib.import_module("autoquant.measure.onnx")
    except ImportError as e:
        raise ImportError(
            f"the ONNX export and the onnxruntime backend need the optional packages onnx and "
            f"onnxruntime ({e}); install them with: pip install 'autoquant[export]' (the "
            "torch-x86 backend works without them)"
        ) from e
