"""Shapes of annotation tables → bool masks in the stored DICOM frame.

Every function returns a (rows, cols) bool array, row = y, column = x, in pixel-edge
coordinates (pixel (c, r) covers [c, c+1) x [r, r+1)). Polygons and COCO RLE are rasterised by
``pycocotools.mask`` (COCO's own rule); SIIM RLE is decoded here (format below). Malformed input
raises ``ValueError`` with a fixed message.

SIIM-ACR RLE: whitespace-separated pairs ``start length``; pixels are numbered column-major
(Fortran order, down each column first) over the image; the first start is the 0-based index of
the first run, every later start counts from the end of the previous run.
"""

from __future__ import annotations

import math

import numpy as np

MAX_SIDE = 65536


def _check_size(rows: int, cols: int) -> None:
    if not (isinstance(rows, int) and isinstance(cols, int)
            and 0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise ValueError("annotation mask: rows and cols must be positive ints")


def decode_siim(counts: tuple[int, ...], rows: int, cols: int) -> np.ndarray:
    """SIIM relative RLE (start, length, ...) → bool (rows, cols)."""
    _check_size(rows, cols)
    starts = np.asarray(counts[0::2], dtype=np.int64)
    lengths = np.asarray(counts[1::2], dtype=np.int64)
    if starts.size != lengths.size or (starts < 0).any() or (lengths <= 0).any():
        raise ValueError("annotation mask: malformed SIIM RLE")
    begin = np.cumsum(starts) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    end = begin + lengths
    if end.size and end[-1] > rows * cols:
        raise ValueError("annotation mask: SIIM RLE runs past the frame")
    flat = np.zeros(rows * cols + 1, dtype=np.int8)  # +1/-1 run edges, then a running sum
    np.add.at(flat, begin, 1)
    np.add.at(flat, end, -1)
    return (np.cumsum(flat[:-1]) > 0).reshape((rows, cols), order="F")


def coco_string_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, written
    out so a string is vetted before the C decoder, which does not bound-check, sees it), or
    None when the string is not one: a character outside "0".."o", a run cut short, a negative
    run."""
    out: list[int] = []
    x = k = 0
    more = False
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            return None
        x |= (c & 0x1F) << (5 * k)
        more = bool(c & 0x20)
        k += 1
        if not more:
            if c & 0x10:
                x |= -1 << (5 * k)
            if len(out) > 2:
                x += out[-2]
            out.append(x)
            x = k = 0
    return None if more or any(n < 0 for n in out) else out


def decode_coco(counts, size: tuple[int, int], rows: int, cols: int) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed run list, ``size`` = (rows, cols))."""
    from pycocotools import mask as mask_utils

    _check_size(rows, cols)
    if tuple(size) != (rows, cols):
        raise ValueError("annotation mask: COCO RLE size differs from the frame")
    runs = coco_string_counts(counts) if isinstance(counts, str) else list(counts)
    if runs is None or any(n < 0 for n in runs) or sum(runs) != rows * cols:
        raise ValueError("annotation mask: malformed COCO RLE")
    rle = mask_utils.frPyObjects({"size": [rows, cols], "counts": runs}, rows, cols)
    return mask_utils.decode(rle).astype(bool)


def polygon_rle(polygons: list[list[float]], rows: int, cols: int) -> str:
    """Polygons (each x y x y ...) → one compressed COCO RLE counts string (their union)."""
    from pycocotools import mask as mask_utils

    _check_size(rows, cols)
    rle = mask_utils.merge(mask_utils.frPyObjects([list(p) for p in polygons], rows, cols))
    return rle["counts"].decode("ascii")


def rasterize(kind: str, coords: tuple, rle: tuple | None, rows: int, cols: int) -> np.ndarray:
    """A shape's mask: "mask" (SIIM or COCO RLE), "polygon", or "box" (pixels it covers)."""
    _check_size(rows, cols)
    if kind == "mask" and rle and rle[0] == "siim":
        return decode_siim(rle[1], rows, cols)
    if kind == "mask" and rle and rle[0] == "coco":
        return decode_coco(rle[1], rle[2], rows, cols)
    if kind == "polygon":
        return decode_coco(polygon_rle([coords], rows, cols), (rows, cols), rows, cols)
    if kind == "box":
        x0, y0, x1, y1 = coords
        out = np.zeros((rows, cols), dtype=bool)
        out[max(0, math.floor(y0)):min(rows, math.ceil(y1)),
            max(0, math.floor(x0)):min(cols, math.ceil(x1))] = True
        return out
    raise ValueError("annotation mask: this shape has no mask")
