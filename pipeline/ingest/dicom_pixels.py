"""Pixel decoding of one DICOM data set into modality values.

``frames_of(ds)`` returns (F, rows, cols) float32 in modality units (HU for CT): pydicom's pixel
handlers decode every supported transfer syntax; colour (RGB / YBR_* / PALETTE COLOR) is reduced
to luminance (ITU-R BT.601); grey images get the modality LUT (rescale slope/intercept, per frame
for enhanced objects) and MONOCHROME1 is then inverted within the LUT's range. Slope and
intercept must be finite and the values they make must fit in float32 (``bad_scaling``).
"""

from __future__ import annotations

import warnings

import numpy as np
from pydicom.pixels import apply_color_lut, apply_modality_lut

from pipeline.errors import IngestError
from pipeline.ingest.dicom_values import FLOAT32_MAX, as_int, get_value, parse_scaling

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _decode(ds, path: object) -> np.ndarray:
    """Raw decoded pixels; pydicom's excess-frames and other warnings become errors.

    Library messages are inspected to pick a reason code, never copied into the error.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return ds.pixel_array
        except Warning as w:
            if isinstance(w, UserWarning) and "frames" in str(w).lower():
                raise IngestError("excess_frames", "pixel data holds more frames than "
                                  "NumberOfFrames declares", path) from None
            with warnings.catch_warnings():  # a benign warning: decode again, quietly
                warnings.simplefilter("ignore")
                return _decode_quietly(ds, path)
        except Exception as e:
            raise _decode_error(e, path) from None


def _decode_quietly(ds, path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:
        raise _decode_error(e, path) from None


def _decode_error(e: BaseException, path) -> IngestError:
    """The reason code for a decoder exception (its text is read, not kept)."""
    text = str(e).lower()
    if isinstance(e, MemoryError):
        return IngestError("decode_memory", "decoding exceeded the available memory", path)
    if isinstance(e, (EOFError, ValueError)) and any(
            w in text for w in ("less than expected", "truncat", "end of")):
        return IngestError("truncated", "pixel data ends before its declared size", path)
    if isinstance(e, OSError) and not isinstance(e, EOFError):
        return IngestError("filesystem", "the file could not be read again for its pixels",
                           path)
    if "dependenc" in text or "no pixel data handlers" in text or "not available" in text:
        return IngestError("missing_decoder", "no installed decoder for the transfer syntax",
                           path)
    return IngestError("decode_failed", "pixel data could not be decoded", path)


def _as_frames(arr: np.ndarray, ds) -> np.ndarray:
    """Give decoded pixels the shape (F, rows, cols[, samples])."""
    frames = as_int(get_value(ds, "NumberOfFrames"), 1) or 1
    samples = as_int(get_value(ds, "SamplesPerPixel"), 1) or 1
    if frames == 1:
        arr = arr[None]
    if samples == 1 and arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _stored_ends(ds) -> np.ndarray:
    """(1, 1, 2) int64: the lowest and highest storable value (BitsStored, signedness)."""
    bits = min(max(as_int(get_value(ds, "BitsStored"), 16) or 16, 1), 32)
    if as_int(get_value(ds, "PixelRepresentation"), 0):
        return np.array([[[-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]]], dtype=np.int64)
    return np.array([[[0, 2**bits - 1]]], dtype=np.int64)


def inversion_sum(ds, path: object = None) -> float:
    """``lo + hi`` of a MONOCHROME1 object's inversion v → lo + hi − v (the stored range's
    ends through the modality LUT): a header window [a, b] on the values before the inversion
    is [lo + hi − b, lo + hi − a] on the values after it."""
    lo, hi = _modality_lut(_stored_ends(ds), ds, path).ravel()[:2].astype(np.float64)
    return float(lo + hi)


def _invert_monochrome1(values: np.ndarray, ds, path) -> np.ndarray:
    """MONOCHROME1 shows low values bright: map v to (lo + hi − v), where lo/hi are the stored
    range's ends passed through the same modality LUT, so the result keeps modality units."""
    lo, hi = _modality_lut(_stored_ends(ds), ds, path).ravel()[:2].astype(np.float64)
    _check_fits(np.array([lo + hi - float(values.min()), lo + hi - float(values.max())]), path)
    return (np.float32(lo) + np.float32(hi)) - values


