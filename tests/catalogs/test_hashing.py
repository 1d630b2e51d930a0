"""popcount64 (np.bitwise_count where numpy has it) equals the byte-table count it replaced;
the perceptual hashes are pinned (see catalogs/verify.py for why they are not imagehash)."""

from __future__ import annotations

import cv2
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


def _picture() -> np.ndarray:
    """80 × 64 grey ramp with a bright disc and a dark square (integer-valued)."""
    yy, xx = np.mgrid[0:64, 0:80].astype(np.float32)
    g = 40 + 1.5 * xx + 0.8 * yy
    cv2.circle(g, (25, 30), 12, 230, -1)
    cv2.rectangle(g, (50, 8), (70, 24), 20, -1)
    return np.clip(g, 0, 255).round()


def test_hashes_are_pinned():
    """Hashes are compared across runs and corpora: a change of implementation (another
    resize, DCT, median or library) must show here and be documented, not slip through."""
    g = _picture()
    assert verify.phash64(g) == 0x8B4B38B486946F4F
    assert verify.dhash64(g) == 0xFFF3C3C7CFEFFFFF
    png8 = cv2.imencode(".png", g.astype(np.uint8))[1].tobytes()
    png16 = cv2.imencode(".png", g.astype(np.uint16) * 257)[1].tobytes()
    for png in (png8, png16):  # 16-bit PNGs are scaled to 8 bits, not clipped
        assert verify.hash_png(png)["hash"] == 0x8B4B38B486946F4F
        assert verify.hash_png(png, "dhash")["hash"] == 0xFFF3C3C7CFEFFFFF
