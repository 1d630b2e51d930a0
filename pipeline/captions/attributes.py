"""Checked facts about each region, derived only from what the corpus stores.

Inputs are an images-table row (PNG pixels, window bounds, geometry, modality, plane) and the
regions-table rows of that image (masks as COCO RLE). The caption writer (describe.py) and the
caption checker (catalogs) both call :func:`derive_attributes`, so a caption can be re-derived
from the stored data alone. Rules and thresholds live in ``pipeline/captions/vocab_v1.json``.

* label: v1: display name from the vocabulary; lesion when the label matches a lesion pattern.
  v2 (a vocabulary naming ``"structures"``): the canonical label of the structure vocabulary
  (pipeline/captions/structures_v1.json), whose category says lesion; unknown labels as v1.
* laterality: the region centroid against the body midline on this slice (pipeline.roi.regions).
* location (lesions): the organ region whose mask holds the lesion centroid ("in"), else the
  nearest organ within ``next_to_mm`` ("next to"); sides are dropped from organ names.
* size: maximal Feret diameter (mm) and its class.
* intensity: mean inside the mask against a ring of ``ring_mm`` around it (inside the body):
  CT in HU (pixels mapped back through the window), other modalities in grey-level fraction;
  the value stored is the mean HU (CT) or the percentile of the mean among body pixels.
* shape: circularity 4πA/P², elongation 1 − minor/major axis, solidity A/convex A.

Projection images (CR, DX, MG, US, ...: the image row's ``projection``, see
:data:`PROJECTION_FACTS`) have no 3D geometry, so: ``image_position`` (the centroid's third of
the image, "upper left" … "central", in the image's own rows and columns); laterality only from
PatientOrientation (the body midline along the axis that runs to patient Left or Right), None
without it, never from the nominal frame; diameter in mm only when the header gave a pixel
spacing (``spacing_known``), else None and the size class is the diameter as a fraction of the
image's longest side (``size_classes_image``).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from skimage.measure import perimeter

from pipeline.captions.findings import load_findings
from pipeline.captions.structures import Structure, canonical_label, load_structures
from pipeline.geometry import (
    body_mask,
    body_midline_x,
    centroid_ras,
    convex_hull,
    crop,
    decode_rle,
    extent,
    fill_holes,
    grow,
    laterality,
    max_diameter_mm,
    to_uint8,
)

VOCAB_DIR = Path(__file__).parent


#: The caption vocabulary new builds use (stored per row in ``caption_version``).
CAPTION_VERSION = "v2"

#: Image-row keys of a projection image (from the volume meta; series table columns):
#: ``projection`` (bool), ``spacing_known`` (bool), ``view_position`` (a ViewPosition defined
#: term or None), ``patient_orientation`` ([row direction, column direction] or None),
#: ``image_laterality`` (ImageLaterality L / R / B / U, else Laterality L / R, or None).
PROJECTION_FACTS = ("projection", "spacing_known", "view_position", "patient_orientation",
                    "image_laterality")


@lru_cache(maxsize=4)
def load_vocab(version: str = CAPTION_VERSION) -> dict:
    """The caption vocabulary and thresholds of ``version`` (pipeline/captions/vocab_<v>.json)."""
    return json.loads((VOCAB_DIR / f"vocab_{version}.json").read_text())


def structure_of(label: str, vocab: dict) -> Structure | None:
    """The structure-vocabulary entry of a region label, when ``vocab`` uses one (v2+) and
    knows the label; else the finding vocabulary's entry of an annotation table's finding
    label (category ``finding``); else None."""
    if not vocab.get("structures") or not isinstance(label, str):
        return None
    structures = load_structures(vocab["structures"])
    entry = structures.entries.get(label)
    if entry is None:
        canonical = canonical_label(label, structures)
        entry = structures.entries.get(canonical) if canonical else None
    if entry is None:
        entry = load_findings().entries.get(label)
    return entry


def display(label: str, vocab: dict) -> str:
    """The ``label`` attribute: v2 the canonical label of a known structure; else (and v1)
    the vocabulary's display name or the label's words."""
    entry = structure_of(label, vocab)
    if entry is not None:
        return entry.label
    return vocab["label_display"].get(label, label.replace("_", " "))


def organ_name(label: str, vocab: dict) -> str:
    """The name of an organ in a lesion's location: v2 the structure without its side
    ("lung" for lung_left); v1 the display name."""
    entry = structure_of(label, vocab)
    return entry.structure if entry is not None else display(label, vocab)


def is_lesion(label: str, vocab: dict) -> bool:
    entry = structure_of(label, vocab)
    if entry is not None:
        return entry.category in ("lesion", "finding")  # a finding is focal, as a lesion
    return any(p in label.lower() for p in vocab["lesion_patterns"])


def size_class(diameter_mm: float, vocab: dict) -> str:
    for name, lo, hi in vocab["size_classes_mm"]:
        if lo <= diameter_mm < hi:
            return name
    return vocab["size_classes_mm"][-1][0]


def image_size_class(fraction: float, vocab: dict) -> str:
    """The size class of a diameter given as a fraction of the image's longest side."""
    for name, lo, hi in vocab["size_classes_image"]:
        if lo <= fraction < hi:
            return name
    return vocab["size_classes_image"][-1][0]


