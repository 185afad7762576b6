from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoquant.measure import pack_bits, read_sidecar, unpack_bits
from autoquant.measure._pack import PackedTensor, write_sidecar


@st.composite
def grids(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    bits = draw(st.integers(1, 8))
    symmetric = draw(st.booleans()) and bits > 1
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    values = draw(
        st.lists(st.integers(qmin, qmax), min_size=math.prod(shape), max_size=math.prod(shape))
    )
    dtype = np.int8 if symmetric else np.uint8
    return np.array(values, dtype=np.int64).astype(dtype).reshape(shape), bits, qmin


@given(grids())
@settings(max_examples=60, deadline=None)
def test_pack_round_trip_and_size(case: tuple[np.ndarray, int, int]) -> None:
    values, bits, qmin = case
    packed = pack_bits(values, bits, qmin)
    assert packed.dtype == np.uint8
    assert packed.nbytes == math.ceil(values.size * bits / 8)
    restored = unpack_bits(packed, bits, qmin, values.shape, values.dtype)
    assert restored.dtype == values.dtype
    np.testing.assert_array_equal(restored, values)


def test_two_4bit_values_per_byte_lsb_first() -> None:
    # offsets 1 and 2 -> low nibble 1, high nibble 2 -> 0x21
    assert pack_bits(np.array([0, 1]), bits=4, qmin=-1).tolist() == [0x21]


def test_out_of_grid_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot be packed into 4 bits"):
        pack_bits(np.array([9]), bits=4, qmin=-7)
    with pytest.raises(ValueError, match="bits=9"):
        pack_bits(np.array([0]), bits=9, qmin=0)


def test_sidecar_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-7, 8, (6, 3, 3, 3)).astype(np.int8)
    b = rng.integers(0, 32, (10, 7)).astype(np.uint8)
    tensors = {
        "a": PackedTensor("a", 4, -7, a.shape, "int8", pack_bits(a, 4, -7)),
        "b": PackedTensor("b", 5, 0, b.shape, "uint8", pack_bits(b, 5, 0)),
    }
    path = write_sidecar(tmp_path / "w.npz", tensors)
    back = read_sidecar(path)
    assert set(back) == {"a", "b"}
    np.testing.assert_array_equal(back["a"].unpack(), a)
    np.testing.assert_array_equal(back["b"].unpack(), b)
    assert back["b"].data.nbytes == math.ceil(b.size * 5 / 8)
