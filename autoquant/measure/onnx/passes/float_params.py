"""Float parameters: parameters outside the layers get their real values."""

from __future__ import annotations

from autoquant.measure.onnx._context import Pass, QDQContext


def run(ctx: QDQContext) -> None:
    """Write the real values of the other parameters (e.g. a BatchNorm without a conv before
    it), which keep their exported names, with the size role ``param``.
    """
    ed = ctx.editor
    params = dict(ctx.analysis.float_model.named_parameters())
    for name in list(ed.inits):
        if name in params and name not in ed.roles:
            ed.init(name, params[name].detach().numpy(), "param")


PASS = Pass("float_params", run)
