"""Assemble decoded DICOM frames into one volume in DICOM's LPS patient frame.

Slices are ordered by their position along the slice normal n = row_dir × col_dir (never by
InstanceNumber). Checks, each an :class:`IngestError` with its own reason: mixed orientations,
missing slices (a gap that is a whole multiple of the spacing), uneven spacing, positions off
one line, and duplicate positions. Equal positions whose pixels are identical are
de-duplicated; a uniform multiplicity m > 1 with different pixels becomes a 4th axis T of
length m (echoes, phases), ordered by InstanceNumber. A stack whose positions drift in-plane
(gantry tilt) is assembled with a sheared affine; :mod:`pipeline.ingest.tilt` resamples it.
Header values are validated as they are parsed (:mod:`pipeline.ingest.dicom_values`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.dicom_values import (
    as_int,
    get_value,
    parse_length,
    parse_orientation,
    parse_position,
    parse_spacing,
)

ORIENT_TOL = 1e-4  # max |difference| between direction cosines of one series
POS_TOL = 1e-3  # mm: positions closer than this along n are the same slice
TILT_TOL = 0.05  # mm of in-plane drift per slice tolerated before calling it gantry tilt
LINE_TOL = 0.05  # mm: largest distance of a slice position from the line through the stack

#: Projection (2D) modalities: an image of one of these without ImagePositionPatient /
#: ImageOrientationPatient is a projection image (so is any single-frame image without them):
#: no 3D geometry, stored orientation, header window, captions without invented mm or side.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX", "US"})


@dataclass
class Plane:
    """One 2D frame and where it sits.

    pixels: (rows, cols) float32 modality values. iop: 6 direction cosines (row_dir = direction
    of increasing column index, col_dir = direction of increasing row index), LPS. ipp: (3,) LPS
    mm of the centre of pixel (0, 0). spacing: (row spacing, column spacing) mm. order: tie-break
    (InstanceNumber, frame number).
    """

    pixels: np.ndarray
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    spacing: tuple[float, float]
    order: tuple[int, int]
    thickness: float | None = None


def _seq_item(item, seq: str, shared):
    value = get_value(item, seq)
    if not value and shared is not None:
        value = get_value(shared, seq)
    try:
        return value[0] if value else None
    except (TypeError, IndexError):
        return None


def _spacing(ds_or_item, path) -> tuple[float, float] | None:
    """(row, column) spacing mm from PixelSpacing, else ImagerPixelSpacing; None when absent."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        sp = parse_spacing(get_value(ds_or_item, kw), path)
        if sp is not None:
            return sp
    return None


def projection_facts(ds, planes: list[Plane], modality: str, path: object = None) -> dict:
    """``projection``: the planes carry no position or orientation and the modality is a
    projection one (:data:`PROJECTION_MODALITIES`) or there is a single frame;
    ``spacing_known``: PixelSpacing or ImagerPixelSpacing was present (else the nominal 1 mm
    of :func:`_no_geometry` is not a measurement)."""
    no_geometry = all(p.iop is None or p.ipp is None for p in planes)
    projection = no_geometry and (modality in PROJECTION_MODALITIES or len(planes) == 1)
    return {"projection": bool(projection), "spacing_known": _spacing(ds, path) is not None}


def _frame_plane(pixels, item, shared, order, path) -> Plane:
    """One frame of an enhanced object, its geometry from the per-frame / shared groups."""
    pos = _seq_item(item, "PlanePositionSequence", shared)
    ori = _seq_item(item, "PlaneOrientationSequence", shared)
    meas = _seq_item(item, "PixelMeasuresSequence", shared)
    return Plane(pixels, parse_orientation(get_value(ori, "ImageOrientationPatient"), path),
                 parse_position(get_value(pos, "ImagePositionPatient"), path),
                 _spacing(meas, path) or (1.0, 1.0), order,
                 parse_length(get_value(meas, "SliceThickness"), path))


def planes_of(ds, frames: np.ndarray, path: object = None) -> list[Plane]:
    """Split a decoded data set into planes with their geometry (classic or enhanced).

    frames: (F, rows, cols) modality values. Invalid geometry values raise ``geometry``.
    """
    inst = as_int(get_value(ds, "InstanceNumber"), 0)
    per_frame = get_value(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) == frames.shape[0]:
        shared_seq = get_value(ds, "SharedFunctionalGroupsSequence")
        shared = shared_seq[0] if shared_seq else None
        return [_frame_plane(frames[f], item, shared, (inst, f), path)
                for f, item in enumerate(per_frame)]
    iop = parse_orientation(get_value(ds, "ImageOrientationPatient"), path)
    ipp = parse_position(get_value(ds, "ImagePositionPatient"), path)
    spacing = _spacing(ds, path) or (1.0, 1.0)
    thick = parse_length(get_value(ds, "SliceThickness"), path)
    if frames.shape[0] > 1:  # classic multi-frame without per-frame geometry: frames are time
        return [Plane(frames[f], None, None, spacing, (inst, f), thick)
                for f in range(frames.shape[0])]
    return [Plane(frames[0], iop, ipp, spacing, (inst, 0), thick)]


def _no_geometry(planes: list[Plane]) -> tuple[np.ndarray, np.ndarray]:
    """Planes without position: one slice, frames along T. Affine is a nominal LPS frame."""
    planes = sorted(planes, key=lambda p: p.order)
    stack = np.stack([p.pixels.T for p in planes], axis=-1)  # (cols, rows, T)
    array = stack[:, :, None, :] if len(planes) > 1 else stack
    rs, cs = planes[0].spacing
    affine = np.diag([cs, rs, planes[0].thickness or 1.0, 1.0])
    return array, affine


