"""What a pass is and what it works on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autoquant.measure.onnx._analysis import Analysis
from autoquant.measure.onnx._editor import Editor


@dataclass
class QDQContext:
    """One export in progress: the analysis (read) and the graph editor (written)."""

    analysis: Analysis
    editor: Editor


@dataclass(frozen=True)
class Pass:
    """One rewrite of the QDQ export: ``run(ctx)`` edits ``ctx.editor`` in place.

    Attributes:
        name: the pass's id (what :func:`~autoquant.measure.onnx.without` takes).
        run: the rewrite.
    """

    name: str
    run: Callable[[QDQContext], None]

    @property
    def summary(self) -> str:
        """The first paragraph of the rewrite's docstring, on one line."""
        return " ".join((self.run.__doc__ or "").strip().split("\n\n")[0].split())
