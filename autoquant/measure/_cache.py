"""Latency cache: measurements keyed by the deployed graph's signature, pluggable storage."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class KeyValueStore(Protocol):
    """What :class:`LatencyCache` needs from a store: JSON-serialisable values by string key."""

    def get(self, key: str) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...


class MemoryStore:
    """A store in a plain dict (one process, lost at exit).

    Example:
        >>> s = MemoryStore()
        >>> s.set("k", {"v": 1}); s.get("k")
        {'v': 1}
    """

    def __init__(self, data: MutableMapping[str, Any] | None = None) -> None:
        self.data: MutableMapping[str, Any] = {} if data is None else data

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value


class JsonFileStore:
    """A store in one JSON file, safe for parallel workers.

    Writes take an exclusive lock on ``<path>.lock`` and replace the file atomically
    (write to a temporary file, then ``os.replace``), so a reader sees either the old or
    the new complete file and concurrent writers never lose each other's keys. An unreadable
    file is ignored with a warning and rewritten by the next :meth:`set`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "lat.json"
        >>> JsonFileStore(p).set("k", [1, 2]); JsonFileStore(p).get("k")
        [1, 2]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError as exc:
            return self._corrupt(exc)
        if not text.strip():
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return self._corrupt(exc)
        if not isinstance(data, dict):
            return self._corrupt(f"a JSON {type(data).__name__}, not an object")
        return data

    def _corrupt(self, reason: object) -> dict[str, Any]:
        # A cache is only a cache: a damaged file (crash mid-copy, manual edit) costs
        # re-measuring, not the study. The next set() rewrites it whole.
        warnings.warn(
            f"latency cache file {self.path} is unreadable ({reason}); ignoring it "
            "and starting afresh",
            UserWarning,
            stacklevel=3,
        )
        return {}

    def get(self, key: str) -> Any:
        return self._read().get(key)

    def set(self, key: str, value: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.lock_path):
            data = self._read()
            data[key] = value
            fd, tmp = tempfile.mkstemp(
                dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp"
            )
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(data, fh, sort_keys=True, indent=1)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    def keys(self) -> list[str]:
        return sorted(self._read())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock held while the block runs."""
    with open(path, "a+b") as fh:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class LatencyCache:
    """Latency measurements by cache key, in any :class:`KeyValueStore`.

    Args:
        store: an object with ``get(key)`` (``None`` when absent) and ``set(key, value)``
            taking JSON-serialisable values (e.g. :class:`JsonFileStore`, or the search
            layer's Optuna-backed store); a plain ``dict`` is wrapped; default: in memory.

    Example:
        >>> cache = LatencyCache()
        >>> cache.get("missing") is None
        True
    """

    def __init__(self, store: KeyValueStore | MutableMapping[str, Any] | None = None) -> None:
        if store is None:
            store = MemoryStore()
        elif isinstance(store, MutableMapping):
            store = MemoryStore(store)
        elif not isinstance(store, KeyValueStore):
            raise TypeError(
                f"store={store!r} is not allowed; allowed values: an object with "
                "get(key) and set(key, value), a dict, or None"
            )
        self.store: KeyValueStore = store
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict[str, Any] | None:
        value = self.store.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def set(self, key: str, value: dict[str, Any]) -> None:
        self.store.set(key, value)
