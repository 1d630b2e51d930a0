"""Regions: connected components of label maps and the geometry of any 2D mask.

Frames: masks are (H, W) bool in the pixel grid of an images-table row; boxes are XYXY float
in pixel coordinates where pixel (c, r) covers [c, c+1) × [r, r+1) (so a component spanning
columns 10..20 has x0 = 10, x1 = 21); ``pixel_to_ras`` (3, 3) maps (col, row, 1) of pixel
centres to RAS mm.

Rules (documented in docs/architecture.md):
* components: per label value, 8-connected; a component smaller than ``min_area_mm2`` is a
  fragment and is dropped (no merging); labels named in ``ignore_labels`` yield no regions.
* max diameter: the largest distance between corners of the mask's boundary pixels, in mm
  (anisotropic in-plane spacing respected) — the maximal Feret diameter of the pixelated shape.
* laterality: patient right when the centroid lies more than ``midline_band_mm`` toward RAS +x
  of the body midline on this slice, left when as far toward −x, else midline. The body
  midline is the middle of the body's RAS x extent, the body being the largest component above
  Otsu's threshold of the stored image (so it can be re-derived from the corpus alone).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from pipeline.geometry import (
    bbox_of,
    body_midline_x,
    centroid_ras,
    dense_labels,
    encode_rle,
    extent,
    grow,
    laterality,
    max_diameter_mm,
)

MAX_ENCODER_BATCH = 256  # --encoder-batch upper bound (a 1024² SAM batch of 256 is ~3 GB input)


@dataclass(frozen=True)
class RegionConfig:
    """How regions are proposed and filtered."""

    routes: tuple[str, ...] = ("labels",)  # any of labels, boxes, detector
    min_area_mm2: float = 4.0  # smaller components are fragments, dropped
    ignore_labels: tuple[str, ...] = ("body",)  # label names that never become regions
    midline_band_mm: float = 5.0  # |x − midline| below this → "midline"
    segmenter: str = "lite-medsam"  # boxes/detector routes: SAM family spec (see segment.py)
    detector: str | None = None  # YOLO weights path for the detector route
    det_conf: float = 0.25  # detector confidence threshold
    det_iou: float = 0.5  # detector NMS IoU threshold
    min_mask_score: float = 0.0  # drop SAM masks whose predicted IoU is below this
    box_labels: tuple[str, ...] = ()  # boxes route: only labels containing one of these (all if empty)
    device: str = "cpu"  # model stage device ("cuda", "cuda:1", ...)
    encoder_batch: int = 16  # images per segmenter encoder call (and detector batch), across units

    @property
    def uses_models(self) -> bool:
        """True when a model stage (segmenter, detector) follows the unit workers: then it, not
        the unit, holds an image's final regions, and captions are made after it."""
        return bool({"boxes", "detector"} & set(self.routes))

    def __post_init__(self):
        bad = [r for r in self.routes if r not in ("labels", "boxes", "detector")]
        if bad or not self.routes:
            raise ValueError(f"--roi {','.join(self.routes)}: choose from labels,boxes,detector")
        if "detector" in self.routes and not self.detector:
            raise ValueError("--roi detector needs --detector PATH (train one with train-detector)")
        if not 1 <= self.encoder_batch <= MAX_ENCODER_BATCH:
            raise ValueError(f"--encoder-batch {self.encoder_batch}: must be in "
                             f"[1, {MAX_ENCODER_BATCH}]")
        if self.min_area_mm2 < 0:
            raise ValueError(f"--min-area-mm2 {self.min_area_mm2}: must be >= 0")


