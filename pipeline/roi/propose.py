"""The model stage: boxes (from label maps) and detector (YOLO) routes, masks from the segmenter.

Three steps, so that the process holding the models does model work only:

1. :func:`model_inputs` (CPU side, where the units ran): the images that need the models,
   decoded from their stored PNGs to uint8 (so models see exactly the pixels the corpus
   keeps), with their label-map prompt boxes.
2. :class:`ModelStage` (the build process for the local executor; the model actors on Ray):
   one detector pass over all the images it is given, then the segmenter over all their
   boxes (prompts first, then detections), ``--encoder-batch`` images per image-encoder call
   across units, resized/normalised and bit-packed on the model's device. It returns
   :class:`ModelOutputs`: per image the detections and the packed masks + scores.
3. :class:`Regions` (CPU side again): masks → region rows (RLE, geometry), with the decoded
   pixels and body masks kept for the captions that follow (``pipeline.run.shards``).

Scores: detector confidence for detector regions, the segmenter's predicted IoU for boxes
regions. Rows, ids and bytes are the same whatever the batch or the process each step ran in.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.geometry import body_mask, body_midline_x, to_uint8
from pipeline.images.png import decode_png
from pipeline.roi.annotated import annotation_region_id
from pipeline.roi.regions import RegionConfig, region_row


class ModelInput(NamedTuple):
    """One image as the model stage needs it."""

    image_id: str
    pixels: np.ndarray  # (H, W) uint8, the stored PNG's pixels (to_uint8 of 16-bit ones)
    prompts: np.ndarray  # (N, 4) float32 XYXY pixel-edge boxes from the label map (N may be 0)


class ImageOutput(NamedTuple):
    """What the model stage found on one image."""

    detections: tuple | None  # (boxes (M, 4) float32 XYXY, scores (M,) float32, labels) or None
    masks: np.ndarray | None  # (N + M, L) uint8 bit-packed (H, W) masks (segment.pack_masks)
    scores: np.ndarray  # (N + M,) float32 segmenter scores (predicted IoU; NaN without one)


class ModelOutputs(NamedTuple):
    """The model stage's answer for a list of :class:`ModelInput`."""

    segmenter: str  # the segmenter's name (part of every region id)
    checkpoint_sha256: str | None  # its weights' SHA-256
    images: dict  # image_id → ImageOutput
    encoder_calls: int = 0  # image-encoder forward calls this answer took
    encoded_images: int = 0  # images those calls encoded


class Proposals(NamedTuple):
    """What the regions step hands back for a list of images."""

    regions: list[dict]  # region rows of the boxes/detector routes, not yet captioned
    pixels: dict  # image_id → (H, W) uint8/uint16 decoded PNG, for the images it looked at
    bodies: dict  # image_id → (H, W) bool body mask of those images


def needs_models(image: dict, prompts: dict, cfg: RegionConfig) -> bool:
    """True when ``image`` goes to the model stage: it has prompts, or a detector runs."""
    return "detector" in cfg.routes or image["image_id"] in prompts


def model_inputs(images: list[dict], prompts: dict[str, list], cfg: RegionConfig) -> list[ModelInput]:
    """The :class:`ModelInput` of every image of ``images`` the models look at (CPU side;
    ``prompts``: image_id → [(label, value, XYXY[, extra])] from the label maps and
    annotation tables)."""
    out = []
    for im in images:
        if needs_models(im, prompts, cfg):
            boxes = [p[2] for p in prompts.get(im["image_id"], [])]
            out.append(ModelInput(im["image_id"], to_uint8(decode_png(im)),
                                  np.array(boxes, np.float32).reshape(-1, 4)))
    return out


