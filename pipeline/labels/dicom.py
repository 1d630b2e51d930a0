"""DICOM label objects (RTSTRUCT, SEG) → integer label maps on an image :class:`Volume` grid.

Both readers return ``(labels, names)``: ``labels`` is an (X, Y, Z) int32 array on the RAS+
closest-canonical grid of ``volume`` (``volume.array.shape[:3]``, voxel → RAS mm by
``volume.affine``), 0 = background; ``names`` maps each label value *present* in ``labels`` to
its name. DICOM patient coordinates are LPS mm; they are turned into RAS by negating x and y and
into voxel indices (i, j, k) by ``inv(volume.affine)``. Nothing is resampled: a label object
whose geometry is not on the image grid is refused with ``IngestError("label_mismatch")``.

Conventions:

* RTSTRUCT pixel-centre rule: a voxel belongs to a CLOSED_PLANAR contour when its centre lies
  inside the polygon *or on its boundary* (``skimage.draw.polygon``; vertex coordinates are
  rounded to 1e-6 voxel first so a vertex computed as 9.9999999 counts as 10). A square whose
  corners are the voxel centres 10 and 20 fills exactly the voxels 10..20 (inclusive).
* Several contours of one ROI on one slice combine with the even-odd rule (XOR), so an inner
  contour cuts a hole (its boundary voxels are part of the hole).
* Overlap: RTSTRUCT ROIs get values 1..N in StructureSetROISequence order (ROIs with no
  CLOSED_PLANAR contour, e.g. POINT markers, get no value); a later ROI overwrites an earlier one
  where they overlap. SEG label values are the SegmentNumbers; frames are applied in increasing
  segment number, so a higher segment number overwrites a lower one.
* Parts of a label object that fall outside the image grid are dropped; ``label_mismatch`` is
  raised only when nothing at all lands in the grid, or when the geometry is not on the grid
  (oblique contour, SEG frame at another resolution or off voxel centres by > 0.1 voxel).
"""

from __future__ import annotations

import numpy as np
from pydicom.multival import MultiValue
from skimage.draw import polygon

from pipeline.errors import IngestError
from pipeline.geometry import present_values
from pipeline.ingest.volume import LPS_TO_RAS, Volume

_FLIP = np.diag(LPS_TO_RAS)[:3]  # (-1, -1, 1): LPS mm → RAS mm
_SEG_TOL = 0.1  # voxel: SEG frame pixels must land this close to voxel centres
# What pydicom or numpy raise on a malformed label object (an element of the wrong type, shape
# or multiplicity, a missing item): a ``bad_label`` error, never a worker crash whose exception
# text would quote the offending value.
MALFORMED = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError)


def _lps_to_voxel(lps: np.ndarray, volume: Volume) -> np.ndarray:
    """(N, 3) LPS mm points → (N, 3) float voxel coordinates (i, j, k) of ``volume``."""
    inv = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64))
    ras = np.asarray(lps, dtype=np.float64).reshape(-1, 3) * _FLIP
    return ras @ inv[:3, :3].T + inv[:3, 3]


