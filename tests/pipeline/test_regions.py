"""Regions from label maps: box convention, RLE, sizes in mm, laterality, phantom ground truth."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from pipeline.regions import (
    RegionConfig,
    bbox_of,
    components,
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


def _all_corners(mask: np.ndarray) -> np.ndarray:
    r, c = np.nonzero(mask)
    return np.concatenate([np.stack([c + dc, r + dr], 1) for dc in (0, 1) for dr in (0, 1)])


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


def test_fragments_below_min_area_are_dropped():
    lab = np.zeros((50, 50), np.int32)
    lab[5:15, 5:15] = 2  # 100 px = 25 mm² at 0.5 mm
    lab[30:32, 30:32] = 2  # 4 px = 1 mm²: a fragment
    lab[40:45, 40:45] = 1  # body: ignored by default
    comps = components(lab, {1: "body", 2: "nodule"}, (0.5, 0.5), RegionConfig(min_area_mm2=4.0))
    assert [(v, n, int(m.sum())) for v, n, m in comps] == [(2, "nodule", 100)]


def test_laterality_sides():
    assert laterality(30.0, 0.0, 5.0) == "right"  # RAS +x is the patient's right
    assert laterality(-30.0, 0.0, 5.0) == "left"
    assert laterality(2.0, 0.0, 5.0) == "midline"
    assert laterality(2.0, None, 5.0) is None


def _check_caption_facts(region, lesion, truth, pix):
    """The caption attributes agree with the phantom's ground truth."""
    from pipeline.attributes import load_vocab, size_class

    a, vocab = region["attributes"], load_vocab()
    assert a["laterality"] == lesion["side"]
    d = lesion["diameter_mm"]
    bounds = [lo for _, lo, _ in vocab["size_classes_mm"]]
    if all(abs(d - b) > 3 * pix for b in bounds):
        assert a["size_class"] == size_class(d, vocab)
    host = truth["organ_hu"].get(lesion["organ"])
    if lesion["organ"] == "liver" and host is not None and abs(lesion["density_hu"] - host) > 25:
        assert a["intensity_class"] == ("hyper" if lesion["density_hu"] > host else "hypo")
    if lesion["organ"].startswith("lung"):
        assert a["intensity_class"] == "hyper" and a["location"] == "lung"
    assert region["caption_region"] and len(region["negatives"]) >= 3


def test_phantom_lesions_match_ground_truth(tmp_path):
    """Each lesion's region on its central slice: label, side and diameter agree with truth."""
    from pipeline.phantoms import make_phantoms
    from workflows.build_corpus import main

    make_phantoms(tmp_path / "ph", patients=3, seed=11)
    out = tmp_path / "corpus"
    assert main([str(tmp_path / "ph"), "--out", str(out), "--every-k", "0"]) == 0
    regions = pq.read_table(out / "regions").to_pylist()
    images = {r["image_id"]: r for r in pq.read_table(out / "images", columns=[
        "image_id", "slice_index", "pixel_to_ras", "pixel_spacing_mm"]).to_pylist()}
    truths = [json.loads(p.read_text()) for p in sorted((tmp_path / "ph").rglob("*_truth.json"))]
    checked = 0
    for truth in truths:
        for lesion in truth["lesions"]:
            c = np.array(lesion["centre_ras_mm"])
            near = [r for r in regions if r["label"] == lesion["label"]
                    and np.linalg.norm(np.array(r["centroid_ras"]) - c) < lesion["diameter_mm"] / 4]
            assert near, f"no region at lesion {lesion}"
            best = max(near, key=lambda r: r["max_diameter_mm"])
            pix = max(images[best["image_id"]]["pixel_spacing_mm"])
            assert best["laterality"] == lesion["side"]
            assert abs(best["max_diameter_mm"] - lesion["diameter_mm"]) <= 3 * pix
            _check_caption_facts(best, lesion, truth, pix)
            checked += 1
    assert checked >= 6
    assert all(r["source"] == "labels" and r["score"] is None for r in regions)
    assert len({r["region_id"] for r in regions}) == len(regions)


def test_boxes_route_prompts_can_be_limited_to_some_labels():
    from pipeline.regions import label_prompts

    lab = np.zeros((40, 40), np.int32)
    lab[2:12, 2:12] = 1
    lab[20:30, 20:30] = 2
    image = {"pixel_spacing_mm": [1.0, 1.0]}
    names = {1: "liver", 2: "liver_mass"}
    every = label_prompts(image, lab, names, RegionConfig(routes=("labels", "boxes"), ignore_labels=()))
    some = label_prompts(image, lab, names, RegionConfig(routes=("boxes",), box_labels=("mass",)))
    assert [p[0] for p in every] == ["liver", "liver_mass"]
    assert some == [("liver_mass", 2, [20.0, 20.0, 30.0, 30.0])]