class ModelStage:
    """Callable over [:class:`ModelInput`] → :class:`ModelOutputs`, holding the loaded models."""

    def __init__(self, cfg: RegionConfig):
        from pipeline.roi.detect import restore_threads
        from pipeline.roi.segment import build_segmenter

        restore_threads()  # torch threads = the CPUs this process was granted (Ray's count)
        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.segmenter, device=cfg.device,
                                         batch=cfg.encoder_batch)
        self.detector = None
        if "detector" in cfg.routes:
            from pipeline.roi.detect import Detector, DetectorConfig

            self.detector = Detector(DetectorConfig(weights=cfg.detector, conf=cfg.det_conf,
                                                    iou=cfg.det_iou, device=cfg.device,
                                                    batch=cfg.encoder_batch))

    def __call__(self, inputs: list[ModelInput]) -> ModelOutputs:
        seg = self.segmenter
        calls, encoded = getattr(seg, "encoder_forwards", 0), getattr(seg, "encoder_calls", 0)
        dets = self._detect(inputs)
        boxes = [x.prompts if d is None else np.concatenate([x.prompts, d[0]])
                 for x, d in zip(inputs, dets, strict=True)]
        found = seg.segment_batch([x.pixels for x in inputs], boxes)
        images = {x.image_id: ImageOutput(d, m, s)
                  for x, d, (m, s) in zip(inputs, dets, found, strict=True)}
        return ModelOutputs(seg.name, seg.checkpoint_sha256, images,
                            seg.encoder_forwards - calls, seg.encoder_calls - encoded)


    def _detect(self, inputs: list[ModelInput]) -> list:
        """Detections per input (None without a detector), batched across units by image
        size: ultralytics letterboxes a batch of one size minimally and a mixed one to the
        full square, so same-size batches keep each image's boxes what a unit alone gave."""
        out: list = [None] * len(inputs)
        if self.detector is None:
            return out
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x.pixels.shape, []).append(i)
        for idx in groups.values():
            found = self.detector.predict([inputs[i].pixels for i in idx])
            for i, det in zip(idx, found, strict=True):
                out[i] = det
        return out


class Regions:
    """Callable over (image rows, prompts) → :class:`Proposals` from :class:`ModelOutputs`
    (CPU side): what ``pipeline.run.shards.shard_tables`` calls per unit."""

    def __init__(self, outputs: ModelOutputs, cfg: RegionConfig):
        self.outputs, self.cfg = outputs, cfg

    def _items(self, image_id, prompts, det) -> list[tuple]:
        items = [(p[0], p[1], p[2], "boxes", None, p[3] if len(p) > 3 else None)
                 for p in prompts.get(image_id, [])]
        if det is not None:
            boxes, scores, labels = det
            items += [(lab, None, [float(v) for v in box], "detector", float(s), None)
                      for box, s, lab in zip(boxes, scores, labels, strict=True)]
        return items

    def _rows_for(self, image: dict, body: np.ndarray, items: list[tuple],
                  found: ImageOutput, shape) -> list[dict]:
        from pipeline.roi.segment import unpack_masks

        masks = None if found.masks is None else unpack_masks(found.masks, shape)
        ious = found.scores
        midline = body_midline_x(image["pixel_to_ras"], body)
        name, sha = self.outputs.segmenter, self.outputs.checkpoint_sha256
        rows = []
        for k, (label, value, box, source, conf, extra) in enumerate(items):
            mask = _box_mask(shape, box) if masks is None else masks[k]
            iou = None if ious is None or np.isnan(ious[k]) else float(ious[k])
            if masks is not None and (not mask.any() or (iou is not None and iou < self.cfg.min_mask_score)):
                continue
            row = region_row(image, label, value, source, mask, box, midline, self.cfg,
                             score=conf if source == "detector" else iou,
                             segmenter=name, model_sha=sha)
            if masks is None:
                row["mask_rle"] = None
            if extra:  # an annotator's box (pipeline/roi/annotated.py): its source and columns
                row.update(source=extra["source"],
                           **{c: v for c, v in extra.items() if c != "source"})
                row["region_id"] = annotation_region_id(image["image_id"], label,
                                                        extra.get("reader_key"), box, name)
            rows.append(row)
        return rows

    def __call__(self, images: list[dict], prompts: dict[str, list]) -> Proposals:
        """Region rows of the boxes/detector routes for ``images`` (``prompts``: image_id →
        [(label, value, XYXY)] from the label maps)."""
        rows, pixels, bodies = [], {}, {}
        for image in images:
            iid = image["image_id"]
            if iid not in self.outputs.images:
                continue
            pixels[iid] = px = decode_png(image)
            bodies[iid] = body = body_mask(to_uint8(px))
            found = self.outputs.images[iid]
            items = self._items(iid, prompts, found.detections)
            if items:
                rows += self._rows_for(image, body, items, found, px.shape[:2])
        return Proposals(rows, pixels, bodies)


def unit_inputs(results: list, cfg: RegionConfig) -> list[ModelInput]:
    """:func:`model_inputs` of a shard's unit results (``pipeline.run.unit.UnitResult``, in
    shard order, so the encoder batches are the same for every executor)."""
    return [x for res in results for x in model_inputs(res.images, res.prompts, cfg)]


def _box_mask(shape, box) -> np.ndarray:
    """(H, W) bool filled XYXY rectangle: the geometry of a boxes-only region."""
    m = np.zeros(shape[:2], bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return m