def _centroid_px(mask: np.ndarray, ext=None) -> tuple[float, float]:
    """(row, col) mean pixel position of an (H, W) bool mask."""
    sub, r0, c0 = crop(mask, 0, ext)
    rr, cc = np.nonzero(sub)
    return float(rr.mean() + r0), float(cc.mean() + c0)


def image_position(row: float, col: float, shape) -> str:
    """The third of the image a pixel position lies in: "upper left", "upper central",
    "middle right", "central", ... (rows top → bottom, columns left → right of the image)."""
    v = ("upper", "middle", "lower")[min(2, int(3 * row / max(1, shape[0])))]
    h = ("left", "central", "right")[min(2, int(3 * col / max(1, shape[1])))]
    if v == "middle":
        return "central" if h == "central" else f"middle {h}"
    return f"{v} {h}"


_SIDE = {"L": "left", "R": "right"}


def projection_side(row: float, col: float, image: dict, body: np.ndarray,
                    vocab: dict) -> str | None:
    """Patient side of a pixel position on a projection image. An image of one side
    (ImageLaterality L or R: a left breast, a right hand): that side. Else, only on a body part
    that spans the midline (``midline_body_parts``, or none recorded; never a mammogram): the
    image axis whose PatientOrientation direction starts with L or R (row direction →
    columns, column direction → rows), compared with the body's midline along it (within a
    band of ``midline_band_mm``, or ``midline_band_image`` of the image without a known
    spacing). None otherwise, or without a body."""
    if image.get("image_laterality") in _SIDE:
        return _SIDE[image["image_laterality"]]
    part = (image.get("body_part") or "").upper().replace(" ", "")
    if image["modality"] == "MG" or (part and part not in vocab["midline_body_parts"]):
        return None
    orient = image.get("patient_orientation") or ()
    if len(orient) != 2 or body is None or not body.any():
        return None
    for axis, direction in ((1, orient[0]), (0, orient[1])):
        toward = _SIDE.get(str(direction)[:1])
        if toward is None:
            continue
        to_x = np.eye(3) if axis == 1 else np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])
        mid = body_midline_x(to_x, body)
        spacing = float(image["pixel_spacing_mm"][axis])
        band = (vocab["midline_band_mm"] / spacing if image.get("spacing_known")
                else vocab["midline_band_image"] * body.shape[axis])
        pos = col if axis == 1 else row
        away = "right" if toward == "left" else "left"
        return toward if pos > mid + band else away if pos < mid - band else "midline"
    return None


def modality_values(pixels: np.ndarray, image: dict) -> np.ndarray:
    """(H, W) float64 modality values (HU for CT) of the stored PNG, through its window."""
    top = 65535.0 if pixels.dtype == np.uint16 else 255.0
    lo, hi = float(image["window_min"]), float(image["window_max"])
    return lo + pixels.astype(np.float64) / top * (hi - lo)


def _window(mask: np.ndarray, spacing, margin_mm: float, ext=None) -> tuple[slice, slice]:
    """Slices of the mask's bounding box grown by ``margin_mm`` (+1 px), clipped;
    ``ext``: the mask's :func:`~pipeline.geometry.extent` when the caller has it."""
    pad = int(np.ceil(margin_mm / min(spacing))) + 1
    return grow(extent(mask) if ext is None else ext, pad, mask.shape)


def _ring(mask: np.ndarray, spacing, ring_mm: float, body: np.ndarray, ext=None) -> np.ndarray:
    """(h, w) bool ring inside the window returned with it: pixels within ``ring_mm`` of the
    mask, outside it, inside the body."""
    win = _window(mask, spacing, ring_mm, ext)
    dist = ndimage.distance_transform_edt(~mask[win], sampling=(spacing[0], spacing[1]))
    return win, (dist > 0) & (dist <= ring_mm) & body[win]


