"""Where data and caches live, checksum verification, and crash- and race-safe cache files.

Data (read-only, verified against ``SHA256SUMS``) is found through ``AUTOQUANT_DATA``;
derived artifacts (trained weights, decoded arrays) go under ``AUTOQUANT_CACHE``. A cache file
is written atomically (temporary file + ``os.replace``) with a ``.sha256`` sidecar; a file
that fails its checksum or its loader is discarded and rebuilt, never trusted. Builders
hold an ``flock`` so parallel workers build each artifact once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import autoquant

try:  # POSIX only; elsewhere concurrent builders may duplicate work but stay atomic.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

DATA_ENV = "AUTOQUANT_DATA"
CACHE_ENV = "AUTOQUANT_CACHE"
SUMS_FILE = "SHA256SUMS"

log = logging.getLogger("autoquant.tasks")
T = TypeVar("T")


class DataIntegrityError(ValueError):
    """A data file does not match its entry in ``SHA256SUMS``."""


class MissingDataError(FileNotFoundError):
    """A data file is not in the data folder (the message names it and ``AUTOQUANT_DATA``)."""


def data_dir() -> Path:
    """The folder holding the real data sets and weights.

    ``$AUTOQUANT_DATA`` if set; otherwise ``<repo root>/../shared/data`` (falling back to
    ``<cwd>/../shared/data`` when only that exists).

    Example:
        >>> isinstance(data_dir(), Path)
        True
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    default = (Path(autoquant.__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
    if default.is_dir():
        return default
    alt = (Path.cwd() / ".." / "shared" / "data").resolve()
    return alt if alt.is_dir() else default


def cache_dir() -> Path:
    """The folder for derived artifacts: ``$AUTOQUANT_CACHE`` or ``~/.cache/autoquant``.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autoquant"


# Hashes keyed by (path, mtime_ns, size): each file is hashed at most once per process
# unless it changes on disk.
_hashes: dict[tuple[str, int, int], str] = {}
_sums: dict[tuple[str, int, int], dict[str, str]] = {}
_unlisted_warned: set[str] = set()


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of ``path`` (memoised per path, mtime and size)."""
    key = _stat_key(path)
    digest = _hashes.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = _hashes[key] = h.hexdigest()
    return digest


def _expected_sums(root: Path) -> dict[str, str]:
    sums = root / SUMS_FILE
    if not sums.is_file():
        return {}
    key = _stat_key(sums)
    if key not in _sums:
        table: dict[str, str] = {}
        for line in sums.read_text().splitlines():
            parts = line.split(maxsplit=1)
            if len(parts) == 2:
                name = parts[1].lstrip("*").strip()
                table[name.removeprefix("./")] = parts[0].lower()
        _sums[key] = table
    return _sums[key]


def data_file(relpath: str) -> Path:
    """Path of a data file under :func:`data_dir`, checked to exist and match ``SHA256SUMS``.

    Args:
        relpath: path relative to the data folder, e.g. ``"weights/lenet5_mnist.pt"``.

    Raises:
        MissingDataError: (a ``FileNotFoundError``) the file is missing; the message names it
            and ``AUTOQUANT_DATA``.
        DataIntegrityError: the file's SHA-256 differs from its ``SHA256SUMS`` entry.

    Example:
        >>> data_file("mnist.npz").name  # doctest: +SKIP
        'mnist.npz'
    """
    root = data_dir()
    path = root / relpath
    if not path.is_file():
        raise MissingDataError(
            f"{relpath} not found in {root} (set {DATA_ENV} to the folder holding it)"
        )
    expected = _expected_sums(root).get(relpath)
    if expected is None:
        if str(path) not in _unlisted_warned:
            _unlisted_warned.add(str(path))
            warnings.warn(
                f"{relpath} has no entry in {root / SUMS_FILE}; using it unverified",
                stacklevel=2,
            )
    elif file_sha256(path) != expected:
        raise DataIntegrityError(
            f"{path} does not match {SUMS_FILE} (expected sha256 {expected}, got "
            f"{file_sha256(path)}); replace the file or point {DATA_ENV} at a good copy"
        )
    return path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``<path>.lock`` (blocks until free)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically through ``write(file)``, then its ``.sha256`` sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, write)
    digest = file_sha256(path)
    _atomic_write(_sidecar(path), lambda f: f.write(digest.encode()))


class _Invalid(Exception):
    pass


def _load_verified(path: Path, load: Callable[[Path], T]) -> T:
    """Load a cache file if it exists and matches its sidecar, else raise _Invalid."""
    if not path.is_file():
        raise _Invalid("missing")
    try:
        recorded = _sidecar(path).read_text().strip()
    except OSError:
        raise _Invalid("no checksum sidecar") from None
    if file_sha256(path) != recorded:
        raise _Invalid("checksum mismatch")
    try:
        return load(path)
    except Exception as exc:  # any loader failure means the file cannot be trusted
        raise _Invalid(f"load failed: {exc}") from None


def cached_artifact(
    path: Path,
    build: Callable[[], T],
    save: Callable[[T, IO[bytes]], None],
    load: Callable[[Path], T],
) -> tuple[T, bool]:
    """Load ``path`` if valid, otherwise build, save atomically and return it.

    Corrupt files (bad checksum, missing sidecar, loader error) are discarded and rebuilt.
    Building holds :func:`file_lock`, and the file is checked again once the lock is held,
    so concurrent workers build it once.

    Returns:
        ``(value, built)`` where ``built`` says whether this call built it.
    """
    try:
        return _load_verified(path, load), False
    except _Invalid:
        pass  # possibly mid-write by another process: re-check under the lock
    with file_lock(path):
        try:
            return _load_verified(path, load), False
        except _Invalid as why:
            if path.exists():
                warnings.warn(
                    f"discarding corrupt cache file {path} ({why}); rebuilding", stacklevel=2
                )
                path.unlink(missing_ok=True)
                _sidecar(path).unlink(missing_ok=True)
        value = build()
        atomic_save(path, lambda f: save(value, f))
        return value, True


def cached_json(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """:func:`cached_artifact` for a small JSON mapping."""

    def save(obj: dict[str, Any], f: IO[bytes]) -> None:
        f.write(json.dumps(obj, sort_keys=True).encode())

    def load(p: Path) -> dict[str, Any]:
        obj = json.loads(p.read_text())
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        return obj

    return cached_artifact(path, build, save, load)[0]


def config_key(config: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able configuration, used in cache file names."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
