"""pipeline.geometry: boxes, RLE, diameters, hulls, laterality, holes, midline, label values."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.geometry import (
    bbox_of,
    convex_hull,
    decode_rle,
    encode_rle,
    laterality,
    max_diameter_mm,
)


def test_bbox_is_pixel_edges_xyxy():
    m = np.zeros((30, 40), bool)
    m[5:9, 10:21] = True  # rows 5..8, cols 10..20
    assert bbox_of(m) == [10.0, 5.0, 21.0, 9.0]


def test_rle_is_pycocotools_compatible():
    rng = np.random.default_rng(0)
    m = rng.random((37, 23)) > 0.6
    rle = encode_rle(m)
    assert rle["size"] == [37, 23] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode_rle(rle), m)
    coco = {"size": rle["size"], "counts": rle["counts"].encode()}
    assert int(mask_utils.area(coco)) == int(m.sum())


def test_max_diameter_respects_anisotropic_spacing():
    m = np.zeros((40, 60), bool)
    m[10:20, 10:30] = True  # 10 rows x 20 cols
    d = max_diameter_mm(m, (0.5, 2.0))  # row 0.5 mm, col 2.0 mm
    assert d == pytest.approx(np.hypot(20 * 2.0, 10 * 0.5))
    yy, xx = np.mgrid[:101, :101]
    disk = (yy - 50) ** 2 + (xx - 50) ** 2 <= 40**2  # radius 40 px at 0.25 mm → 20 mm
    assert 20.0 <= max_diameter_mm(disk, (0.25, 0.25)) <= 20.0 + 0.25 * 1.5


@pytest.mark.parametrize("seed", range(6))
def test_fast_hull_matches_hull_of_every_pixel_corner(seed):
    """The per-row-extremes hull (what Feret diameter and solidity use) equals scipy's hull of
    every corner of every pixel: same area, same largest vertex distance in mm."""
    from scipy.spatial import ConvexHull

    rng = np.random.default_rng(seed)
    m = np.zeros((48, 64), bool)
    for _ in range(3):  # a few overlapping blobs and a one-pixel line: concave, ragged shapes
        r0, c0 = rng.integers(0, 40), rng.integers(0, 56)
        m[r0:r0 + rng.integers(1, 9), c0:c0 + rng.integers(1, 9)] = True
    m[rng.integers(0, 48), 5:40] = True
    pts = _all_corners(m).astype(float)
    ref = ConvexHull(pts)
    hull = convex_hull(m).astype(float)
    area = 0.5 * abs(np.dot(hull[:, 0], np.roll(hull[:, 1], 1))
                     - np.dot(hull[:, 1], np.roll(hull[:, 0], 1)))
    assert area == pytest.approx(ref.volume)
    spacing = (0.7, 1.3)
    v = pts[ref.vertices] * [spacing[1], spacing[0]]
    brute = np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1)).max()
    assert max_diameter_mm(m, spacing) == pytest.approx(brute)


def test_laterality_sides():
    assert laterality(30.0, 0.0, 5.0) == "right"  # RAS +x is the patient's right
    assert laterality(-30.0, 0.0, 5.0) == "left"
    assert laterality(2.0, 0.0, 5.0) == "midline"
    assert laterality(2.0, None, 5.0) is None


def test_fill_holes_equals_scipy():
    from scipy import ndimage

    from pipeline.geometry import fill_holes

    rng = np.random.default_rng(3)
    for i in range(300):
        m = rng.random(tuple(rng.integers(1, 40, 2))) < rng.uniform(0.2, 0.8)
        if i % 2:
            m = ndimage.binary_dilation(m)  # rings with holes
        assert (fill_holes(m) == ndimage.binary_fill_holes(m)).all()


def test_midline_from_row_ends_equals_all_body_pixels():
    """x is affine in (col, row): the midline from each row's end pixels equals the one from
    every body pixel, also for an oblique (rotated) pixel → RAS map."""
    from pipeline.geometry import body_midline_x

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:90, :120]
    body = ((yy - 45) / 40) ** 2 + ((xx - 60) / 50) ** 2 <= 1
    body &= rng.random(body.shape) > 0.05  # holes do not matter
    for angle in (0.0, 0.3, 1.2):
        c, s = np.cos(angle), np.sin(angle)
        m = np.array([[-0.7 * c, 0.8 * s, 12.5], [0.7 * s, 0.8 * c, -3.0], [0, 0, 1.0]])
        r, col = np.nonzero(body)
        x = m[0, 0] * col + m[0, 1] * r + m[0, 2]
        assert body_midline_x(m.ravel().tolist(), body) == float((x.min() + x.max()) / 2)


def test_extent_is_the_tight_window_of_any_mask():
    """extent (one OpenCV scan) equals the window of the mask's non-zero rows and columns,
    for empty, single-pixel, full, strided and non-bool masks."""
    from pipeline.geometry import extent

    def by_numpy(m):
        rows, cols = np.flatnonzero(np.any(m, 1)), np.flatnonzero(np.any(m, 0))
        return None if rows.size == 0 else (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)

    rng = np.random.default_rng(4)
    masks = [np.zeros((7, 9), bool), np.ones((5, 3), bool), np.eye(6, dtype=bool)[::-1]]
    one = np.zeros((40, 30), bool)
    one[39, 0] = True
    masks += [one, one[::2, ::-1], (rng.random((64, 80)) < 0.002).astype(np.uint8)]
    masks += [rng.random((33, 47)) < p for p in (0.0005, 0.01, 0.3)]
    for m in masks:
        assert extent(m) == by_numpy(m), m.shape


def _all_corners(mask: np.ndarray) -> np.ndarray:
    r, c = np.nonzero(mask)
    return np.concatenate([np.stack([c + dc, r + dr], 1) for dc in (0, 1) for dr in (0, 1)])