def _grey(pixels: np.ndarray) -> np.ndarray:
    """(H, W) float64 grey-level fraction of the stored pixels."""
    return pixels.astype(np.float64) / (65535.0 if pixels.dtype == np.uint16 else 255.0)


def _sorted_reference(grey: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Sorted grey levels of the body (all pixels when there is none): percentile reference."""
    return np.sort(grey[body] if body.any() else grey.ravel())


def intensity(mask, pixels, image, body, vocab, values=None, ext=None,
              reference=None) -> tuple[str, float, str]:
    """(class "hyper"/"iso"/"hypo", value, unit) of the region against its surroundings;
    ``values``: the image's modality values (CT) or grey fractions (others) if already
    computed; ``ext``: the mask's extent; ``reference``: :func:`_sorted_reference` (others)."""
    win, ring = _ring(mask, image["pixel_spacing_mm"], vocab["ring_mm"], body, ext)
    inner = mask[win]  # the window holds the whole mask: same pixels, same order as values[mask]
    if image["modality"] == "CT":
        values = modality_values(pixels, image) if values is None else values
        inside = float(values[win][inner].mean())
        around = float(values[win][ring].mean()) if ring.any() else inside
        thr, diff, unit, value = vocab["intensity_thresholds"]["CT_hu"], inside - around, "HU", inside
    else:
        grey = _grey(pixels) if values is None else values
        inside = float(grey[win][inner].mean())
        around = float(grey[win][ring].mean()) if ring.any() else inside
        thr, diff, unit = vocab["intensity_thresholds"]["other_fraction"], inside - around, "percentile"
        ref = _sorted_reference(grey, body) if reference is None else reference
        value = float(np.searchsorted(ref, inside, side="left") / len(ref) * 100.0)
    cls = "hyper" if diff > thr else "hypo" if diff < -thr else "iso"
    return cls, round(value, 3), unit


def shape(mask: np.ndarray, ext=None) -> tuple[float, float, float, str]:
    """(circularity, elongation, solidity, class) of an (H, W) bool mask, in pixel units.

    circularity 4πA/P² (P: skimage's perimeter), elongation 1 − minor/major axis from the
    second central moments, solidity A / area of the convex hull of the pixels (unit squares)."""
    mask = crop(mask, 1, ext)[0]
    area = float(mask.sum())
    p = perimeter(mask)
    circ = float(min(1.0, 4 * math.pi * area / p**2)) if p > 0 else 1.0
    m = cv2.moments(mask.view(np.uint8), binaryImage=True)
    a, b, c = m["mu20"], m["mu11"], m["mu02"]  # eigenvalues of [[a, b], [b, c]]
    half, root = (a + c) / 2, math.sqrt(max(0.0, ((a - c) / 2) ** 2 + b * b))
    major, minor = half + root, max(0.0, half - root)
    elong = float(1 - math.sqrt(minor / major)) if major > 0 else 0.0
    hull = convex_hull(mask)
    hull_area = float(cv2.contourArea(hull)) if len(hull) >= 3 else area
    solid = float(min(1.0, area / hull_area)) if hull_area > 0 else 1.0
    cls = "irregular" if solid < 0.85 else "oval" if elong > 0.35 else "round"
    return round(circ, 4), round(elong, 4), round(solid, 4), cls


def _location(mask, organs, spacing, vocab, ext=None) -> tuple[str | None, str | None]:
    """("in" | "next to", organ display) for a lesion, from the organ masks on the image."""
    sub, r0, c0 = crop(mask, 0, ext)
    rr, cc = np.nonzero(sub)
    r, c = int(round((rr + r0).mean())), int(round((cc + c0).mean()))
    for name, organ in organs:
        if organ[min(r, organ.shape[0] - 1), min(c, organ.shape[1] - 1)]:
            return "in", name
    best, best_d = None, float(vocab["next_to_mm"])
    win = _window(mask, spacing, best_d, ext)
    for name, organ in organs:
        sub = organ[win]
        if not sub.any():
            continue
        d = ndimage.distance_transform_edt(~sub, sampling=(spacing[0], spacing[1]))[mask[win]].min()
        if d <= best_d:
            best, best_d = name, float(d)
    return ("next to", best) if best else (None, None)


def _organs(masks, regions, vocab) -> list[tuple[str, np.ndarray]]:
    # holes filled: a lesion carved out of its organ's label still lies "in" the organ
    out = [(organ_name(r["label"], vocab), _filled(m))
           for r, m in zip(regions, masks, strict=True)
           if r["source"] == "labels" and not is_lesion(r["label"], vocab) and m.any()]
    return sorted(out, key=lambda t: t[0])


def _filled(mask: np.ndarray) -> np.ndarray:
    sub, r0, c0 = crop(mask, 1)
    out = np.zeros(mask.shape, bool)
    out[r0:r0 + sub.shape[0], c0:c0 + sub.shape[1]] = fill_holes(sub)
    return out


def derive_attributes(image: dict, pixels: np.ndarray, regions: list[dict],
                      vocab: dict | None = None, trust_rows: bool = False,
                      body: np.ndarray | None = None,
                      masks: list | None = None) -> list[dict]:
    """One attribute record per region of ``image`` (same order), from stored data only.

    ``trust_rows``: reuse the rows' ``max_diameter_mm`` and ``centroid_ras`` (computed from
    the same mask by the same functions when the row was made) instead of measuring again; the
    checker never does. ``body``: the image's :func:`~pipeline.geometry.body_mask` when the
    caller has it already. ``masks``: the regions' (H, W) bool masks when the caller has them
    (a None entry, or no list, is decoded from the row's ``mask_rle``)."""
    vocab = vocab or load_vocab()
    masks = [m if m is not None else decode_rle(r["mask_rle"]) if r["mask_rle"] else None
             for r, m in zip(regions, masks or [None] * len(regions), strict=True)]
    if all(m is None for m in masks):  # no region to measure: skip the per-image work below
        return [None] * len(masks)
    if body is None:
        body = body_mask(to_uint8(pixels))
    midline = body_midline_x(image["pixel_to_ras"], body)
    lesions = [m is not None and is_lesion(r["label"], vocab) for r, m in zip(regions, masks, strict=True)]
    organs = _organs([m if m is not None else np.zeros(pixels.shape, bool) for m in masks],
                     regions, vocab) if any(lesions) else []
    spacing = image["pixel_spacing_mm"]
    ct = image["modality"] == "CT"
    values = modality_values(pixels, image) if ct else _grey(pixels)
    reference = None if ct else _sorted_reference(values, body)
    out = []
    for region, mask, lesion in zip(regions, masks, lesions, strict=True):
        ext = None if mask is None else extent(mask)
        if ext is None:
            out.append(None)
            continue
        if image.get("projection"):
            out.append(_projection_record(image, pixels, region, mask, lesion, organs, body,
                                          vocab, values, reference, ext))
            continue
        cen = region.get("centroid_ras") if trust_rows else None
        cen = centroid_ras(mask, image["pixel_to_ras"], ext) if cen is None else cen
        rel, loc = _location(mask, organs, spacing, vocab, ext) if lesion else (None, None)
        diam = region.get("max_diameter_mm") if trust_rows else None
        diam = max_diameter_mm(mask, spacing, ext) if diam is None else diam
        icls, ival, unit = intensity(mask, pixels, image, body, vocab, values, ext, reference)
        circ, elong, solid, scls = shape(mask, ext)
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


def _projection_record(image, pixels, region, mask, lesion, organs, body, vocab, values,
                       reference, ext) -> dict:
    """The attributes of a region on a projection image (module docstring): no RAS centroid,
    no invented mm, the position in the image and the side only from PatientOrientation."""
    row, col = _centroid_px(mask, ext)
    spacing = image["pixel_spacing_mm"] if image.get("spacing_known") else (1.0, 1.0)
    rel, loc = _location(mask, organs, spacing, vocab, ext) if lesion else (None, None)
    diam_px = max_diameter_mm(mask, (1.0, 1.0), ext)
    if image.get("spacing_known"):
        diam = round(max_diameter_mm(mask, image["pixel_spacing_mm"], ext), 3)
        size = size_class(diam, vocab)
    else:
        diam, size = None, image_size_class(diam_px / max(mask.shape), vocab)
    icls, ival, unit = intensity(mask, pixels, dict(image, pixel_spacing_mm=spacing), body,
                                 vocab, values, ext, reference)
    circ, elong, solid, scls = shape(mask, ext)
    return {
        "label": display(region["label"], vocab), "is_lesion": lesion,
        "laterality": projection_side(row, col, image, body, vocab), "location": loc,
        "location_relation": rel, "max_diameter_mm": diam, "size_class": size,
        "intensity_class": icls, "intensity_value": ival, "intensity_unit": unit,
        "circularity": circ, "elongation": elong, "solidity": solid, "shape_class": scls,
        "modality": image["modality"], "plane": image["plane"],
        "image_position": image_position(row, col, mask.shape),
    }
