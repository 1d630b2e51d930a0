"""DICOM header values parsed and validated at the boundary where they are read.

Every number the readers use comes through here: a value is a finite number of the expected
count and range, or it is refused with a fixed message (never quoting it, see STYLE 9b).
pydicom hands invalid DS/IS values back as text (``"CANARY"``), and ``float()`` on such a value
raises a ``ValueError`` that quotes it; nothing here lets such an exception escape.

Two kinds of helpers: ``as_*`` return ``None`` for an absent or invalid value (used where a
missing value has a meaning, e.g. the header scan); ``parse_*`` return ``None`` only when the
value is absent and raise :class:`IngestError` when it is present but invalid.
"""

from __future__ import annotations

import math
import re

import numpy as np

from pipeline.errors import IngestError

UID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))*$")  # PS3.5 §9.1, at most 64 characters
ORTHO_TOL = 1e-3  # |norm − 1| of each direction cosine and |row · col| tolerated in IOP
FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_uid(value) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (digits and dots, ≤ 64 chars)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_RE.match(value) is not None


def get_value(ds, keyword: str):
    """``ds.get(keyword)`` that never raises (a malformed element reads as absent)."""
    if ds is None:
        return None
    try:
        return ds.get(keyword)
    except Exception:  # pydicom converts on access and may raise anything, quoting the value
        return None


def as_float(value) -> float | None:
    """A finite float from a DS/FD/IS/str value, else None (absent, empty, text, NaN, Inf)."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        return None
    return out if math.isfinite(out) else None


def as_int(value, default: int) -> int:
    """An int from an IS/US value, else ``default`` (absent, text, non-integral)."""
    f = as_float(value)
    if f is None or f != int(f) or abs(f) > 2**62:
        return default
    return int(f)


def as_floats(value, n: int) -> tuple[float, ...] | None:
    """Exactly ``n`` finite floats from a multi-valued element, else None."""
    if value is None or isinstance(value, (str, bytes, bytearray)):
        return None
    try:
        items = list(value)
    except TypeError:
        return None
    out = tuple(as_float(v) for v in items)
    if len(out) != n or any(v is None for v in out):
        return None
    return out


def _present(value) -> bool:
    return value is not None and not (isinstance(value, str) and value.strip() == "")


def is_orthonormal(iop: tuple[float, ...], tol: float = ORTHO_TOL) -> bool:
    """True when the 6 direction cosines are two unit vectors at a right angle (within tol)."""
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    return (abs(np.linalg.norm(row) - 1.0) <= tol and abs(np.linalg.norm(col) - 1.0) <= tol
            and abs(float(row @ col)) <= tol)


def parse_orientation(value, path) -> tuple[float, ...] | None:
    """ImageOrientationPatient → 6 finite floats forming two orthonormal unit vectors (LPS).

    None when absent; ``geometry`` when present but not 6 finite numbers or not orthonormal.
    """
    if not _present(value):
        return None
    iop = as_floats(value, 6)
    if iop is None:
        raise IngestError("geometry", "ImageOrientationPatient is not six finite numbers", path)
    if not is_orthonormal(iop):
        raise IngestError("geometry", "ImageOrientationPatient is not two orthonormal unit "
                          "vectors", path)
    return iop


def parse_position(value, path) -> tuple[float, ...] | None:
    """ImagePositionPatient → 3 finite floats (LPS mm); None when absent, else ``geometry``."""
    if not _present(value):
        return None
    ipp = as_floats(value, 3)
    if ipp is None:
        raise IngestError("geometry", "ImagePositionPatient is not three finite numbers", path)
    return ipp


def parse_spacing(value, path) -> tuple[float, float] | None:
    """PixelSpacing → (row spacing, column spacing) mm, both finite and > 0; None when absent."""
    if not _present(value):
        return None
    sp = as_floats(value, 2)
    if sp is None or sp[0] <= 0 or sp[1] <= 0:
        raise IngestError("geometry", "PixelSpacing is not two positive finite numbers", path)
    return sp[0], sp[1]


def parse_length(value, path) -> float | None:
    """SliceThickness / SpacingBetweenSlices → mm, finite and > 0; None when absent or empty."""
    if not _present(value):
        return None
    mm = as_float(value)
    if mm is None or mm <= 0:
        raise IngestError("geometry", "slice thickness or spacing is not a positive finite "
                          "number", path)
    return mm


def parse_scaling(slope, intercept, path) -> tuple[float, float]:
    """RescaleSlope / RescaleIntercept → finite floats (defaults 1 and 0 when absent).

    ``bad_scaling`` when present but not a finite number.
    """
    s = 1.0 if not _present(slope) else as_float(slope)
    i = 0.0 if not _present(intercept) else as_float(intercept)
    if s is None or i is None:
        raise IngestError("bad_scaling", "rescale slope or intercept is not a finite number", path)
    return s, i
