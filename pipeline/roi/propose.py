"""The model stage: boxes (from label maps) and detector (YOLO) routes, masks from the segmenter.

Runs where the models live (the build process for the local executor; one actor per GPU on a
cluster): per image, one detector pass and ONE segmenter image-encoder pass for all its boxes,
whichever route they came from. Images are the stored PNGs, decoded, so models see exactly the
pixels the corpus keeps. Scores: detector confidence for detector regions, the segmenter's
predicted IoU for boxes regions. The stage makes regions only: its caller captions them
(with the decoded pixels and body masks handed back, so nothing is decoded twice).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.geometry import body_mask, body_midline_x, to_uint8
from pipeline.images.png import decode_png
from pipeline.roi.regions import RegionConfig, region_row


class Proposals(NamedTuple):
    """What the model stage hands back for a list of images."""

    regions: list[dict]  # region rows of the boxes/detector routes, not yet captioned
    pixels: dict  # image_id → (H, W) uint8/uint16 decoded PNG, for the images it looked at
    bodies: dict  # image_id → (H, W) bool body mask of those images


class ModelStage:
    """Callable over (image rows, prompts) → :class:`Proposals`, holding the loaded models."""

    def __init__(self, cfg: RegionConfig):
        from pipeline.roi.segment import build_segmenter

        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.segmenter, device=cfg.device)
        self.detector = None
        if "detector" in cfg.routes:
            from pipeline.roi.detect import Detector, DetectorConfig

            self.detector = Detector(DetectorConfig(weights=cfg.detector, conf=cfg.det_conf,
                                                    iou=cfg.det_iou, device=cfg.device))

    def _items(self, image_id, prompts, det) -> list[tuple]:
        items = [(lab, val, box, "boxes", None) for lab, val, box in prompts.get(image_id, [])]
        if det is not None:
            boxes, scores, labels = det
            items += [(lab, None, [float(v) for v in box], "detector", float(s))
                      for box, s, lab in zip(boxes, scores, labels, strict=True)]
        return items

    def _rows_for(self, image: dict, px: np.ndarray, body: np.ndarray,
                  items: list[tuple]) -> list[dict]:
        boxes = np.array([it[2] for it in items], np.float32).reshape(-1, 4)
        masks, ious = self.segmenter.predict(to_uint8(px), boxes)
        midline = body_midline_x(image["pixel_to_ras"], body)
        rows = []
        for k, (label, value, box, source, conf) in enumerate(items):
            mask = _box_mask(px.shape, box) if masks is None else masks[k]
            iou = None if ious is None or np.isnan(ious[k]) else float(ious[k])
            if masks is not None and (not mask.any() or (iou is not None and iou < self.cfg.min_mask_score)):
                continue
            row = region_row(image, label, value, source, mask, box, midline, self.cfg,
                             score=conf if source == "detector" else iou,
                             segmenter=self.segmenter.name,
                             model_sha=self.segmenter.checkpoint_sha256)
            if masks is None:
                row["mask_rle"] = None
            rows.append(row)
        return rows

    def __call__(self, images: list[dict], prompts: dict[str, list]) -> Proposals:
        """Region rows of the boxes/detector routes for ``images`` (``prompts``: image_id →
        [(label, value, XYXY)] from the label maps)."""
        todo = [im for im in images if self.detector is not None or im["image_id"] in prompts]
        pixels = {im["image_id"]: decode_png(im) for im in todo}
        batch = [to_uint8(pixels[im["image_id"]]) for im in todo]
        bodies = {im["image_id"]: body_mask(b) for im, b in zip(todo, batch, strict=True)}
        dets = self.detector.predict(batch) if self.detector else [None] * len(todo)
        rows = []
        for image, det in zip(todo, dets, strict=True):
            items = self._items(image["image_id"], prompts, det)
            if items:
                rows += self._rows_for(image, pixels[image["image_id"]],
                                       bodies[image["image_id"]], items)
        return Proposals(rows, pixels, bodies)


def _box_mask(shape, box) -> np.ndarray:
    """(H, W) bool filled XYXY rectangle: the geometry of a boxes-only region."""
    m = np.zeros(shape[:2], bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return m
