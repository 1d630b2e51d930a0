"""The canonical volume every reader returns.

``Volume.array`` has axes (X, Y, Z[, T]) in nibabel's closest-canonical RAS+ orientation: voxel
index i grows toward patient Right, j toward Anterior, k toward Superior. ``Volume.affine`` is
the 4×4 float64 matrix mapping voxel indices (i, j, k, 1) to RAS+ millimetres (voxel centres).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from pipeline.errors import IngestError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A de-identified image volume.

    Attributes:
        array: (X, Y, Z) or (X, Y, Z, T) array, RAS+ closest canonical. float32 for images
            whose modality LUT gives real values; int16/uint8 kept where lossless.
        affine: (4, 4) float64, voxel (i, j, k) → RAS+ mm.
        modality: DICOM modality code ("CT", "MR", "PT", ...; "OT" when unknown).
        meta: de-identified metadata (see docs/schema.md, series table). Never holds a path.
        labels: optional (X, Y, Z) int32 label map on the same grid, 0 = background.
        label_names: label value → name, for values present in ``labels``.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str
    meta: dict = field(default_factory=dict)
    labels: np.ndarray | None = None
    label_names: dict[int, str] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (X, Y, Z): the column norms of the affine."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)


def check_affine(affine: np.ndarray, path: object = None, shear_tol: float = 1e-3) -> None:
    """Reject singular, non-finite or sheared 4×4 affines with an :class:`IngestError`.

    Shear is measured as the largest |cosine| between the column directions of ``affine[:3, :3]``.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise IngestError("bad_affine", "affine is not a finite 4x4 matrix", path)
    m = a[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms < 1e-6) or abs(np.linalg.det(m)) < 1e-9:
        raise IngestError("bad_affine", "affine is singular (zero voxel size)", path)
    cos = (m / norms).T @ (m / norms)
    off = np.abs(cos - np.eye(3)).max()
    if off > shear_tol:
        raise IngestError("bad_affine", "affine is sheared", path)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``array`` (I, J, K[, T]) with voxel→RAS ``affine`` to closest-canonical RAS+.

    Uses nibabel's orientation code (io_orientation / apply_orientation), so axes are only
    permuted and flipped, never resampled. Returns a C-contiguous array and its new affine.
    """
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape[:3])
    return np.ascontiguousarray(out), new_affine