def _directions(planes: list[Plane], path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iops = np.array([p.iop for p in planes], dtype=np.float64)
    if np.abs(iops - iops[0]).max() > ORIENT_TOL:
        raise IngestError("mixed_orientation", "slices disagree on ImageOrientationPatient", path)
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise IngestError("geometry", "ImageOrientationPatient is not two orthonormal unit "
                          "vectors", path)
    return row_dir, col_dir, normal


def _group_positions(planes, pos, path) -> list[list[int]]:
    """Indices of planes grouped by equal position along n, groups in ascending position."""
    order = sorted(range(len(planes)), key=lambda i: (pos[i], planes[i].order))
    groups: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        if abs(pos[i] - pos[groups[-1][0]]) < POS_TOL:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _dedupe(planes, groups, path) -> list[list[int]]:
    """Drop exact duplicates (same position, same pixels); the rest must be m per position."""
    out = []
    for g in groups:
        kept: list[int] = []
        for i in sorted(g, key=lambda i: planes[i].order):
            if not any(np.array_equal(planes[i].pixels, planes[j].pixels) for j in kept):
                kept.append(i)
        out.append(kept)
    sizes = {len(g) for g in out}
    if len(sizes) > 1:
        raise IngestError("duplicate_position", "different images share a slice position "
                          "(uneven counts per position)", path)
    return out


def _check_spacing(pos_sorted: np.ndarray, path) -> float:
    d = np.diff(pos_sorted)
    step = float(np.median(d))
    tol = max(0.01, 0.01 * step)
    if np.all(np.abs(d - step) <= tol):
        return step
    ratio = d / step
    if np.all(np.abs(ratio - np.round(ratio)) <= 0.05) and ratio.min() > 0.5:
        raise IngestError("missing_slices", "slices missing from the series (a gap that is "
                          "a whole multiple of the spacing)", path)
    raise IngestError("uneven_spacing", "slice spacing is not uniform", path)


def _step_vector(ipps: np.ndarray, normal: np.ndarray, step: float, path) -> np.ndarray:
    """The LPS vector from one slice's pixel (0, 0) to the next: ``normal · step`` when the
    positions stay on the normal (drift ≤ TILT_TOL mm per slice), else the mean step of a
    stack drifting in-plane (gantry tilt). Either way the in-plane offsets must grow linearly
    with the slice index (positions on one line, within LINE_TOL mm or 1 % of the step):
    ``geometry`` otherwise."""
    mean = (ipps[-1] - ipps[0]) / (len(ipps) - 1)
    off = ipps - (ipps[0] + np.arange(len(ipps))[:, None] * mean)
    off -= (off @ normal)[:, None] * normal  # along the normal is _check_spacing's business
    if np.linalg.norm(off, axis=1).max() > max(LINE_TOL, 0.01 * step):
        raise IngestError("geometry", "slice positions do not lie on one line", path)
    in_plane = mean - (mean @ normal) * normal
    return normal * step if float(np.linalg.norm(in_plane)) <= TILT_TOL else mean


def assemble(planes: list[Plane], path: object = None, min_slices: int = 1):
    """Stack ``planes`` into a volume.

    Returns:
        array: (cols, rows, K) or (cols, rows, K, T) float32 — axis 0 follows row_dir (column
            index), axis 1 follows col_dir (row index), axis 2 ascending along the normal.
        affine: (4, 4) float64 voxel → LPS mm. Its third column is the step between slices:
            along the normal, or, for a stack drifting in-plane (gantry tilt), the mean step,
            which shears the affine (:func:`pipeline.ingest.tilt.is_sheared`).
    """
    if not planes:
        raise IngestError("no_pixel_data", "series has no frames", path)
    shapes = {p.pixels.shape for p in planes}
    if len(shapes) > 1:
        raise IngestError("geometry", "frames of one series differ in size", path)
    if all(p.iop is None or p.ipp is None for p in planes):
        if len(planes) > 1 and any(p.order[1] == 0 for p in planes[1:]):
            raise IngestError("geometry", "several images without position information", path)
        return _no_geometry(planes)
    if any(p.iop is None or p.ipp is None for p in planes):
        raise IngestError("geometry", "some slices lack ImagePositionPatient/Orientation", path)
    row_dir, col_dir, normal = _directions(planes, path)
    pos = np.array([np.dot(p.ipp, normal) for p in planes])
    groups = _dedupe(planes, _group_positions(planes, pos, path), path)
    if len(groups) < min_slices:
        raise IngestError("too_few_slices", "fewer slices than the configured minimum", path)
    first = [planes[g[0]] for g in groups]
    ipps = np.array([p.ipp for p in first])
    step_vector = normal * (first[0].thickness or 1.0)
    if len(groups) > 1:
        step = _check_spacing(np.array([pos[g[0]] for g in groups]), path)
        step_vector = _step_vector(ipps, normal, step, path)
    rows, cols = first[0].pixels.shape
    # one float32 array filled in place: nested np.stack + a dtype copy cost 2 more full copies
    array = np.empty((cols, rows, len(groups), len(groups[0])), np.float32)
    for k, g in enumerate(groups):
        for t, i in enumerate(g):
            array[:, :, k, t] = planes[i].pixels.T
    rs, cs = first[0].spacing
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = row_dir * cs, col_dir * rs
    affine[:3, 2], affine[:3, 3] = step_vector, ipps[0]
    return (array[..., 0] if array.shape[-1] == 1 else array), affine
