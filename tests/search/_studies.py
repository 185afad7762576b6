"""Small study files shared by the CLI and storage tests."""

from __future__ import annotations

_FAST_LATENCY = """[latency]
warmup = 1
repeats = 3
budget_s = 0.05
"""


def tiny_study(name: str, *, trials: int = 2, w_bits: str = "[4, 8]", options: str = "") -> str:
    """A study of ``cli_tiny_task:tiny_task`` (a whole search in seconds); ``options`` is the
    task's options table as TOML, e.g. ``'{ broken_flag = "/tmp/x" }'``."""
    task_options = f"options = {options}\n" if options else ""
    return (
        f'[study]\nname = "{name}"\ntrials = {trials}\n'
        f'[task]\nname = "cli_tiny_task:tiny_task"\n{task_options}'
        f"[space]\nw_bits = {w_bits}\n"
        "[qat]\nsteps = 3\ncalib_batches = 1\nbatch_size = 32\n"
        f"{_FAST_LATENCY}[constraint]\nmax_accuracy_drop = 0.05\n"
    )


def digits_study(name: str, *, storage: str | None = None, fast_latency: bool = False) -> str:
    """Two trials of the built-in ``digits-cnn`` task with 2 QAT steps."""
    stored = f'storage = "{storage}"\n' if storage else ""
    return (
        f'[study]\nname = "{name}"\ntrials = 2\nseed = 0\n{stored}'
        '[task]\nname = "digits-cnn"\n'
        "[space]\nw_bits = [4, 8]\na_bits = [8]\n"
        "[qat]\nsteps = 2\ncalib_batches = 1\n" + (_FAST_LATENCY if fast_latency else "")
    )