def _int(value: object) -> int | None:
    """An int from an IS/US element value (first of a multi-value), or None when unusable."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _path(ds) -> object:
    return getattr(ds, "filename", None) or None


def _grid(volume: Volume) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in volume.array.shape[:3])
    if len(shape) != 3:
        raise IngestError("label_mismatch", "image volume is not 3D")
    return shape


def _present(labels: np.ndarray, names: dict[int, str]) -> dict[int, str]:
    values = set(present_values(labels))
    return {v: n for v, n in names.items() if v in values}


# ----------------------------------------------------------------------------- RTSTRUCT


def _roi_names(ds) -> dict[int, str]:
    """ROINumber → ROIName from StructureSetROISequence, in sequence order."""
    names: dict[int, str] = {}
    for item in ds.get("StructureSetROISequence", None) or []:
        number = _int(item.get("ROINumber", None))
        if number is None:
            continue
        name = str(item.get("ROIName", "") or "").strip()
        names.setdefault(number, name or f"roi_{number}")
    return names


def _contour_points(contour, path: object) -> np.ndarray | None:
    """ContourData (LPS mm triplets) → (N, 3) float64, or None when empty."""
    data = contour.get("ContourData", None)
    if data is None:
        return None
    values = data if isinstance(data, MultiValue | list | tuple) else [data]
    try:
        pts = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise IngestError("bad_label", "ContourData is not numeric", path) from None
    if pts.size == 0:
        return None
    if pts.size % 3 or not np.all(np.isfinite(pts)):
        raise IngestError("bad_label", "ContourData is not finite triplets", path)
    return pts.reshape(-1, 3)


def _closed_contours(ds) -> dict[int, list[np.ndarray]]:
    """ReferencedROINumber → list of CLOSED_PLANAR contours ((N, 3) LPS mm), file order."""
    out: dict[int, list[np.ndarray]] = {}
    for roi in ds.get("ROIContourSequence", None) or []:
        number = _int(roi.get("ReferencedROINumber", None))
        if number is None:
            continue
        for contour in roi.get("ContourSequence", None) or []:
            kind = str(contour.get("ContourGeometricType", "") or "").strip().upper()
            if kind != "CLOSED_PLANAR":
                continue  # POINT, OPEN_PLANAR, OPEN_NONPLANAR: no area to fill
            pts = _contour_points(contour, _path(ds))
            if pts is not None:
                out.setdefault(number, []).append(pts)
    return out


def _fill_contour(mask: np.ndarray, vox: np.ndarray, path: object) -> bool:
    """XOR the polygon ``vox`` ((N, 3) voxel coords) into bool ``mask``; True if it landed.

    The slice axis is the one along which the contour's voxel coordinate is constant (spread
    < 0.5 voxel); the slice index is the rounded mean coordinate on that axis.
    """
    spread = vox.max(axis=0) - vox.min(axis=0)
    axis = int(np.argmin(spread))
    if spread[axis] >= 0.5:
        raise IngestError("label_mismatch", "RTSTRUCT contour does not lie on a voxel slice of "
                          "the image grid", path)
    index = int(np.rint(vox[:, axis].mean()))
    if not 0 <= index < mask.shape[axis]:
        return False
    a, b = (d for d in range(3) if d != axis)
    pa, pb = np.round(vox[:, a], 6), np.round(vox[:, b], 6)
    na, nb = mask.shape[a], mask.shape[b]
    if pa.max() < -0.5 or pa.min() > na - 0.5 or pb.max() < -0.5 or pb.min() > nb - 0.5:
        return False
    rr, cc = polygon(pa, pb, shape=(na, nb))
    plane = np.zeros((na, nb), dtype=bool)
    plane[rr, cc] = True
    where: list[object] = [slice(None)] * 3
    where[axis] = index
    mask[tuple(where)] ^= plane
    return True


def rasterize_rtstruct(ds, volume: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """Rasterise the CLOSED_PLANAR contours of an RTSTRUCT onto the grid of ``volume``.

    Args:
        ds: pydicom Dataset of an RT Structure Set. ContourData: LPS mm triplets.
        volume: the referenced image; its ``array.shape[:3]`` and ``affine`` (voxel → RAS mm)
            define the grid.

    Returns:
        labels: (X, Y, Z) int32, RAS+ canonical grid of ``volume``; 0 = background, ROI values
            1..N in StructureSetROISequence order (only ROIs with CLOSED_PLANAR contours), later
            ROIs overwrite earlier ones. Pixel-centre rule and XOR holes: see module docstring.
        names: value → ROIName, for values present in ``labels``.

    Raises:
        IngestError: ``bad_label`` (no CLOSED_PLANAR contour, malformed ContourData),
            ``label_mismatch`` (no contour lands in the grid, or a contour is oblique to it).
    """
    try:
        return _rasterize(ds, volume)
    except MALFORMED:
        raise IngestError("bad_label", "RTSTRUCT is malformed", _path(ds)) from None


def _rasterize(ds, volume: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """:func:`rasterize_rtstruct` without its guard against malformed elements."""
    path = _path(ds)
    grid = _grid(volume)
    rois = _roi_names(ds)
    contours = _closed_contours(ds)
    if not contours:
        raise IngestError("bad_label", "RTSTRUCT has no CLOSED_PLANAR contour", path)
    order = [n for n in rois if n in contours] + [n for n in contours if n not in rois]
    labels = np.zeros(grid, dtype=np.int32)
    names: dict[int, str] = {}
    landed = 0
    for value, number in enumerate(order, start=1):
        mask = np.zeros(grid, dtype=bool)
        for pts in contours[number]:
            landed += _fill_contour(mask, _lps_to_voxel(pts, volume), path)
        labels[mask] = value
        names[value] = rois.get(number, f"roi_{number}")
    if landed == 0:
        raise IngestError("label_mismatch", "no RTSTRUCT contour lands in the image grid", path)
    return labels, _present(labels, names)


# ----------------------------------------------------------------------------- SEG


def _segment_names(ds) -> dict[int, str]:
    """SegmentNumber → SegmentLabel from SegmentSequence."""
    names: dict[int, str] = {}
    for item in ds.get("SegmentSequence", None) or []:
        number = _int(item.get("SegmentNumber", None))
        if number is None:
            continue
        label = str(item.get("SegmentLabel", "") or "").strip()
        names[number] = label or f"segment_{number}"
    return names


def _seg_masks(ds, path: object) -> np.ndarray:
    """Decoded SEG pixel data → (frames, rows, cols) bool (BINARY: != 0; FRACTIONAL: ≥ ½ max)."""
    kind = str(ds.get("SegmentationType", "") or "").strip().upper()
    if kind not in ("BINARY", "FRACTIONAL"):
        raise IngestError("bad_label", "SegmentationType is neither BINARY nor FRACTIONAL", path)
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception:  # any decoder failure is a bad label object, not a crash
        raise IngestError("bad_label", "SEG pixel data could not be decoded", path) from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise IngestError("bad_label", "SEG pixel data is not (frames, rows, columns)", path)
    if kind == "BINARY":
        return arr != 0
    top = float(ds.get("MaximumFractionalValue", 0) or 0)
    if not np.isfinite(top) or top <= 0:
        raise IngestError("bad_label", "FRACTIONAL SEG without a positive MaximumFractionalValue",
                          path)
    return arr >= 0.5 * top


def _functional(frame, shared, seq: str, attr: str, path: object):
    """``attr`` of the first item of functional group ``seq``, per-frame first, then shared."""
    for group in (frame, shared):
        items = group.get(seq, None) if group is not None else None
        if items and attr in items[0]:
            return items[0][attr].value
    raise IngestError("bad_label", "SEG frame lacks a functional group attribute", path)


def _frame_to_voxel(frame, shared, volume: Volume, path: object):
    """Voxel coords of pixel (0, 0) and the voxel steps per column and per row of one frame.

    LPS(r, c) = IPP + c·Δcol·F_row + r·Δrow·F_col, with F_row = IOP[:3] (direction of increasing
    column index), F_col = IOP[3:], PixelSpacing = (Δrow, Δcol).
    """
    ipp = np.asarray(_functional(frame, shared, "PlanePositionSequence",
                                 "ImagePositionPatient", path), dtype=np.float64)
    iop = np.asarray(_functional(frame, shared, "PlaneOrientationSequence",
                                 "ImageOrientationPatient", path), dtype=np.float64)
    spacing = np.asarray(_functional(frame, shared, "PixelMeasuresSequence", "PixelSpacing",
                                     path), dtype=np.float64)
    if ipp.shape != (3,) or iop.shape != (6,) or spacing.shape != (2,):
        raise IngestError("bad_label", "SEG frame geometry has wrong multiplicity", path)
    if not (np.all(np.isfinite(ipp)) and np.all(np.isfinite(iop)) and np.all(np.isfinite(spacing))):
        raise IngestError("bad_label", "SEG frame geometry is not finite", path)
    origin = _lps_to_voxel(ipp, volume)[0]
    ends = _lps_to_voxel(np.stack([ipp + spacing[1] * iop[:3], ipp + spacing[0] * iop[3:]]),
                         volume)
    step_c, step_r = ends[0] - origin, ends[1] - origin
    for step in (step_c, step_r):
        unit = np.rint(step)
        if np.abs(step - unit).max() > _SEG_TOL or np.abs(unit).sum() != 1:
            raise IngestError("label_mismatch", "SEG frame pixel grid does not match the image "
                              "voxel grid", path)
    if np.array_equal(np.abs(np.rint(step_c)), np.abs(np.rint(step_r))):
        raise IngestError("label_mismatch", "SEG frame rows and columns map to one axis", path)
    return origin, step_c, step_r


def _segment_of(frame, shared, path: object) -> int:
    number = _functional(frame, shared, "SegmentIdentificationSequence",
                         "ReferencedSegmentNumber", path)
    value = _int(number)
    if value is None:
        raise IngestError("bad_label", "SEG frame has no usable ReferencedSegmentNumber", path)
    return value


def read_dicom_seg(ds, volume: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """Place the frames of a DICOM Segmentation (BINARY or FRACTIONAL) on the grid of ``volume``.

    Args:
        ds: pydicom Dataset, SOP class 1.2.840.10008.5.1.4.1.1.66.4. ``ds.pixel_array`` is
            (frames, rows, cols) or (rows, cols); FRACTIONAL values ≥ 0.5·MaximumFractionalValue
            count as inside. Frame geometry (ImagePositionPatient: LPS mm; orientation and
            PixelSpacing per-frame or shared) comes from the functional groups.
        volume: the referenced image; ``array.shape[:3]`` and ``affine`` (voxel → RAS mm).

    Returns:
        labels: (X, Y, Z) int32, RAS+ canonical grid of ``volume``; value = SegmentNumber,
            higher segment numbers overwrite lower ones where they overlap.
        names: SegmentNumber → SegmentLabel, for values present in ``labels``.

    Raises:
        IngestError: ``bad_label`` (undecodable or malformed object, unknown segment number),
            ``label_mismatch`` (frames not on the voxel grid within 0.1 voxel, or nothing
            lands in it).
    """
    try:
        return _place_segments(ds, volume)
    except MALFORMED:
        raise IngestError("bad_label", "SEG is malformed", _path(ds)) from None


def _place_segments(ds, volume: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """:func:`read_dicom_seg` without its guard against malformed elements."""
    path = _path(ds)
    grid = _grid(volume)
    names = _segment_names(ds)
    masks = _seg_masks(ds, path)
    frames = list(ds.get("PerFrameFunctionalGroupsSequence", None) or [])
    shared_seq = ds.get("SharedFunctionalGroupsSequence", None)
    shared = shared_seq[0] if shared_seq else None
    if len(frames) != masks.shape[0]:
        raise IngestError("bad_label", "SEG frames of pixel data and per-frame functional "
                          "groups differ in number", path)
    segments = [_segment_of(f, shared, path) for f in frames]
    if set(segments) - set(names):
        raise IngestError("bad_label", "SEG frames reference undefined segments", path)
    labels = np.zeros(grid, dtype=np.int32)
    found = landed = 0
    for i in sorted(range(len(frames)), key=lambda n: segments[n]):
        pixels = np.argwhere(masks[i])  # (n, 2) rows, cols
        if not len(pixels):
            continue
        origin, step_c, step_r = _frame_to_voxel(frames[i], shared, volume, path)
        vox = origin + pixels[:, 1:2] * step_c + pixels[:, 0:1] * step_r
        idx = np.rint(vox)
        off = float(np.abs(vox - idx).max())
        if off > _SEG_TOL:
            raise IngestError("label_mismatch", "SEG frame pixels are off the image voxel "
                              "centres", path)
        idx = idx.astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(grid)), axis=1)
        found += len(idx)
        landed += int(inside.sum())
        i_, j_, k_ = idx[inside].T
        labels[i_, j_, k_] = segments[i]
    if found and not landed:
        raise IngestError("label_mismatch", "no SEG foreground pixel lands in the image grid",
                          path)
    return labels, _present(labels, names)