def _random_labels(rng, shape=(48, 64), values=4) -> np.ndarray:
    """A label slice of blobs (dilated noise) with values 1..values and a few negatives."""
    from scipy import ndimage

    lab = np.zeros(shape, np.int32)
    for v in range(1, values + 1):
        lab[ndimage.binary_dilation(rng.random(shape) < 0.01, iterations=2)] = v
    lab[rng.random(shape) < 0.002] = -3  # negative values count as background
    return lab


def test_components_windowed_labelling_equals_whole_slice_labelling():
    """Each value is labelled inside its own bounding window: the components, their order
    (value, then raster order of the first pixel) and their masks equal a whole-slice
    scipy labelling."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    names = {1: "liver", 2: "body", 3: "kidney_left", 4: "nodule"}
    cfg = RegionConfig(min_area_mm2=2.0)
    for _ in range(20):
        lab = _random_labels(rng)
        want = []
        for v in sorted(set(np.unique(lab)) - {0, -3, 2}):
            cc, n = ndimage.label(lab == v, structure=np.ones((3, 3)))  # numbered in raster order
            want += [(int(v), names[int(v)], cc == k) for k in range(1, n + 1)
                     if (cc == k).sum() * 0.5 * 0.5 >= 2.0]
        got = components(lab, names, (0.5, 0.5), cfg)
        assert [(v, n) for v, n, _ in got] == [(v, n) for v, n, _ in want]
        assert all((g == w).all() for (_, _, g), (_, _, w) in zip(got, want, strict=True))


def test_fill_holes_equals_scipy():
    from scipy import ndimage

    from pipeline.regions import fill_holes

    rng = np.random.default_rng(3)
    for i in range(300):
        m = rng.random(tuple(rng.integers(1, 40, 2))) < rng.uniform(0.2, 0.8)
        if i % 2:
            m = ndimage.binary_dilation(m)  # rings with holes
        assert (fill_holes(m) == ndimage.binary_fill_holes(m)).all()


def test_midline_from_row_ends_equals_all_body_pixels():
    """x is affine in (col, row): the midline from each row's end pixels equals the one from
    every body pixel, also for an oblique (rotated) pixel → RAS map."""
    from pipeline.regions import body_midline_x

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


def test_empty_mask_measures_and_row():
    """An empty mask (a SAM box that found nothing) measures as empty instead of failing, and
    its regions row has no RLE, zero area and diameter, and no centroid or side."""
    from pipeline.regions import centroid_ras, hull_points, region_row

    empty = np.zeros((20, 30), bool)
    assert bbox_of(empty) == [0.0, 0.0, 0.0, 0.0]
    assert hull_points(empty).shape == (0, 2) and len(convex_hull(empty)) == 0
    assert max_diameter_mm(empty, (0.5, 0.5)) == 0.0
    image = {"image_id": "i", "unit_key": "u", "series_key": "s", "patient_key": "p",
             "split": "train", "modality": "CT", "plane": "axial",
             "pixel_spacing_mm": [0.5, 0.5], "pixel_to_ras": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    row = region_row(image, "lung_nodule", None, "boxes", empty, [1, 1, 5, 5], 0.0,
                     RegionConfig(routes=("boxes",)), score=0.1, segmenter="lite-medsam")
    assert (row["area_px"], row["mask_rle"], row["max_diameter_mm"], row["laterality"]) == \
        (0, None, 0.0, None)
    assert all(np.isnan(row["centroid_ras"]))
    one = empty.copy()
    one[4, 7] = True
    assert centroid_ras(one, image["pixel_to_ras"]) == [7.0, 4.0, 1.0]


def test_atlas_sized_label_values_cost_no_memory():
    """Atlas ids in the hundreds of millions (the Allen mouse CCF's go past 600 000 000) give
    the same components as small ids, without any array or list sized by the largest id."""
    import tracemalloc

    from pipeline.regions import present_values

    rng = np.random.default_rng(5)
    cfg = RegionConfig(min_area_mm2=2.0)
    small_names = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "nodule"}
    ids = {1: 614_454_277, 2: 7, 3: 2_000_000_000, 4: 312_782_574}
    big_names = {ids[v]: n for v, n in small_names.items()}
    for _ in range(5):
        small = _random_labels(rng)
        big = small.copy()
        for v, b in ids.items():
            big[small == v] = b
        tracemalloc.start()
        got = components(big, big_names, (0.5, 0.5), cfg)
        values = present_values(big)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8 << 20, f"peak {peak} bytes"
        # components come in value order, then raster order within a value (stable sort)
        want = sorted(((ids[v], n, m) for v, n, m in components(small, small_names, (0.5, 0.5),
                                                                 cfg)), key=lambda t: t[0])
        assert [(v, n) for v, n, _ in got] == [(v, n) for v, n, _ in want]
        assert all((g == w).all() for (_, _, g), (_, _, w) in zip(got, want, strict=True))
        assert values == sorted(ids[v] for v in present_values(small))


def test_extent_is_the_tight_window_of_any_mask():
    """extent (one OpenCV scan) equals the window of the mask's non-zero rows and columns,
    for empty, single-pixel, full, strided and non-bool masks."""
    from pipeline.regions import extent

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
