"""Annotation tables → keyed shapes: boxes, points, polygons and RLE masks per image.

:func:`load_annotations` reads one table (CSV, CSV.gz/.zip, Parquet, or COCO JSON) in one of the
layouts of :data:`FORMATS` (VinDr-CXR, RSNA Pneumonia, NIH ChestX-ray14, SIIM-ACR) or a
``custom:SPEC`` (grammar in :mod:`pipeline.labels.annotation_spec`, docs/howto.md) and returns an
:class:`AnnotationTable`: per image key, the :class:`Shape` s drawn on it.

Coordinates: PIXEL-EDGE coordinates of the STORED DICOM frame (before any windowing, inversion,
resizing or reorientation): x = column, y = row, origin = the top-left corner of pixel (0, 0), so
pixel (c, r) covers [c, c+1) x [r, r+1). XYWH inputs become XYXY. Points and polygons are taken
as written (a table that gives pixel indices of centres means c + 0.5).

Keys: an image is named by ``(key_kind, keyed value)`` (:func:`key_value`): ``sop`` (the
SOPInstanceUID, keyed exactly as discovery keys UIDs), ``path`` (path relative to a source root)
or ``stem`` (file name without directory and image extension). Raw keys never leave this module.

Class names go through the finding vocabulary (:mod:`pipeline.captions.findings`); a name it does
not know becomes ``finding_<k>`` and nothing of its text is kept. Reader ids are keyed. A row
that cannot be vetted (non-finite, negative size, out of range, unparsable) is counted in
``n_bad_rows`` and skipped: nothing of it is printed, logged or raised.

Several readers' boxes of the same finding on the same image frame are fused with weighted box
fusion (``merge="wbf"``, the ``ensemble-boxes`` package, every score 1.0, IoU threshold
:data:`WBF_IOU_THR`): a cluster's box is the mean of its members. A group drawn by one reader
(or a table without readers) is kept as it is. ``merge="readers"`` keeps every reader's box.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.captions.findings import canonical_finding
from pipeline.ingest.deid import Deidentifier
from pipeline.labels import annotation_spec as spec_mod
from pipeline.labels.annotation_masks import rasterize
from pipeline.labels.annotation_spec import KEY_KINDS, BadRow, RowShape, Spec

MERGES = ("wbf", "readers")
#: WBF: boxes of the same finding whose IoU exceeds this are one cluster (fused to their mean).
WBF_IOU_THR = 0.5
#: File extensions dropped from a file name to make its ``stem`` key (case-insensitive, one).
STEM_EXTENSIONS = (".nii.gz", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".nii")
#: The layouts of public collections, written as custom SPECs (the grammar's reference examples).
FORMATS: dict[str, str] = {
    "vindr": "key=stem:image_id,class=class_name,reader=rad_id,box=xyxy:x_min,y_min,x_max,y_max",
    "rsna": "key=stem:patientId,class=@Lung Opacity,target=Target,box=xywh:x,y,width,height",
    "nih": "key=stem:Image Index,class=Finding Label,box=xywh:#2,#3,#4,#5",
    "siim": "key=sop:ImageId,class=@Pneumothorax,mask=siim:EncodedPixels",
}


@dataclass(frozen=True)
class Shape:
    """One annotated shape on one image frame (coordinates: module docstring)."""

    kind: str  # "box" | "point" | "polygon" | "mask"
    coords: tuple[float, ...]  # box (x0, y0, x1, y1); point (x, y); polygon (x0, y0, x1, y1, ...)
    finding: str  # canonical finding label, else "finding_<k>"
    source_name: str  # the collection's class name when known (as written), else "finding_<k>"
    reader: str | None = None  # keyed reader id, None when absent (or several readers fused)
    n_readers: int = 1  # readers whose boxes were fused into this one
    frame: int = 0  # 0-based frame of a multi-frame file, else 0
    rle: tuple | None = None  # mask: ("coco", counts, (rows, cols)) or ("siim", counts)

    def mask(self, rows: int, cols: int) -> np.ndarray:
        """bool (rows, cols) mask in the stored frame: for "mask" (either RLE), "polygon" and
        "box" (the pixels the box covers). ``ValueError`` (fixed message) for a point, a size
        that is not positive, or an RLE that does not fit ``rows`` x ``cols``."""
        return rasterize(self.kind, self.coords, self.rle, rows, cols)


@dataclass
class AnnotationTable:
    """The shapes of one table, by image key."""

    by_key: dict[tuple[str, str], list[Shape]]  # (key_kind, keyed value) → shapes of that image
    empty: set[tuple[str, str]]  # images listed with no finding and no shape: annotated, empty
    n_rows: int  # data rows (COCO: annotations)
    n_bad_rows: int  # rows skipped because a value could not be vetted


def key_value(kind: str, raw: str, deid: Deidentifier) -> str:
    """The keyed value of a raw image key of ``kind`` (one of :data:`KEY_KINDS`).

    sop: ``deid.pseudonym("uid", raw.strip())``, as ``pipeline.ingest.discover.key_header``;
    path: ``deid.pseudonym("annotation-path", p)``, p = posix relative path (backslashes → "/",
    no empty or "." parts, so no leading "./" or "/"); stem: ``deid.pseudonym("annotation-stem",
    s)``, s = file name without directory and without one of :data:`STEM_EXTENSIONS`, case kept.
    ``ValueError`` (fixed message) on an unknown kind or a value that is empty once normalised."""
    if kind not in KEY_KINDS:
        raise ValueError("annotation key kind: expected one of sop, path, stem")
    text = raw.strip() if isinstance(raw, str) else ""
    if kind == "sop":
        value, domain = text, "uid"
    elif kind == "path":
        parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".")]
        value, domain = "/".join(parts), "annotation-path"
    else:
        name = text.replace("\\", "/").rsplit("/", 1)[-1]
        ext = next((e for e in STEM_EXTENSIONS if name.lower().endswith(e)), "")
        value, domain = name[: len(name) - len(ext)], "annotation-stem"
    if not value:
        raise ValueError("annotation key: empty value")
    return deid.pseudonym(domain, value)


def load_annotations(path, fmt: str, deid: Deidentifier, merge: str = "wbf") -> AnnotationTable:
    """Read the annotation table at ``path`` in format ``fmt`` (:data:`FORMATS`, "coco" or
    "custom:SPEC") → :class:`AnnotationTable`; boxes fused per ``merge`` (:data:`MERGES`).

    ``ValueError`` with a fixed message for an unknown format or merge, a bad SPEC, a file that
    cannot be parsed, or a table whose columns do not fit the format. Bad rows never raise."""
    if merge not in MERGES:
        raise ValueError("annotation merge: expected wbf or readers")
    if fmt == "coco":
        from pipeline.labels.annotation_coco import coco_rows  # pycocotools only when needed

        rows, empty_raw = coco_rows(Path(path))
        key_kind = "stem"
    else:
        spec = _spec_of(fmt)
        rows, empty_raw = spec_mod.table_rows(spec_mod.read_frame(Path(path)), spec)
        key_kind = spec.key_kind
    return _assemble(rows, empty_raw, key_kind, deid, merge)


def _spec_of(fmt: str) -> Spec:
    if isinstance(fmt, str) and fmt.startswith("custom:"):
        return spec_mod.parse_spec(fmt[len("custom:"):])
    if fmt in FORMATS:
        return spec_mod.parse_spec(FORMATS[fmt])
    raise ValueError("annotation format: expected vindr, rsna, nih, siim, coco or custom:SPEC")


def _keyed(kind: str, raw: str, deid: Deidentifier) -> tuple[str, str] | None:
    try:
        return kind, key_value(kind, raw, deid)
    except ValueError:
        return None


def _assemble(rows: list, empty_raw: list[str], key_kind: str,
              deid: Deidentifier, merge: str) -> AnnotationTable:
    """Rows of any format → the keyed, vocabulary-mapped (and fused) table."""
    n_bad = sum(isinstance(r, BadRow) for r in rows)
    good: list[tuple[tuple[str, str], RowShape]] = []
    for r in rows:
        if isinstance(r, RowShape):
            key = _keyed(key_kind, r.key, deid)
            if key is None:
                n_bad += 1
            else:
                good.append((key, r))
    names = _finding_names(sorted({r.class_name for _, r in good}))
    by_key: dict[tuple[str, str], list[Shape]] = defaultdict(list)
    for key, r in good:
        finding, source = names[r.class_name]
        reader = deid.pseudonym("reader", r.reader) if r.reader else None
        by_key[key].append(Shape(kind=r.kind, coords=r.coords, finding=finding,
                                 source_name=source, reader=reader, frame=r.frame, rle=r.rle))
    if merge == "wbf":
        by_key = {k: fuse_boxes(v) for k, v in by_key.items()}
    listed_keys = [_keyed(key_kind, raw, deid) for raw in empty_raw]
    n_bad += listed_keys.count(None)  # an empty row whose key is empty once normalised
    listed = {k for k in listed_keys if k is not None}
    return AnnotationTable(by_key=dict(by_key), empty=listed - set(by_key), n_rows=len(rows),
                           n_bad_rows=n_bad)


def _finding_names(names: list[str]) -> dict[str, tuple[str, str]]:
    """raw class name → (finding, source_name): known names keep their text, the table's
    unknown names become ``finding_<k>`` by their sorted order (module docstring)."""
    out: dict[str, tuple[str, str]] = {}
    k = 0
    for name in names:
        label = canonical_finding(name)
        if label is None:
            k += 1
            out[name] = (f"finding_{k}", f"finding_{k}")
        else:
            out[name] = (label, name)
    return out


def fuse_boxes(shapes: list[Shape]) -> list[Shape]:
    """One image's shapes with the boxes of each (finding, frame) that two or more readers drew
    fused by weighted box fusion (module docstring; a table without readers counts as one). Coordinates are scaled into [0, 1] by one factor per image (the largest
    box coordinate) and back. A fused box has ``n_readers`` = distinct readers (None counts as
    one) among the input boxes closest to it, ``reader`` = that reader when it is one."""
    boxes = [s for s in shapes if s.kind == "box"]
    if len(boxes) < 2:
        return shapes

    from ensemble_boxes import weighted_boxes_fusion  # imports numba: only when fusing

    scale = max(max(s.coords[2], s.coords[3]) for s in boxes)
    groups: dict[tuple[str, int], list[Shape]] = defaultdict(list)
    for s in boxes:
        groups[(s.finding, s.frame)].append(s)
    out = [s for s in shapes if s.kind != "box"]
    for (_, _), members in sorted(groups.items()):
        readers = sorted({s.reader or "" for s in members})
        if len(readers) < 2:  # one reader's own boxes are never fused
            out += members
            continue
        per = [[s for s in members if (s.reader or "") == r] for r in readers]
        fused, _, _ = weighted_boxes_fusion(
            [[np.asarray(s.coords) / scale for s in group] for group in per],
            [[1.0] * len(group) for group in per], [[0] * len(group) for group in per],
            iou_thr=WBF_IOU_THR, skip_box_thr=0.0)
        fused = np.asarray(fused, dtype=np.float64).reshape(-1, 4) * scale
        out += _fused_shapes(members, fused)
    return out


def _fused_shapes(members: list[Shape], fused: np.ndarray) -> list[Shape]:
    """The fused boxes as Shapes; each input box belongs to the fused box it overlaps most."""
    src = np.asarray([s.coords for s in members], dtype=np.float64)
    owner = np.argmax(_iou(src, fused), axis=1)
    out = []
    for i in sorted(range(len(fused)), key=lambda j: tuple(fused[j])):
        own = [m for m, o in zip(members, owner, strict=True) if o == i] or [members[0]]
        readers = {m.reader for m in own}
        out.append(replace(own[0], coords=tuple(float(v) for v in fused[i]),
                           reader=own[0].reader if len(readers) == 1 else None,
                           n_readers=len(readers)))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of N×4 and M×4 float XYXY boxes (positive areas)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)