def components(label_slice: np.ndarray, names: dict[int, str], spacing_mm,
               cfg: RegionConfig) -> list[tuple[int, str, np.ndarray]]:
    """(value, name, (H, W) bool mask) per kept 8-connected component, in value then raster order.

    Each label value is labelled inside its own bounding window (``ndimage.find_objects``), so
    the cost follows the structures, not the image size."""
    out = []
    px_mm2 = float(spacing_mm[0]) * float(spacing_mm[1])
    lab_all, values = dense_labels(label_slice)  # find_objects lists 1..max: keep max small
    for d, win in enumerate(ndimage.find_objects(lab_all), 1):
        value = d if values is None else int(values[d])
        name = names.get(value, f"label_{value}")
        if win is None or name in cfg.ignore_labels:
            continue
        (rs, cs), sub = win, lab_all[win] == d
        n, lab, stats, _ = cv2.connectedComponentsWithStats(
            sub.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        for k in sorted(range(1, n), key=lambda k: _first_pixel(lab, stats, k)):
            if stats[k, cv2.CC_STAT_AREA] * px_mm2 >= cfg.min_area_mm2:
                x, y, w, h = (int(v) for v in stats[k, :4])
                mask = np.zeros(label_slice.shape, bool)
                mask[rs.start + y:rs.start + y + h, cs.start + x:cs.start + x + w] = \
                    lab[y:y + h, x:x + w] == k
                out.append((value, name, mask))
    return out


def _first_pixel(lab: np.ndarray, stats: np.ndarray, k: int) -> tuple[int, int]:
    """(row, col) of component ``k``'s first pixel in raster order (the leftmost pixel of its
    top row), from cv2's stats (x, y, w, h, area): components are kept in raster order, as
    ``scipy.ndimage.label`` numbers them."""
    x, y, w = int(stats[k, 0]), int(stats[k, 1]), int(stats[k, 2])
    return y, x + int(np.flatnonzero(lab[y, x:x + w] == k)[0])


def region_id(image_id: str, source: str, label: str, bbox, model: str) -> str:
    """Deterministic id: same image, route, label, box and model → same id."""
    box = ",".join(f"{v:.2f}" for v in bbox)
    return hashlib.sha256(f"{image_id}|{source}|{label}|{box}|{model}".encode()).hexdigest()[:24]


def region_row(image: dict, label: str, value: int | None, source: str, mask: np.ndarray,
               bbox, midline_x, cfg: RegionConfig, score=None, segmenter="labels",
               model_sha=None) -> dict:
    """One regions-table row for ``mask`` on the images-table row ``image``."""
    spacing = image["pixel_spacing_mm"]
    ext = extent(mask)
    area_px = int(mask[grow(ext, 0, mask.shape)].sum()) if ext else 0
    cen = centroid_ras(mask, image["pixel_to_ras"], ext) if area_px else [float("nan")] * 3
    mm = image.get("spacing_known", True)  # a projection image without spacing: no mm
    return {
        "region_id": region_id(image["image_id"], source, label, bbox, segmenter),
        "image_id": image["image_id"], "unit_key": image["unit_key"],
        "series_key": image["series_key"], "patient_key": image["patient_key"],
        "split": image["split"], "modality": image["modality"], "plane": image["plane"],
        "label": label, "label_value": value, "source": source,
        "bbox": [float(v) for v in bbox], "mask_rle": encode_rle(mask) if area_px else None,
        "area_px": area_px,
        "area_mm2": area_px * float(spacing[0]) * float(spacing[1]) if mm else None,
        "centroid_ras": cen, "max_diameter_mm": max_diameter_mm(mask, spacing, ext) if mm else None,
        "laterality": laterality(cen[0], midline_x, cfg.midline_band_mm) if area_px else None,
        "score": None if score is None else float(score), "segmenter": segmenter,
        "model_sha256": model_sha,
    }


def label_regions(image: dict, label_slice: np.ndarray, names: dict[int, str],
                  cfg: RegionConfig, pixels: np.ndarray | None = None,
                  body: np.ndarray | None = None, masks: list | None = None) -> list[dict]:
    """The labels route for one image: exact regions from its (H, W) int label slice.

    The midline comes from the body of the stored image (as the caption checker re-derives
    it): ``body`` when the caller has it (:func:`body_mask` of the uint8 pixels), else
    computed from ``pixels``. ``masks``: when given, each row's (H, W) bool mask is appended
    to it, in row order (what ``decode_rle(row["mask_rle"])`` would give back)."""
    comps = components(label_slice, names, image["pixel_spacing_mm"], cfg)
    if masks is not None:
        masks.extend(mask for _, _, mask in comps)
    if not comps:
        return []
    midline = body_midline_x(image["pixel_to_ras"], body, pixels)
    return [region_row(image, name, value, "labels", mask, bbox_of(mask), midline, cfg)
            for value, name, mask in comps]


def label_prompts(image: dict, label_slice: np.ndarray, names: dict[int, str],
                  cfg: RegionConfig) -> list[tuple[str, int, list[float]]]:
    """The boxes route's prompts from a label slice: (label, value, XYXY box) per component
    (only labels matching ``cfg.box_labels`` when it is set)."""
    return [(name, value, bbox_of(mask)) for value, name, mask in
            components(label_slice, names, image["pixel_spacing_mm"], cfg)
            if not cfg.box_labels or any(p in name for p in cfg.box_labels)]
