"""NIfTI voxels within a budget: load, the stored header's scaling, the bytes the reader will
hold, and the values as float32 (never a float64 volume).

Arrays: (X, Y, Z[, T]) in the file's voxel order (``read.read_nifti`` reorients to RAS+);
stored int8/16 and uint8/16 (and float32) are kept as stored when unscaled, anything else is
float32. Peak memory of reading: the stored values plus their float32 copy (scaling is
computed in float64 one slab along the last axis at a time).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.dicom_values import FLOAT32_MAX, as_float


def load_nifti(path: Path):
    """``nib.load`` with every failure turned into a fixed-message :class:`IngestError`."""
    try:
        return nib.load(str(path))
    except nib.spatialimages.HeaderDataError as e:
        # nibabel refuses a valid slope with a non-finite intercept while loading
        if "intercept" in str(e):
            raise IngestError("bad_scaling", "NIfTI scl_inter is not a finite number",
                              path) from None
        raise IngestError("unreadable", "not a readable NIfTI file", path) from None
    except (gzip.BadGzipFile, zlib.error):
        raise IngestError("unreadable", "not a readable NIfTI file (bad gzip stream)",
                          path) from None
    except EOFError:
        raise IngestError("truncated", "NIfTI file ends before its header", path) from None
    except OSError:
        raise IngestError("filesystem", "the file could not be opened or read", path) from None
    except Exception:  # nibabel raises many types for corrupt headers; never quoted
        raise IngestError("unreadable", "not a readable NIfTI file", path) from None


def stored_header(img, path: Path):
    """The header as stored in the file: nibabel resets scl_slope/scl_inter in ``img.header``
    once the data proxy holds them (and silently drops an infinite slope)."""
    try:
        with nib.openers.ImageOpener(str(path)) as f:
            return img.header_class.from_fileobj(f, check=False)
    except OSError:
        raise IngestError("filesystem", "the file could not be opened or read", path) from None
    except Exception:
        raise IngestError("unreadable", "not a readable NIfTI file", path) from None


def nifti_scaling(header, path: object = None) -> tuple[float, float] | None:
    """(slope, intercept) a NIfTI header applies, or None when it applies none.

    scl_slope 0 (the standard) or NaN (nibabel's "unset", written by every nibabel save) means
    no scaling; an infinite slope, or a non-finite intercept with a slope, is ``bad_scaling``.
    """
    raw = np.asarray(header["scl_slope"], dtype=np.float64).item()
    if np.isnan(raw) or raw == 0.0:
        return None
    slope = as_float(raw)
    inter = as_float(np.asarray(header["scl_inter"], dtype=np.float64).item())
    if slope is None or inter is None:
        raise IngestError("bad_scaling", "NIfTI scl_slope or scl_inter is not a finite number",
                          path)
    return None if (slope, inter) == (1.0, 0.0) else (slope, inter)


def as_float32(data: np.ndarray, path) -> np.ndarray:
    """Voxel values as float32 (int8/16 and uint8/16 kept); ``bad_scaling`` when a finite
    value does not fit in float32 (an overflowing scale factor or float64 data)."""
    if data.dtype.kind != "f" and data.dtype.itemsize <= 2:
        return data
    if data.dtype.kind == "f" and data.dtype.itemsize > 4:
        finite = np.isfinite(data)
        peak = max(np.max(data, where=finite, initial=0.0), -np.min(data, where=finite,
                                                                      initial=0.0))
        if peak > FLOAT32_MAX:
            raise IngestError("bad_scaling", "scaled voxel values overflow float32", path)
    return data.astype(np.float32, copy=False)


def nifti_shape(img, scaling, budget_bytes: int, path) -> tuple[int, ...]:
    """The voxel shape (trailing unit axes past the 4th dropped), within the byte budget: the
    bytes the reader will hold at its peak (:func:`_nifti_bytes_per_voxel`), counted before
    any voxel is read."""
    shape = tuple(int(s) for s in img.shape)
    if int(np.prod(shape, dtype=np.int64)) * _nifti_bytes_per_voxel(img, scaling) > \
            budget_bytes:
        raise IngestError("size_budget", "declared NIfTI shape exceeds the byte budget", path)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3, 4):
        raise IngestError("unreadable", "unsupported NIfTI dimensionality", path)
    return shape


def _nifti_bytes_per_voxel(img, scaling) -> int:
    """Peak bytes per voxel of :func:`nifti_voxels`: the stored values, plus their float32
    copy unless they are kept as stored (unscaled int8/16, uint8/16 or float32)."""
    stored = img.get_data_dtype()
    kept = scaling is None and (stored == np.float32 or (stored.kind in "iu"
                                                           and stored.itemsize <= 2))
    return stored.itemsize + (0 if kept else 4)


def _scaled_float32(raw: np.ndarray, slope: float, inter: float, path) -> np.ndarray:
    """``raw * slope + inter`` as float32, computed in float64 one slab at a time (the values
    nibabel's float64 scaling gives, cast), so no float64 copy of the volume ever exists;
    ``bad_scaling`` when a scaled value would not fit in float32."""
    lo, hi = (float(np.nanmin(raw)), float(np.nanmax(raw))) if raw.size else (0.0, 0.0)
    if max(abs(lo), abs(hi)) * abs(slope) + abs(inter) > FLOAT32_MAX:
        raise IngestError("bad_scaling", "scaled voxel values overflow float32", path)
    out = np.empty(raw.shape, np.float32)
    for k in range(raw.shape[-1]):
        out[..., k] = raw[..., k].astype(np.float64) * slope + inter
    return out


def nifti_voxels(img, shape, scaling, path) -> np.ndarray:
    """(X, Y, Z[, T]) voxel values: stored dtype when unscaled, else float32 scaled values."""
    try:
        proxy = img.dataobj
        raw = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        raw = raw.reshape(shape)
    except Exception:  # EOFError, OSError, zlib and gzip errors, ValueError (short data)
        raise IngestError("truncated", "voxel data could not be read", path) from None
    raw = raw[:, :, None] if raw.ndim == 2 else raw
    if scaling is None:
        return as_float32(raw, path)
    return _scaled_float32(raw, *scaling, path)