def _to_luminance(arr: np.ndarray, ds, path) -> np.ndarray:
    """(F, rows, cols, 3) RGB (or PALETTE indices) → (F, rows, cols) float32 luminance."""
    photometric = str(get_value(ds, "PhotometricInterpretation") or "").upper()
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception:  # malformed palette descriptors or data
            raise IngestError("decode_failed", "the colour palette could not be applied",
                              path) from None
    if arr.ndim == 4 and arr.shape[-1] == 3:
        return (arr.astype(np.float32) * LUMA).sum(-1)
    return arr.astype(np.float32)


def _rescale_items(ds, path) -> list[tuple[float, float]]:
    """Per-frame (slope, intercept) for enhanced objects, from the functional groups."""
    shared_seq = get_value(ds, "SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    out = []
    for item in get_value(ds, "PerFrameFunctionalGroupsSequence") or []:
        seq = get_value(item, "PixelValueTransformationSequence")
        if not seq and shared is not None:
            seq = get_value(shared, "PixelValueTransformationSequence")
        if seq:
            out.append(parse_scaling(get_value(seq[0], "RescaleSlope"),
                                     get_value(seq[0], "RescaleIntercept"), path))
        else:
            out.append((1.0, 0.0))
    return out


def _check_fits(values: np.ndarray, path) -> None:
    """``bad_scaling`` when a finite float64 value would not fit in float32."""
    finite = np.isfinite(values)
    if np.any(np.abs(values, where=finite, out=np.zeros_like(values)) > FLOAT32_MAX):
        raise IngestError("bad_scaling", "rescaled values overflow float32", path)


def _rescale(arr: np.ndarray, scaling: list[tuple[float, float]], path) -> np.ndarray:
    """(F, rows, cols) stored values, one (slope, intercept) per frame → float32 values,
    computed in float64 frame by frame; ``bad_scaling`` when a frame overflows float32."""
    out = np.empty(arr.shape, np.float32)
    for f, (slope, inter) in enumerate(scaling):
        frame = arr[f].astype(np.float64)
        finite = np.isfinite(frame)
        ends = np.array([np.min(frame, where=finite, initial=0.0),
                         np.max(frame, where=finite, initial=0.0)]) * slope + inter
        _check_fits(ends, path)
        frame *= slope
        frame += inter
        out[f] = frame
    return out


def _modality_lut(arr: np.ndarray, ds, path) -> np.ndarray:
    """Stored values (F, rows, cols) → float32 modality values: per-frame rescale (enhanced),
    else the Modality LUT Sequence, else RescaleSlope/Intercept (each defaulting to 1 and 0)."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        items = _rescale_items(ds, path)
        if len(items) == arr.shape[0]:
            return _rescale(arr, items, path)
        if items:  # the stored range of a MONOCHROME1 object: its first frame's rescale
            return _rescale(arr, items[:1] * arr.shape[0], path)
    if "ModalityLUTSequence" in ds:
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        except Exception:  # malformed LUT descriptor or data
            raise IngestError("bad_scaling", "the modality LUT could not be applied",
                              path) from None
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        scaling = parse_scaling(get_value(ds, "RescaleSlope"),
                                get_value(ds, "RescaleIntercept"), path)
        return _rescale(arr, [scaling] * arr.shape[0], path)
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
    photometric = str(get_value(ds, "PhotometricInterpretation") or "MONOCHROME2").upper()
    inverted = photometric == "MONOCHROME1"
    color = arr.ndim == 4 or photometric == "PALETTE COLOR"
    if color:
        out = _to_luminance(arr, ds, path)
    else:
        out = _modality_lut(arr, ds, path)
        if inverted:
            out = _invert_monochrome1(out, ds, path)
    if out.ndim != 3:
        raise IngestError("decode_failed", "decoded pixels have an unexpected shape", path)
    return np.ascontiguousarray(out, dtype=np.float32), {
        "photometric": photometric, "inverted": inverted, "color": color}
