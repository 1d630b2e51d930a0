"""Geometry of 2D masks and boxes: pure functions that regions, attributes, labels and the
segmenters share.

Frames: masks are (H, W) bool in the pixel grid of an images-table row; boxes are XYXY float
in pixel coordinates where pixel (c, r) covers [c, c+1) × [r, r+1) (so a component spanning
columns 10..20 has x0 = 10, x1 = 21); ``pixel_to_ras`` (3, 3) maps (col, row, 1) of pixel
centres to RAS mm. Masks travel as COCO RLE (pycocotools, Fortran order).

Rules (documented in docs/architecture.md):
* max diameter: the largest distance between corners of the mask's boundary pixels, in mm
  (anisotropic in-plane spacing respected) — the maximal Feret diameter of the pixelated shape.
* laterality: patient right when the centroid lies more than ``band_mm`` toward RAS +x of the
  body midline on this slice, left when as far toward −x, else midline. The body midline is
  the middle of the body's RAS x extent, the body being the largest component above Otsu's
  threshold of the stored image (so it can be re-derived from the corpus alone).
"""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of an (H, W) bool mask, as pycocotools encodes it: {"size": [H, W], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """Inverse of :func:`encode_rle`: (H, W) bool."""
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()}) > 0


def bbox_of(mask: np.ndarray) -> list[float]:
    """XYXY box (pixel-edge coordinates) of an (H, W) bool mask; [0, 0, 0, 0] when empty."""
    ext = extent(mask)
    if ext is None:
        return [0.0, 0.0, 0.0, 0.0]
    r0, r1, c0, c1 = ext
    return [float(c0), float(r0), float(c1), float(r1)]


def extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1), end-exclusive, of an (H, W) mask's tight bounding window;
    None when the mask is empty. One scan of the mask (OpenCV's ``boundingRect`` of the
    non-zero pixels: 4 µs for a 160 × 160 mask, against 20 µs for two NumPy ``any``
    reductions): every per-region measure below starts from it."""
    u8 = np.ascontiguousarray(mask if mask.dtype == bool else mask != 0).view(np.uint8)
    x, y, w, h = cv2.boundingRect(u8)
    if w == 0:
        return None
    return y, y + h, x, x + w


def grow(ext: tuple[int, int, int, int], pad: int, shape) -> tuple[slice, slice]:
    """Slices of the window ``ext`` grown by ``pad`` pixels on each side, clipped to ``shape``."""
    r0, r1, c0, c1 = ext
    return (slice(max(0, r0 - pad), min(shape[0], r1 + pad)),
            slice(max(0, c0 - pad), min(shape[1], c1 + pad)))


def crop(mask: np.ndarray, pad: int = 1, ext=None) -> tuple[np.ndarray, int, int]:
    """The mask's bounding window grown by ``pad`` pixels (clipped): (sub-mask, row0, col0).
    ``ext``: the mask's :func:`extent` when the caller has it.

    Every per-region measure works on this window: cost follows the region, not the image."""
    ext = extent(mask) if ext is None else ext
    if ext is None:
        return mask[:0, :0], 0, 0
    rs, cs = grow(ext, pad, mask.shape)
    return mask[rs, cs], rs.start, cs.start


def row_ends(mask: np.ndarray, ext=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, first col, one past the last col) of every non-empty row of an (H, W) bool mask,
    int64 in the mask's frame (``ext``: its :func:`extent`, to scan only that window)."""
    sub, r0, c0 = crop(mask, 0, ext)
    rows = np.flatnonzero(sub.any(1))
    if rows.size == 0:
        return rows, rows.copy(), rows.copy()
    sub = sub[rows]
    left = sub.argmax(1)
    right = sub.shape[1] - sub[:, ::-1].argmax(1)
    return rows + r0, left + c0, right + c0


def hull_points(mask: np.ndarray, ext=None) -> np.ndarray:
    """(N, 2) int32 (x, y) pixel-corner points whose convex hull is the hull of the mask's
    pixels (each pixel a unit square): the corners of every row's leftmost and rightmost pixel.
    Empty (0, 2) for an empty mask."""
    rows, left, right = row_ends(mask, ext)
    if rows.size == 0:
        return np.zeros((0, 2), np.int32)
    x = np.concatenate([left, left, right, right])
    y = np.concatenate([rows, rows + 1, rows, rows + 1])
    return np.stack([x, y], 1).astype(np.int32)


def convex_hull(mask: np.ndarray, ext=None) -> np.ndarray:
    """(V, 2) int32 vertices (x, y, pixel-corner coordinates) of the convex hull of the mask's
    pixels (OpenCV's hull of :func:`hull_points`)."""
    pts = hull_points(mask, ext)
    if len(pts) == 0:
        return pts
    return cv2.convexHull(pts).reshape(-1, 2)


