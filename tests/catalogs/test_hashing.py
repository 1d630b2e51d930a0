"""popcount64 (np.bitwise_count where numpy has it) equals the byte-table count it replaced."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from catalogs import verify


def popcount_table(x: np.ndarray) -> np.ndarray:
    """The former implementation: a 256-entry table over the 8 bytes of each word."""
    x = np.asarray(x, np.uint64)
    table = np.array([bin(i).count("1") for i in range(256)], np.int64)
    return table[x[..., None].view(np.uint8)].sum(-1)


words = hnp.arrays(np.uint64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=12),
                   elements=st.integers(0, 2**64 - 1))


@settings(max_examples=200, deadline=None)
@given(words)
def test_popcount_equals_the_byte_table(x):
    got = verify.popcount64(x)
    assert got.dtype == np.int64 and got.shape == x.shape
    np.testing.assert_array_equal(got, popcount_table(x))
    assert got.ravel().tolist() == [bin(int(v)).count("1") for v in x.ravel()]


@settings(max_examples=50, deadline=None)
@given(words)
def test_popcount_without_bitwise_count(x):
    """numpy < 2 has no bitwise_count: the fallback gives the same counts."""
    saved = getattr(np, "bitwise_count", None)
    if saved is not None:
        del np.bitwise_count
    try:
        np.testing.assert_array_equal(verify.popcount64(x), popcount_table(x))
    finally:
        if saved is not None:
            np.bitwise_count = saved


def test_popcount_hamming_distances():
    h = np.array([0, 2**64 - 1, 0xFF00FF00FF00FF00], np.uint64)
    d = verify.popcount64(h[:, None] ^ h[None, :])
    np.testing.assert_array_equal(d, [[0, 64, 32], [64, 0, 32], [32, 32, 0]])
