"""COCO JSON (annotation-tool exports) → the vetted rows of :mod:`pipeline.labels.annotations`.

``images[]``: ``id``, ``file_name`` (the image key: its stem), ``height``, ``width``;
``categories[]``: ``id``, ``name`` (the class name); ``annotations[]``: ``image_id``,
``category_id``, and ``segmentation`` (one polygon → a polygon shape; several → one COCO RLE
mask, their union; an RLE dict, as ``iscrowd`` annotations carry → a mask) or else ``bbox``
(XYWH → an XYXY box). Images without annotations are listed as empty.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.labels.annotation_masks import MAX_SIDE, coco_string_counts, polygon_rle
from pipeline.labels.annotation_spec import (
    BAD,
    MAX_CELL_CHARS,
    MAX_CLASS_CHARS,
    MSG_COLUMNS,
    RowShape,
    box_xyxy,
    polygon,
)


def _load(path: Path) -> dict:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        raise ValueError("annotation table: the file could not be parsed as JSON") from None
    if not (isinstance(doc, dict) and all(isinstance(doc.get(k), list)
                                          for k in ("images", "annotations", "categories"))):
        raise ValueError(MSG_COLUMNS)
    return doc


def _id(value: object) -> int | str | None:
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _side(value: object) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIDE
    return value if ok else None


def coco_rows(path: Path) -> tuple[list, list[str]]:
    """(one RowShape or BadRow per annotation, raw file names of images without annotations)."""
    doc = _load(path)
    images = {_id(im.get("id")): im for im in doc["images"]
              if isinstance(im, dict) and isinstance(im.get("file_name"), str)}
    images.pop(None, None)
    cats = {_id(c.get("id")): c.get("name") for c in doc["categories"]
            if isinstance(c, dict) and isinstance(c.get("name"), str)}
    rows, seen = [], set()
    for a in doc["annotations"]:
        image = images.get(_id(a.get("image_id"))) if isinstance(a, dict) else None
        if image is not None:
            seen.add(_id(a.get("image_id")))
        rows.append(BAD if image is None else _row(a, image, cats))
    empty = [im["file_name"] for i, im in images.items() if i not in seen]
    return rows, empty


def _row(a: dict, image: dict, cats: dict) -> RowShape:
    name = cats.get(_id(a.get("category_id")))
    name = name.strip() if isinstance(name, str) else ""
    shape = _geometry(a.get("segmentation"), a.get("bbox"), image)
    if not name or len(name) > MAX_CLASS_CHARS or shape is None:
        return BAD
    kind, coords, rle = shape
    return RowShape(key=image["file_name"], class_name=name, reader=None, kind=kind,
                    coords=coords, rle=rle)


def _geometry(seg: object, bbox: object, image: dict):
    rows, cols = _side(image.get("height")), _side(image.get("width"))
    if isinstance(seg, dict):
        return _rle(seg)
    if isinstance(seg, list) and seg:
        polys = [polygon(p) if isinstance(p, list) else None for p in seg]
        if any(p is None for p in polys):
            return None
        if len(polys) == 1:
            return "polygon", polys[0], None
        if rows is None or cols is None:
            return None
        return "mask", (), ("coco", polygon_rle(polys, rows, cols), (rows, cols))
    box = box_xyxy(bbox, xywh=True) if isinstance(bbox, list) else None
    return None if box is None else ("box", box, None)


def _rle(seg: dict):
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_side(s) for s in size)):
        return None
    rows, cols = size
    if isinstance(counts, str):
        runs = coco_string_counts(counts) if len(counts) <= MAX_CELL_CHARS else None
        ok = runs is not None and sum(runs) == rows * cols
        return ("mask", (), ("coco", counts, (rows, cols))) if ok else None
    if isinstance(counts, list) and all(isinstance(n, int) and not isinstance(n, bool)
                                        and n >= 0 for n in counts):
        if sum(counts) == rows * cols:
            return "mask", (), ("coco", tuple(counts), (rows, cols))
    return None