def max_diameter_mm(mask: np.ndarray, spacing_mm, ext=None) -> float:
    """Maximal Feret diameter in mm of an (H, W) bool mask with (row_mm, col_mm) spacing: the
    largest distance between two vertices of its pixels' convex hull (a positive diagonal
    scaling keeps the hull's vertex set, so the hull is taken in pixel units)."""
    hull = convex_hull(mask, ext)
    if len(hull) == 0:
        return 0.0
    pts = hull.astype(np.float64) * [spacing_mm[1], spacing_mm[0]]
    d = pts[:, None, :] - pts[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max())


def centroid_ras(mask: np.ndarray, pixel_to_ras: np.ndarray, ext=None) -> list[float]:
    """RAS mm of the centroid of the mask's pixel centres (``ext``: its :func:`extent`)."""
    sub, r0, c0 = crop(mask, 0, ext)
    r, c = np.nonzero(sub)
    p = np.array([c.mean() + c0, r.mean() + r0, 1.0])
    return [float(v) for v in np.asarray(pixel_to_ras).reshape(3, 3) @ p]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool mask with its holes filled: background not 4-connected to the border, as
    ``scipy.ndimage.binary_fill_holes`` defines them (equal output), by one OpenCV flood fill
    from a 1-pixel frame instead of scipy's iterated dilation."""
    h, w = mask.shape
    canvas = np.zeros((h + 2, w + 2), np.uint8)
    canvas[1:-1, 1:-1] = mask
    cv2.floodFill(canvas, None, (0, 0), 2, flags=4)
    return canvas[1:-1, 1:-1] != 2


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(H, W) uint8 view of stored pixels: 8-bit as is, 16-bit by their top byte."""
    return pixels if pixels.dtype == np.uint8 else (pixels >> 8).astype(np.uint8)


def body_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool body: the largest 8-connected component above Otsu's threshold of the
    uint8 image, holes filled (dark organs inside the body, e.g. lungs in a soft-tissue
    window, are body too)."""
    if image.max() == image.min():
        return np.zeros(image.shape, bool)
    thr, _ = cv2.threshold(np.ascontiguousarray(image, np.uint8), 0, 255,
                           cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = (image > thr).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return fg.astype(bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    sub, r0, c0 = crop(lab == biggest, 1)
    body = np.zeros(image.shape, bool)
    body[r0:r0 + sub.shape[0], c0:c0 + sub.shape[1]] = fill_holes(sub)
    return body


def body_midline_x(pixel_to_ras, body: np.ndarray | None = None, image=None) -> float | None:
    """RAS x (mm) of the middle of the body's extent on this slice (see module doc)."""
    if body is None or not body.any():
        body = body_mask(image) if image is not None else None
    if body is None or not body.any():
        return None
    rows, left, right = row_ends(body)
    # x is affine in (col, row): over each row its extremes are at the row's end pixels
    r, c = np.concatenate([rows, rows]), np.concatenate([left, right - 1])
    m = np.asarray(pixel_to_ras).reshape(3, 3)
    x = m[0, 0] * c + m[0, 1] * r + m[0, 2]
    return float((x.min() + x.max()) / 2)


def laterality(x_ras: float, midline_x: float | None, band_mm: float) -> str | None:
    """"right" / "left" (patient sides; RAS +x is right) / "midline"; None without a midline."""
    if midline_x is None:
        return None
    if x_ras > midline_x + band_mm:
        return "right"
    if x_ras < midline_x - band_mm:
        return "left"
    return "midline"


DENSE_MAX = 1 << 16  # label values up to this are counted and indexed directly


def present_values(labels: np.ndarray) -> list[int]:
    """Sorted positive values of an int label array of any shape (negative values are
    background). Counted with ``np.bincount`` up to ``DENSE_MAX``; with ``np.unique`` beyond,
    so atlas ids in the hundreds of millions cost no memory."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 0:
        return []
    if top > DENSE_MAX:
        values = np.unique(flat)
        return [int(v) for v in values[values > 0]]
    if int(flat.min()) < 0:
        flat = np.maximum(flat, 0)
    return [int(v) for v in np.flatnonzero(np.bincount(flat)[1:]) + 1]


def dense_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Label array (any shape, int) → (dense, values): ``dense`` has the same shape with
    negative values as 0. When the largest value exceeds ``DENSE_MAX`` the values are
    renumbered 1..n (``values[d]`` is the label of dense number d, ``values[0]`` = 0);
    otherwise ``dense`` holds the labels themselves and ``values`` is None."""
    dense = np.maximum(labels, 0)
    if dense.size == 0 or int(dense.max()) <= DENSE_MAX:
        return dense, None
    values = np.unique(dense)
    if values[0] != 0:
        values = np.concatenate([[0], values])
    return np.searchsorted(values, dense).astype(np.int32), values
