"""Siemens mosaics: one stored 2D image that tiles the N slices of a volume.

Siemens EPI, DWI and fMRI before the XA software store each volume (one time point, one b-value)
as a single image of m × m tiles, m = ceil(sqrt(N)), tile k at tile row k // m, tile column
k % m; tiles past N are padding. The geometry follows nibabel's
``nibabel.nicom.dicomwrappers.MosaicWrapper`` exactly (and is tested against it):

* ImagePositionPatient of a mosaic is the position of the whole tiled image's pixel (0, 0);
  the first slice's pixel (0, 0) is moved by half the difference between the mosaic and the
  tile size, along each in-plane direction: ``ipp + col_dir·Δr·(R − r)/2 + row_dir·Δc·(C − c)/2``
  (R, C mosaic rows/columns; r, c tile rows/columns).
* slice k sits at ``first + k · step · normal``: ``step`` is SpacingBetweenSlices, else
  SliceThickness, else 1 mm; ``normal`` is ``col_dir × row_dir`` with the sign of the CSA
  header's SliceNormalVector (nibabel's rule: the cross product is the more orthogonal, the CSA
  vector tells the direction the tiles were stored in); without a SliceNormalVector the cross
  product is used as it is.

A mosaic is recognised by ImageType containing MOSAIC, or by a CSA image header with
AcquisitionMatrixText and a non-zero NumberOfImagesInMosaic (nibabel's ``csareader.is_mosaic``).
Each tile becomes one :class:`Plane`; :func:`pipeline.ingest.dicom_series.assemble` then stacks
them like classic slices (several mosaic files at the same positions become a T axis).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.dicom_series import Plane
from pipeline.ingest.dicom_values import (
    ORTHO_TOL,
    as_floats,
    as_int,
    get_value,
    parse_length,
    parse_orientation,
    parse_position,
    parse_spacing,
)


def csa_image_header(ds) -> dict | None:
    """The parsed Siemens CSA image header of ``ds`` (nibabel's reader), or None when absent
    or unreadable. Nothing from it is ever written out: only counts and vectors are used."""
    try:
        with warnings.catch_warnings():  # nibabel.nicom warns that it is experimental on import
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader

            return csareader.get_csa_header(ds, "image")
    except Exception:  # a malformed private header is no header; its text is never shown
        return None


def _csa_item(csa: dict | None, name: str) -> list:
    try:
        items = csa["tags"][name]["items"]
    except (TypeError, KeyError):
        return []
    return list(items) if isinstance(items, list) else []


def mosaic_count(ds, path: object = None) -> int | None:
    """N, the number of slices tiled in ``ds`` when it is a Siemens mosaic, else None.

    ``geometry`` when ``ds`` is marked MOSAIC but the CSA header gives no usable N.
    """
    image_type = get_value(ds, "ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    marked = any(str(v).strip().upper() == "MOSAIC" for v in image_type)
    csa = csa_image_header(ds)
    n_items = _csa_item(csa, "NumberOfImagesInMosaic")
    n = as_int(n_items[0], 0) if n_items else 0
    if not marked and not (n and _csa_item(csa, "AcquisitionMatrixText")):
        return None
    if n <= 0:
        raise IngestError("geometry", "mosaic without a usable NumberOfImagesInMosaic", path)
    return n


def tiles_per_side(n: int) -> int:
    """m = ceil(sqrt(N)): the mosaic is m × m tiles."""
    return math.isqrt(n - 1) + 1 if n > 0 else 0


def detile(image: np.ndarray, n: int, path: object = None) -> np.ndarray:
    """(R, C) mosaic → (N, R/m, C/m) slices, tile k at tile row k // m, tile column k % m.

    ``geometry`` when the tiles do not divide the image or N exceeds the m² tiles.
    """
    m = tiles_per_side(n)
    rows, cols = image.shape
    if m == 0 or rows % m or cols % m:
        raise IngestError("geometry", "mosaic tiles do not divide the stored image", path)
    r, c = rows // m, cols // m
    return image.reshape(m, r, m, c).transpose(0, 2, 1, 3).reshape(m * m, r, c)[:n]


def slice_normal(iop: tuple[float, ...], csa_normal) -> np.ndarray | None:
    """Unit slice normal (LPS) of a mosaic: col_dir × row_dir, signed by the CSA normal.

    Returns None when the CSA normal is given but not parallel to the cross product.
    """
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    std = np.cross(col_dir, row_dir)
    if csa_normal is None:
        return std
    dot = float(np.dot(np.asarray(csa_normal, dtype=np.float64), std))
    if abs(abs(dot) - 1.0) > ORTHO_TOL:
        return None
    return -std if dot < 0 else std


def slice_positions(iop, ipp, spacing, mosaic_shape, m: int, n: int, normal: np.ndarray,
                    step: float) -> np.ndarray:
    """(N, 3) LPS mm of pixel (0, 0) of each tile.

    iop: 6 direction cosines; ipp: the mosaic's stored position (LPS mm); spacing: (row, column)
    spacing mm; mosaic_shape: (R, C) of the stored image; m tiles per side; normal: unit LPS.
    """
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    big = np.asarray(mosaic_shape, dtype=np.float64)
    shift = (big - big / m) / 2  # (rows, cols) from the mosaic's corner to the first tile's
    first = (np.asarray(ipp, dtype=np.float64) + col_dir * spacing[0] * shift[0]
             + row_dir * spacing[1] * shift[1])
    return first + np.arange(n)[:, None] * step * normal


def _step(ds, path) -> float:
    """Distance between tiles along the normal: SpacingBetweenSlices, SliceThickness, else 1."""
    for kw in ("SpacingBetweenSlices", "SliceThickness"):
        mm = parse_length(get_value(ds, kw), path)
        if mm is not None:
            return mm
    return 1.0


def mosaic_planes(ds, frames: np.ndarray, n: int, path: object = None) -> list[Plane]:
    """Split the decoded mosaic ``frames`` (1, R, C) of ``ds`` into N planes with geometry."""
    if frames.shape[0] != 1:
        raise IngestError("geometry", "mosaic stored with several frames", path)
    iop = parse_orientation(get_value(ds, "ImageOrientationPatient"), path)
    ipp = parse_position(get_value(ds, "ImagePositionPatient"), path)
    spacing = parse_spacing(get_value(ds, "PixelSpacing"), path)
    if iop is None or ipp is None or spacing is None:
        raise IngestError("geometry", "mosaic without position, orientation or pixel spacing",
                          path)
    tiles = detile(frames[0], n, path)
    csa_normal = as_floats(_csa_item(csa_image_header(ds), "SliceNormalVector"), 3)
    normal = slice_normal(iop, csa_normal)
    if normal is None:
        raise IngestError("geometry", "CSA slice normal disagrees with the orientation", path)
    step = _step(ds, path)
    positions = slice_positions(iop, ipp, spacing, frames.shape[1:], tiles_per_side(n), n,
                                normal, step)
    inst = as_int(get_value(ds, "InstanceNumber"), 0)
    return [Plane(tiles[k], iop, tuple(float(x) for x in positions[k]), spacing, (inst, k), step)
            for k in range(n)]
