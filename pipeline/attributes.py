"""Checked facts about each region, derived only from what the corpus stores.

Inputs are an images-table row (PNG pixels, window bounds, geometry, modality, plane) and the
regions-table rows of that image (masks as COCO RLE). The caption writer (describe.py) and the
caption checker (catalogs) both call :func:`derive_attributes`, so a caption can be re-derived
from the stored data alone. Rules and thresholds live in ``pipeline/captions/vocab_v1.json``.

* label: display name from the vocabulary; lesion when the label matches a lesion pattern.
* laterality: the region centroid against the body midline on this slice (pipeline.regions).
* location (lesions): the organ region whose mask holds the lesion centroid ("in"), else the
  nearest organ within ``next_to_mm`` ("next to"); sides are dropped from organ names.
* size: maximal Feret diameter (mm) and its class.
* intensity: mean inside the mask against a ring of ``ring_mm`` around it (inside the body):
  CT in HU (pixels mapped back through the window), other modalities in grey-level fraction;
  the value stored is the mean HU (CT) or the percentile of the mean among body pixels.
* shape: circularity 4πA/P², elongation 1 − minor/major axis, solidity A/convex A.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import perimeter, regionprops

from .regions import (
    _otsu_body,
    body_midline_x,
    centroid_ras,
    decode_rle,
    laterality,
    max_diameter_mm,
)

VOCAB_DIR = Path(__file__).parent / "captions"


@lru_cache(maxsize=4)
def load_vocab(version: str = "v1") -> dict:
    """The caption vocabulary and thresholds of ``version`` (pipeline/captions/vocab_<v>.json)."""
    return json.loads((VOCAB_DIR / f"vocab_{version}.json").read_text())


def display(label: str, vocab: dict) -> str:
    return vocab["label_display"].get(label, label.replace("_", " "))


def is_lesion(label: str, vocab: dict) -> bool:
    return any(p in label.lower() for p in vocab["lesion_patterns"])


def size_class(diameter_mm: float, vocab: dict) -> str:
    for name, lo, hi in vocab["size_classes_mm"]:
        if lo <= diameter_mm < hi:
            return name
    return vocab["size_classes_mm"][-1][0]


def modality_values(pixels: np.ndarray, image: dict) -> np.ndarray:
    """(H, W) float64 modality values (HU for CT) of the stored PNG, through its window."""
    top = 65535.0 if pixels.dtype == np.uint16 else 255.0
    lo, hi = float(image["window_min"]), float(image["window_max"])
    return lo + pixels.astype(np.float64) / top * (hi - lo)


def _ring(mask: np.ndarray, spacing, ring_mm: float, body: np.ndarray) -> np.ndarray:
    dist = ndimage.distance_transform_edt(~mask, sampling=(spacing[0], spacing[1]))
    return (dist > 0) & (dist <= ring_mm) & body


def intensity(mask, pixels, image, body, vocab) -> tuple[str, float, str]:
    """(class "hyper"/"iso"/"hypo", value, unit) of the region against its surroundings."""
    ring = _ring(mask, image["pixel_spacing_mm"], vocab["ring_mm"], body)
    if image["modality"] == "CT":
        values = modality_values(pixels, image)
        inside = float(values[mask].mean())
        around = float(values[ring].mean()) if ring.any() else inside
        thr, diff, unit, value = vocab["intensity_thresholds"]["CT_hu"], inside - around, "HU", inside
    else:
        grey = pixels.astype(np.float64) / (65535.0 if pixels.dtype == np.uint16 else 255.0)
        inside = float(grey[mask].mean())
        around = float(grey[ring].mean()) if ring.any() else inside
        thr, diff, unit = vocab["intensity_thresholds"]["other_fraction"], inside - around, "percentile"
        ref = grey[body] if body.any() else grey.ravel()
        value = float((ref < inside).mean() * 100.0)
    cls = "hyper" if diff > thr else "hypo" if diff < -thr else "iso"
    return cls, round(value, 3), unit


def shape(mask: np.ndarray) -> tuple[float, float, float, str]:
    """(circularity, elongation, solidity, class) of an (H, W) bool mask, in pixel units."""
    props = regionprops(mask.astype(np.uint8))[0]
    p = perimeter(mask)
    circ = float(min(1.0, 4 * math.pi * props.area / p**2)) if p > 0 else 1.0
    major = props.axis_major_length
    elong = float(1 - props.axis_minor_length / major) if major > 0 else 0.0
    solid = float(props.solidity)
    cls = "irregular" if solid < 0.85 else "oval" if elong > 0.35 else "round"
    return round(circ, 4), round(elong, 4), round(solid, 4), cls


def _location(mask, centroid_px, organs, spacing, vocab) -> tuple[str | None, str | None]:
    """("in" | "next to", organ display) for a lesion, from the organ masks on the image."""
    r, c = (int(round(v)) for v in centroid_px)
    for name, organ in organs:
        if organ[min(r, organ.shape[0] - 1), min(c, organ.shape[1] - 1)]:
            return "in", name
    best, best_d = None, float(vocab["next_to_mm"])
    for name, organ in organs:
        d = ndimage.distance_transform_edt(~organ, sampling=(spacing[0], spacing[1]))[mask].min()
        if d <= best_d:
            best, best_d = name, float(d)
    return ("next to", best) if best else (None, None)


def _organs(masks, regions, vocab) -> list[tuple[str, np.ndarray]]:
    # holes filled: a lesion carved out of its organ's label still lies "in" the organ
    out = [(display(r["label"], vocab), ndimage.binary_fill_holes(m))
           for r, m in zip(regions, masks, strict=True)
           if r["source"] == "labels" and not is_lesion(r["label"], vocab)]
    return sorted(out, key=lambda t: t[0])


def derive_attributes(image: dict, pixels: np.ndarray, regions: list[dict],
                      vocab: dict | None = None) -> list[dict]:
    """One attribute record per region of ``image`` (same order), from stored data only."""
    vocab = vocab or load_vocab()
    masks = [decode_rle(r["mask_rle"]) if r["mask_rle"] else None for r in regions]
    grey8 = pixels if pixels.dtype == np.uint8 else (pixels >> 8).astype(np.uint8)
    body = _otsu_body(grey8)
    midline = body_midline_x(image["pixel_to_ras"], body)
    organs = _organs([m if m is not None else np.zeros(pixels.shape, bool) for m in masks],
                     regions, vocab)
    spacing = image["pixel_spacing_mm"]
    out = []
    for region, mask in zip(regions, masks, strict=True):
        if mask is None or not mask.any():
            out.append(None)
            continue
        lesion = is_lesion(region["label"], vocab)
        cen = centroid_ras(mask, image["pixel_to_ras"])
        rr, cc = np.nonzero(mask)
        rel, loc = _location(mask, (rr.mean(), cc.mean()), organs, spacing, vocab) if lesion else (None, None)
        diam = max_diameter_mm(mask, spacing)
        icls, ival, unit = intensity(mask, pixels, image, body, vocab)
        circ, elong, solid, scls = shape(mask)
        out.append({
            "label": display(region["label"], vocab), "is_lesion": lesion,
            "laterality": laterality(cen[0], midline, vocab["midline_band_mm"]), "location": loc,
            "location_relation": rel, "max_diameter_mm": round(diam, 3),
            "size_class": size_class(diam, vocab), "intensity_class": icls,
            "intensity_value": ival, "intensity_unit": unit, "circularity": circ,
            "elongation": elong, "solidity": solid, "shape_class": scls,
            "modality": image["modality"], "plane": image["plane"],
        })
    return out
