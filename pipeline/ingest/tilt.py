"""Gantry-tilted CT: resample a sheared stack onto an orthogonal grid.

A CT acquired with a tilted gantry has slices whose plane is tilted while the table moves along
the patient axis, so slice k's pixel (0, 0) sits at ``o + k·D`` with D not perpendicular to the
slice plane: the voxel → patient affine is sheared (columns U, V in-plane, D = a·U + b·V + c·n).
Like dcm2niix and dicom2nifti, the volume is resampled onto the orthogonal grid with axes U, V
and c·n: target voxel (i, j, k) samples slice k of the source at (i + i0 − k·a, j + j0 − k·b),
a pure in-plane shift of each slice (a shear along the tilt), with **linear interpolation**
(``scipy.ndimage.affine_transform``, order 1). The grid grows in-plane to hold every source
voxel (i0, j0 are the shifts of its new corner); voxels no slice covers take the volume's
minimum (air on CT). Slices are never interpolated across: each target slice comes from one
source slice. ``Volume.meta["resampled"]`` records it as :data:`RESAMPLED`.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import IngestError

RESAMPLED = "gantry_tilt_linear"  # Volume.meta["resampled"] of a de-sheared volume
SHEAR_TOL = 1e-6  # |in-plane step| / |step| below which an affine is not sheared
MAX_TILT_DEG = 45.0  # steeper "tilts" are refused as gantry_tilt (no scanner tilts that far)


def _parts(affine: np.ndarray) -> tuple[np.ndarray, float]:
    """(a, b) voxels of in-plane shift per slice and c, the step along the unit normal (mm).

    affine: (4, 4) voxel → patient mm with in-plane columns U ⟂ V (validated orientation).
    """
    u, v, d = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    n = np.cross(u, v)
    n = n / np.linalg.norm(n)
    c = float(d @ n)
    in_plane = d - c * n
    return np.array([in_plane @ u / (u @ u), in_plane @ v / (v @ v)]), c


def _in_plane_mm(affine: np.ndarray) -> float:
    shift, _ = _parts(affine)
    return float(np.linalg.norm(shift[0] * affine[:3, 0] + shift[1] * affine[:3, 1]))


def is_sheared(affine: np.ndarray) -> bool:
    """True when the slice step of ``affine`` leaves the slice normal (a tilted stack)."""
    return _in_plane_mm(affine) > SHEAR_TOL * float(np.linalg.norm(affine[:3, 2]))


def tilt_degrees(affine: np.ndarray) -> float:
    """Angle between the slice step and the slice normal, in degrees."""
    _, c = _parts(affine)
    return math.degrees(math.atan2(_in_plane_mm(affine), abs(c)))


def orthogonal_grid(shape, affine) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """The orthogonal grid that holds a sheared stack.

    shape: (I, J, K) of the source. Returns the target in-plane size (I', J'), the (K, 2)
    source offsets (i0 − k·a, j0 − k·b) of each target slice, and the target (4, 4) affine.
    """
    shift, c = _parts(affine)
    k = np.arange(shape[2])[:, None]
    drift = k * shift  # (K, 2): where slice k's voxel (0, 0) lands in target voxels
    lo = np.floor(np.minimum(drift.min(0), 0.0))
    hi = np.ceil(np.array(shape[:2]) - 1 + np.maximum(drift.max(0), 0.0))
    size = tuple(int(x) for x in hi - lo + 1)
    out = affine.copy()
    u, v = affine[:3, 0], affine[:3, 1]
    n = np.cross(u, v)
    out[:3, 2] = n / np.linalg.norm(n) * c
    out[:3, 3] = affine[:3, 3] + lo[0] * u + lo[1] * v
    return size, lo[None, :] - drift, out


def deshear(array: np.ndarray, affine: np.ndarray, max_bytes: int,
            path: object = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample a sheared (I, J, K[, T]) stack onto an orthogonal grid (linear, per slice).

    affine: (4, 4) sheared voxel → patient mm (LPS or RAS alike). Returns the float32
    (I', J', K[, T]) array and its orthogonal affine. ``gantry_tilt`` beyond MAX_TILT_DEG,
    ``size_budget`` when the grown grid would exceed ``max_bytes``.
    """
    from scipy import ndimage

    if tilt_degrees(affine) > MAX_TILT_DEG:
        raise IngestError("gantry_tilt", "slice positions leave the slice normal by more than "
                          "a gantry can tilt", path)
    size, offsets, new_affine = orthogonal_grid(array.shape, affine)
    extra = array.shape[3:]
    if size[0] * size[1] * int(np.prod(array.shape[2:])) * 4 > max_bytes:
        raise IngestError("size_budget", "the resampled tilted volume exceeds the series byte "
                          "budget", path)
    fill = float(np.min(array, where=np.isfinite(array), initial=np.inf))
    fill = fill if np.isfinite(fill) else 0.0
    out = np.empty(size + array.shape[2:], np.float32)
    for k in range(array.shape[2]):
        for t in np.ndindex(*extra):
            src = array[(slice(None), slice(None), k) + t].astype(np.float32, copy=False)
            out[(slice(None), slice(None), k) + t] = ndimage.affine_transform(
                src, np.eye(2), offset=offsets[k], output_shape=size, order=1,
                mode="constant", cval=fill)
    return out, new_affine
