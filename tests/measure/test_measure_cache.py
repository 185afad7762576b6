from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from autoquant.measure import JsonFileStore, LatencyCache, MemoryStore


def _writer(path: str, worker: int, n: int) -> None:
    store = JsonFileStore(path)
    for i in range(n):
        store.set(f"w{worker}-{i}", {"median_ms": float(i)})


def test_json_store_parallel_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "latency.json"
    # fork is quick (no re-import of torch); the children only touch the JSON file
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())
    assert set(data) == {f"w{w}-{i}" for w in range(4) for i in range(25)}
    assert JsonFileStore(path).get("w3-24") == {"median_ms": 24.0}
    # atomic replace leaves no temporary files behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["latency.json", "latency.json.lock"]


def test_json_store_missing_file(tmp_path: Path) -> None:
    assert JsonFileStore(tmp_path / "none.json").get("k") is None
    assert not (tmp_path / "none.json").exists()


@pytest.mark.parametrize("junk", [b"{not json", b"[1, 2]", b"\xff\xfe\x00"])
def test_json_store_corrupt_file_is_ignored_then_rewritten(tmp_path: Path, junk: bytes) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(junk)
    with pytest.warns(UserWarning, match="bad.json is unreadable"):
        assert JsonFileStore(bad).get("k") is None
    with pytest.warns(UserWarning):
        JsonFileStore(bad).set("k", {"median_ms": 2.0})
    assert json.loads(bad.read_text()) == {"k": {"median_ms": 2.0}}


def test_latency_cache_counts_and_stores() -> None:
    backing: dict[str, object] = {}
    cache = LatencyCache(backing)  # a plain dict is wrapped
    assert cache.get("a") is None
    cache.set("a", {"median_ms": 1.0})
    assert cache.get("a") == {"median_ms": 1.0}
    assert backing == {"a": {"median_ms": 1.0}}
    assert (cache.hits, cache.misses) == (1, 1)


def test_latency_cache_accepts_get_set_store_and_rejects_others() -> None:
    store = MemoryStore()
    LatencyCache(store).set("k", {"v": 1})
    assert store.get("k") == {"v": 1}
    with pytest.raises(TypeError, match="store=.*allowed values"):
        LatencyCache(store=42)  # type: ignore[arg-type]
