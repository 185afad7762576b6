"""Bit-packing of sub-8-bit integer weights and the ``weights.packed.npz`` sidecar.

ONNX Runtime's integer kernels (QLinearConv, QGemm, ...) only take 8-bit weights, so a
4-bit weight runs as an int8 tensor whose values happen to lie on the 4-bit grid. What a
user ships, though, is the packed form: ``ceil(numel * bits / 8)`` bytes. The sidecar holds
those packed bytes; :func:`unpack_bits` restores the int8 values exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDECAR_NAME = "weights.packed.npz"
_MANIFEST = "__manifest__"


def pack_bits(values: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Pack integers in ``[qmin, qmin + 2**bits - 1]`` into ``ceil(n * bits / 8)`` bytes.

    Values are stored as unsigned offsets ``v - qmin``, ``bits`` bits each, least
    significant bit first.

    Example:
        >>> pack_bits(np.array([-7, 7, 0], dtype=np.int8), bits=4, qmin=-7).tolist()
        [224, 7]
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not allowed; allowed values: 1..8")
    flat = np.asarray(values).astype(np.int64).ravel() - qmin
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(
            f"values outside [{qmin}, {qmin + 2**bits - 1}] cannot be packed into {bits} bits"
        )
    # One row of 8 little-endian bits per value, keep the low ``bits`` of each.
    rows = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1, bitorder="little")
    return np.packbits(rows[:, :bits].ravel(), bitorder="little")


def unpack_bits(
    packed: np.ndarray,
    bits: int,
    qmin: int,
    shape: tuple[int, ...],
    dtype: np.dtype | type = np.int8,
) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Example:
        >>> unpack_bits(np.array([224, 7], dtype=np.uint8), 4, -7, (3,)).tolist()
        [-7, 7, 0]
    """
    n = math.prod(shape)
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: n * bits]
    rows = stream.reshape(n, bits).astype(np.int64)
    offsets = (rows << np.arange(bits, dtype=np.int64)).sum(axis=1)
    return (offsets + qmin).astype(dtype).reshape(shape)


@dataclass(frozen=True)
class PackedTensor:
    """One sub-8-bit weight in the sidecar: the packed bytes and how to restore them."""

    name: str
    bits: int
    qmin: int
    shape: tuple[int, ...]
    dtype: str  # "int8" or "uint8": the initializer type the ONNX graph expects
    data: np.ndarray  # uint8, ceil(numel * bits / 8) bytes

    def unpack(self) -> np.ndarray:
        return unpack_bits(self.data, self.bits, self.qmin, self.shape, np.dtype(self.dtype))


def write_sidecar(path: str | Path, tensors: Mapping[str, PackedTensor]) -> Path:
    """Write packed tensors and their manifest to an ``.npz`` file (uncompressed)."""
    path = Path(path)
    manifest = {
        t.name: {
            "bits": t.bits,
            "qmin": t.qmin,
            "shape": list(t.shape),
            "dtype": t.dtype,
            "key": f"t{i}",
        }
        for i, t in enumerate(tensors.values())
    }
    arrays = {manifest[t.name]["key"]: t.data for t in tensors.values()}
    arrays[_MANIFEST] = np.array(json.dumps(manifest, sort_keys=True))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def read_sidecar(path: str | Path) -> dict[str, PackedTensor]:
    """Read a sidecar written by :func:`write_sidecar`."""
    with np.load(Path(path), allow_pickle=False) as npz:
        manifest = json.loads(str(npz[_MANIFEST]))
        return {
            name: PackedTensor(
                name=name,
                bits=m["bits"],
                qmin=m["qmin"],
                shape=tuple(m["shape"]),
                dtype=m["dtype"],
                data=np.asarray(npz[m["key"]], dtype=np.uint8),
            )
            for name, m in manifest.items()
        }
