"""Regions from label maps: box convention, RLE, sizes in mm, laterality, phantom ground truth."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from pipeline.geometry import (
    bbox_of,
    convex_hull,
    max_diameter_mm,
)
from pipeline.roi.regions import RegionConfig, components


def test_fragments_below_min_area_are_dropped():
    lab = np.zeros((50, 50), np.int32)
    lab[5:15, 5:15] = 2  # 100 px = 25 mm² at 0.5 mm
    lab[30:32, 30:32] = 2  # 4 px = 1 mm²: a fragment
    lab[40:45, 40:45] = 1  # body: ignored by default
    comps = components(lab, {1: "body", 2: "nodule"}, (0.5, 0.5), RegionConfig(min_area_mm2=4.0))
    assert [(v, n, int(m.sum())) for v, n, m in comps] == [(2, "nodule", 100)]


def _check_caption_facts(region, lesion, truth, pix):
    """The caption attributes agree with the phantom's ground truth."""
    from pipeline.captions.attributes import load_vocab, size_class

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
    assert region["caption_region"]  # negatives: drawn from the priors, may be none (tests/pipeline/captions)


def test_phantom_lesions_match_ground_truth(tmp_path):
    """Each lesion's region on its central slice: label, side and diameter agree with truth."""
    from pipeline.phantoms.studies import make_phantoms
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
    from pipeline.roi.regions import label_prompts

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


def test_empty_mask_measures_and_row():
    """An empty mask (a SAM box that found nothing) measures as empty instead of failing, and
    its regions row has no RLE, zero area and diameter, and no centroid or side."""
    from pipeline.geometry import centroid_ras, hull_points
    from pipeline.roi.regions import region_row

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

    from pipeline.geometry import present_values

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
