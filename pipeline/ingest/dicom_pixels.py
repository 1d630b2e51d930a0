"""Pixel decoding of one DICOM data set into modality values.

``frames_of(ds)`` returns (F, rows, cols) float32 in modality units (HU for CT): pydicom's pixel
handlers decode every supported transfer syntax; colour (RGB / YBR_* / PALETTE COLOR) is reduced
to luminance (ITU-R BT.601); grey images get the modality LUT (rescale slope/intercept, per frame
for enhanced objects) and MONOCHROME1 is then inverted within the LUT's range.
"""

from __future__ import annotations

import warnings

import numpy as np
from pydicom.pixels import apply_color_lut, apply_modality_lut

from pipeline.errors import IngestError

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _decode(ds, path: object) -> np.ndarray:
    """Raw decoded pixels; pydicom's excess-frames and other warnings become errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return ds.pixel_array
        except UserWarning as w:
            text = str(w)
            if "frames" in text.lower():
                raise IngestError("excess_frames", text[:300], path) from None
            with warnings.catch_warnings():  # a benign warning: decode again, quietly
                warnings.simplefilter("ignore")
                return ds.pixel_array
        except (EOFError, ValueError) as e:
            msg = str(e)
            short = any(w in msg.lower() for w in ("less than expected", "truncat", "end of"))
            reason = "truncated" if short else "decode_failed"
            raise IngestError(reason, f"pixel data could not be decoded: {msg[:300]}", path) from None
        except (RuntimeError, NotImplementedError, TypeError, KeyError, AttributeError) as e:
            text = str(e).lower()
            missing = "dependenc" in text or "no pixel data handlers" in text or (
                "not available" in text)
            raise IngestError("missing_decoder" if missing else "decode_failed",
                              f"pixel data could not be decoded: {str(e)[:300]}", path) from None


def _as_frames(arr: np.ndarray, ds) -> np.ndarray:
    """Give decoded pixels the shape (F, rows, cols[, samples])."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames == 1:
        arr = arr[None]
    if samples == 1 and arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _invert_monochrome1(values: np.ndarray, ds) -> np.ndarray:
    """MONOCHROME1 shows low values bright: map v to (lo + hi − v), where lo/hi are the stored
    range's ends passed through the same modality LUT, so the result keeps modality units."""
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0):
        ends = np.array([[[-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]]], dtype=np.int64)
    else:
        ends = np.array([[[0, 2**bits - 1]]], dtype=np.int64)
    lo, hi = _modality_lut(ends, ds).ravel()[:2]
    return (lo + hi) - values


def _to_luminance(arr: np.ndarray, ds) -> np.ndarray:
    """(F, rows, cols, 3) RGB (or PALETTE indices) → (F, rows, cols) float32 luminance."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 4 and arr.shape[-1] == 3:
        return (arr.astype(np.float32) * LUMA).sum(-1)
    return arr.astype(np.float32)


def _rescale_items(ds) -> list:
    """Per-frame (slope, intercept) for enhanced objects, from the functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = []
    for item in per_frame:
        seq = item.get("PixelValueTransformationSequence")
        if not seq and shared:
            seq = shared[0].get("PixelValueTransformationSequence")
        if seq:
            out.append((float(seq[0].get("RescaleSlope", 1) or 1),
                        float(seq[0].get("RescaleIntercept", 0) or 0)))
        else:
            out.append((1.0, 0.0))
    return out


def _modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    if "PerFrameFunctionalGroupsSequence" in ds:
        items = _rescale_items(ds)
        if len(items) == arr.shape[0]:
            slope = np.array([s for s, _ in items], np.float32)[:, None, None]
            inter = np.array([i for _, i in items], np.float32)[:, None, None]
            return arr.astype(np.float32) * slope + inter
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    return arr.astype(np.float32)


def frames_of(ds, path: object = None) -> tuple[np.ndarray, dict]:
    """Decode ``ds`` into modality values.

    Returns:
        frames: (F, rows, cols) float32, modality units (HU for CT), display-ready polarity.
        facts: {"photometric": str, "inverted": bool, "color": bool}.
    """
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise IngestError("no_pixel_data", "DICOM object has no pixel data", path)
    arr = _as_frames(_decode(ds, path), ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    inverted = photometric == "MONOCHROME1"
    color = arr.ndim == 4 or photometric == "PALETTE COLOR"
    if color:
        out = _to_luminance(arr, ds)
    else:
        out = _modality_lut(arr, ds)
        if inverted:
            out = _invert_monochrome1(out, ds)
    if out.ndim != 3:
        raise IngestError("decode_failed", f"unexpected decoded shape {arr.shape}", path)
    return np.ascontiguousarray(out, dtype=np.float32), {
        "photometric": photometric, "inverted": inverted, "color": color}
