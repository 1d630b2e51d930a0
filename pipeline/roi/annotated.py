"""Regions from annotation tables: shapes drawn on stored DICOM frames → regions of the images.

A shape (``pipeline.labels.annotations.Shape``: box, polygon, mask; pixel-edge coordinates of
the stored frame, x = column, y = row) is carried to an image by the transform its pixels went
through, composed from two matrices the pipeline already keeps, so the shape follows every
step the pixels took (MONOCHROME1 and windowing change values, not places; reorientation to
display orientation flips and transposes; resizing scales):

    frame pixel centre (c, r)  ──grid_affine (c, r, k, 1)──►  RAS mm  ──pixel_to_ras⁻¹──►  (col, row)

``grid_affine`` is the assembled array's voxel → RAS (``pipeline.ingest.read.SeriesRead``: the
frame's slice k), ``pixel_to_ras`` the image's (col, row, 1) → RAS. Their composition is one
2×3 matrix M per (frame, image) (:func:`frame_to_image`); a frame whose plane is not the
image's (a coronal cut of an axially annotated CT) has no M and is not carried there.

    box       corners in edge coordinates: −½ → centre, M, +½ → edge; XYXY of the four
              corners, clipped to the image
    polygon   vertices the same way, then filled as COCO fills polygons (pycocotools)
    mask      the frame mask resampled by M with nearest neighbour (as label maps are)

Boxes become regions of ``source`` "annotation": with the boxes route (``--roi boxes``) they
are the segmenter's prompts (a SAM-family mask inside the annotator's box); without it the
box itself is the region's mask (segmenter "box"), so its captions stay checkable. Polygons and masks are regions
with their own mask. Every such row keeps the annotator's box (``annotation_box``, in image
pixels), the collection's class name when the vocabulary knows it (``source_label``), the
keyed reader and the number of readers fused into it.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.geometry import bbox_of, body_midline_x
from pipeline.roi.regions import RegionConfig, region_id, region_row

SOURCE = "annotation"
BOX_ONLY = "box"  # segmenter of a box region without a segmenter: its mask is the box itself


def frame_to_image(grid_affine: np.ndarray, k: int, pixel_to_ras, thickness_mm: float,
                   tol_mm: float = 1e-3) -> np.ndarray | None:
    """The 2×3 matrix M: frame pixel centre (c, r, 1) → image pixel centre (col, row).

    None when slice ``k`` of the frame grid does not lie in the image's plane (farther than
    half the image's slice thickness, or ``tol_mm``, from it, or at an angle to it)."""
    g = np.asarray(grid_affine, np.float64)
    p = np.asarray(pixel_to_ras, np.float64).reshape(3, 3)
    basis, origin = p[:, :2], p[:, 2]
    normal = np.cross(basis[:, 0], basis[:, 1])
    normal /= np.linalg.norm(normal)
    corners = np.array([[0, 0, k, 1], [1, 0, k, 1], [0, 1, k, 1]], np.float64)
    ras = (g @ corners.T)[:3].T - origin  # (3, 3): the three frame points relative to the image
    off = ras @ normal
    if np.abs(off).max() > max(tol_mm, 0.5 * float(thickness_mm)):
        return None  # another slice, or frame steps leave the plane (another orientation)
    uv = np.linalg.lstsq(basis, ras.T, rcond=None)[0].T  # (3, 2) image (col, row) of the points
    return np.array([[uv[1, 0] - uv[0, 0], uv[2, 0] - uv[0, 0], uv[0, 0]],
                     [uv[1, 1] - uv[0, 1], uv[2, 1] - uv[0, 1], uv[0, 1]]])


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2) edge coordinates of the frame → (N, 2) edge coordinates of the image."""
    centre = np.asarray(xy, np.float64) - 0.5
    return centre @ m[:, :2].T + m[:, 2] + 0.5


def transform_box(box, m: np.ndarray, shape) -> list[float] | None:
    """XYXY edge box of the frame → XYXY edge box of an (H, W) image, clipped; None when
    nothing of it is left inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    pts = _apply(m, np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
    h, w = shape[:2]
    lo = np.clip(pts.min(axis=0), 0, [w, h])
    hi = np.clip(pts.max(axis=0), 0, [w, h])
    if not (hi - lo).min() > 0:
        return None
    return [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]


def transform_polygon(coords, m: np.ndarray, shape) -> np.ndarray:
    """(H, W) bool: the polygon (x0, y0, x1, y1, ... edge coordinates of the frame) carried to
    the image and filled as COCO fills polygons (pycocotools: the same edge coordinates, so a
    polygon along pixel edges holds exactly the pixels it outlines)."""
    from pycocotools import mask as coco_mask

    pts = _apply(m, np.asarray(coords, np.float64).reshape(-1, 2))
    h, w = (int(v) for v in shape[:2])
    rle = coco_mask.frPyObjects([pts.ravel().tolist()], h, w)
    return coco_mask.decode(coco_mask.merge(rle)).astype(bool)


def transform_mask(mask: np.ndarray, m: np.ndarray, shape) -> np.ndarray:
    """(H, W) bool: a frame mask resampled onto the image by M (nearest neighbour)."""
    h, w = shape[:2]
    out = cv2.warpAffine(mask.astype(np.uint8), m, (int(w), int(h)), flags=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool)


def _extra(shape, box) -> dict:
    return {"source_label": shape.source_name, "reader_key": shape.reader,
            "n_readers": int(shape.n_readers), "annotation_box": [float(v) for v in box]}


def annotation_regions(image: dict, placed: list[tuple[object, np.ndarray]], frame_shape,
                       cfg: RegionConfig, body: np.ndarray | None, masks: list | None = None,
                       ) -> tuple[list[dict], list[tuple]]:
    """Region rows and segmenter prompts of one image from its annotations.

    Args:
        image: the images-table row (``height``, ``width``, ``pixel_to_ras``, ids).
        placed: (shape, M) for every shape whose frame lies in this image (:func:`frame_to_image`).
        frame_shape: (rows, cols) of the stored frame (masks are decoded at this size).
        cfg: the region config; with the boxes route, boxes become prompts.
        body: (H, W) bool body mask of the image (for the midline), or None.
        masks: when given, each row's (H, W) mask is appended (None for a box-only row).

    Returns:
        (rows, prompts): prompts are (label, None, XYXY, extra) for the model stage, ``extra``
        the annotation columns its region row takes.
    """
    shape = (int(image["height"]), int(image["width"]))
    prompt_boxes = "boxes" in cfg.routes
    midline = body_midline_x(image["pixel_to_ras"], body) if body is not None else None
    rows, prompts = [], []
    for sh, m in placed:
        if sh.kind == "box":
            box = transform_box(sh.coords, m, shape)
            if box is None:
                continue
            if prompt_boxes:
                prompts.append((sh.finding, None, box, {"source": SOURCE, **_extra(sh, box)}))
                continue
            mask = np.zeros(shape, bool)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            mask[y0:y1, x0:x1] = True
            row = region_row(image, sh.finding, None, SOURCE, mask, box, midline, cfg,
                             segmenter=BOX_ONLY)
            kept = mask
        elif sh.kind in ("polygon", "mask"):
            mask = (transform_polygon(sh.coords, m, shape) if sh.kind == "polygon"
                    else transform_mask(sh.mask(*frame_shape), m, shape))
            if not mask.any():
                continue
            box = bbox_of(mask)
            row = region_row(image, sh.finding, None, SOURCE, mask, box, midline, cfg)
            kept = mask
        else:  # points: no region without a segmenter taking point prompts
            continue
        row.update(_extra(sh, box))
        row["region_id"] = annotation_region_id(image["image_id"], sh.finding, sh.reader, box,
                                                row["segmenter"])
        rows.append(row)
        if masks is not None:
            masks.append(kept)
    return rows, prompts


def annotation_region_id(image_id: str, finding: str, reader: str | None, box,
                         segmenter: str) -> str:
    """Region id of an annotation: the reader is part of it (kept per reader, two readers'
    equal boxes are two regions)."""
    return region_id(image_id, SOURCE, f"{finding}|{reader or ''}", box, segmenter)
