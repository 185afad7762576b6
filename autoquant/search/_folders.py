"""Atomic output folders for exports and reports.

:func:`output_folder` writes into a temporary sibling folder and renames it into place, so a
full disk or a crash leaves nothing half-written. A non-empty target is refused unless
``force``; ``force`` replaces a folder that holds only what autoquant writes there (a previous
export or report: ``owned`` says which relative paths), and never deletes other files: a
folder with anything else is refused even with ``force``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from autoquant.measure import SIDECAR_NAME

EXPORT_FILES = frozenset(
    {"plan.json", "model.onnx", SIDECAR_NAME, "metadata.json", "state_dict.pt"}
)


class OutputFolderError(ValueError):
    """An output folder (``--out``) that cannot be written: a file, or a non-empty folder."""


def _listing(paths: list[str], n: int = 5) -> str:
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


def _files_under(folder: Path) -> list[str]:
    """Every file and empty folder under ``folder``, as sorted relative POSIX paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files]
        if not dirs and not files and root != str(folder):
            out.append(rel.as_posix() + "/")
    return sorted(out)


def check_output_folder(
    out: str | Path, *, force: bool, owned: Callable[[str], bool], what: str
) -> None:
    """Refuse an output folder that is a file, or non-empty (unless ``force`` and every file
    in it is one autoquant writes there: ``owned(relative path)``).

    Raises:
        OutputFolderError: naming the folder and a few of the files in the way.
    """
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise OutputFolderError(f"--out {target} is a file, not a folder; give a folder path")
    if not target.is_dir():
        return
    present = _files_under(target)
    if not present:
        return
    foreign = [p for p in present if not owned(p)]
    if not force:
        raise OutputFolderError(
            f"--out {target} is not empty ({_listing(present)}); give a new or empty folder, "
            f"or --force to replace a previous autoquant {what} there"
        )
    if foreign:
        raise OutputFolderError(
            f"--out {target} holds files that are not part of an autoquant {what} "
            f"({_listing(foreign)}); --force only replaces a previous {what} and never "
            "deletes other files: move them, or give another folder"
        )


@contextlib.contextmanager
def output_folder(
    out: str | Path,
    *,
    force: bool = False,
    owned: Callable[[str], bool] = lambda rel: rel in EXPORT_FILES,
    what: str = "export",
) -> Iterator[Path]:
    """A temporary sibling folder to write into; on success it replaces ``out`` atomically.

    On any error the temporary folder is removed and ``out`` is left as it was.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "export"
        >>> with output_folder(out) as tmp:
        ...     _ = (tmp / "plan.json").write_text("{}")
        >>> sorted(p.name for p in out.iterdir())
        ['plan.json']
    """
    target = Path(out)
    check_output_folder(target, force=force, owned=owned, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    # The old folder holds only autoquant output (checked): move it aside, move the new one
    # in, then delete the old one; if the second rename fails, put the old one back.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
