from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

import autoquant
from autoquant.tasks import DATA_ENV, DataIntegrityError, data_dir, data_file, get_task
from autoquant.tasks._files import cached_artifact


@pytest.mark.parametrize(
    ("task", "missing"),
    [
        ("mnist-lenet5", "lenet5_mnist.pt"),
        ("cifar10-resnet20", "resnet20-12fca82f.th"),
        ("cifar10-resnet56", "resnet56-4bfd9763.th"),
    ],
)
def test_missing_data_names_file_and_setting(
    task: str, missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        get_task(task)
    assert missing in str(info.value) and DATA_ENV in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_data_dir_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    repo = Path(autoquant.__file__).resolve().parents[1]
    if (repo / ".." / "shared" / "data").is_dir():
        assert data_dir() == (repo / ".." / "shared" / "data").resolve()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path


def test_checksum_mismatch_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mnist.npz").write_bytes(b"not mnist")
    good = hashlib.sha256(b"real mnist").hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{good}  ./mnist.npz\n")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(DataIntegrityError, match="mnist.npz"):
        data_file("mnist.npz")
    (tmp_path / "mnist.npz").write_bytes(b"real mnist")
    assert data_file("mnist.npz") == tmp_path / "mnist.npz"


class _Counter:
    """A cache whose value is text; counts builds."""

    def __init__(self) -> None:
        self.builds = 0

    def build(self) -> str:
        self.builds += 1
        time.sleep(0.05)  # widen the race window for the concurrency test
        return f"value{self.builds}"

    @staticmethod
    def save(value: str, f: IO[bytes]) -> None:
        f.write(value.encode())

    @staticmethod
    def load(path: Path) -> str:
        text = path.read_text()
        if not text.startswith("value"):
            raise ValueError("bad contents")
        return text

    def get(self, path: Path) -> tuple[str, bool]:
        return cached_artifact(path, self.build, self.save, self.load)


def test_cache_builds_once_then_loads(tmp_path: Path) -> None:
    c = _Counter()
    path = tmp_path / "a" / "x.bin"
    assert c.get(path) == ("value1", True)
    assert c.get(path) == ("value1", False)
    assert c.builds == 1 and not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["flip", "no_sidecar", "bad_contents", "truncate"])
def test_corrupt_cache_is_discarded_and_rebuilt(tmp_path: Path, damage: str) -> None:
    c = _Counter()
    path = tmp_path / "x.bin"
    c.get(path)
    sidecar = path.with_name(path.name + ".sha256")
    if damage == "flip":
        path.write_bytes(b"walue1")
    elif damage == "no_sidecar":
        sidecar.unlink()
    elif damage == "truncate":
        path.write_bytes(b"")
    else:  # a checksum that matches but contents the loader rejects
        path.write_bytes(b"junk")
        sidecar.write_text(hashlib.sha256(b"junk").hexdigest())
    with pytest.warns(UserWarning, match="corrupt cache"):
        assert c.get(path) == ("value2", True)
    assert c.get(path) == ("value2", False)


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    c = _Counter()
    path = tmp_path / "x.bin"
    results: list[tuple[str, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(c.get(path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.builds == 1
    assert sorted(r[1] for r in results) == [False, False, False, True]
    assert {r[0] for r in results} == {"value1"}


def _outcome(fn: Callable[[], object]) -> tuple[str, str]:
    """What a test calling ``fn`` would end with (skip and fail are caught, not raised)."""
    try:
        fn()
    except pytest.skip.Exception as exc:
        return "skip", str(exc)
    except pytest.fail.Exception as exc:
        return "fail", str(exc)
    except FileNotFoundError as exc:
        return "error", str(exc)
    return "pass", ""


def test_missing_data_skips_or_fails_under_require_data(
    built_task: Callable[..., object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    monkeypatch.delenv("AUTOQUANT_REQUIRE_DATA", raising=False)
    kind, msg = _outcome(lambda: built_task("mnist-lenet5"))
    assert kind == "skip" and "lenet5_mnist.pt not found" in msg and DATA_ENV in msg
    monkeypatch.setenv("AUTOQUANT_REQUIRE_DATA", "1")
    kind, msg = _outcome(lambda: built_task("mnist-lenet5"))
    assert kind == "fail" and "lenet5_mnist.pt" in msg and "AUTOQUANT_REQUIRE_DATA=1" in msg
    # Any other FileNotFoundError is a bug, never a skip.
    (tmp_path / "aq_broken_task.py").write_text(
        "def make():\n    raise FileNotFoundError('not a data file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AUTOQUANT_REQUIRE_DATA")
    assert _outcome(lambda: built_task("aq_broken_task:make")) == ("error", "not a data file")
