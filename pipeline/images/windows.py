"""Intensity windows: which value range of a volume becomes the black-to-white ramp of its images.

CT volumes are windowed with fixed presets in Hounsfield units (:data:`CT_WINDOWS`, given as
(width, level)). Every other modality (MR, PT, ...) gets one ``"percentile"`` window computed once
per *volume* (never per slice), so that all slices of a volume share one intensity mapping.
Projection images (CR, DX, MG, US, ...: ``meta["projection"]``) use the header's own display
range when it has one (:data:`HEADER_WINDOW`: WindowCenter/Width or a VOI LUT's input range,
validated and carried through MONOCHROME1 inversion by the reader, see
``pipeline.ingest.deid.voi_window``), else the percentile window; a header window under which
the image shows nothing (:func:`is_blank`) is not used either.

The mapping (:func:`apply_range`, :func:`apply_window`) is a linear ramp from ``lo`` to ``hi``::

    out = clip(floor((v - lo) * M / (hi - lo) + 0.5), 0, M)      M = 2**bits - 1

i.e. ``lo`` → 0, ``hi`` → M, the midpoint → round-half-up(M / 2) (128 for 8 bits, 32768 for 16),
values outside [lo, hi] are clipped, NaN → 0, +inf → M, −inf → 0. For a window (width, level),
``lo = level − width/2`` and ``hi = level + width/2``. Arithmetic is float32, evaluated as
``((v − lo) / (hi − lo)) * M`` so that the window edges (fraction 0 and 1) and the centre
(fraction 0.5) map exactly for both 8 and 16 bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: CT window presets in HU: name → (width, level).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400, 40),
    "lung": (1500, -600),
    "bone": (1800, 400),
    "brain": (80, 40),
}

#: Number of voxels :func:`percentile_range` looks at, at most (deterministic strided subsample).
MAX_PERCENTILE_SAMPLES = 1 << 20

#: Window name of a projection image rendered with its header's VOI (window or VOI LUT range).
HEADER_WINDOW = "header"

_OUT_TYPES = {8: np.uint8, 16: np.uint16}


@dataclass(frozen=True)
class WindowSpec:
    """One intensity mapping of a volume: values ``vmin`` → 0 and ``vmax`` → 2**bits − 1.

    Attributes:
        name: preset name (a key of :data:`CT_WINDOWS`) or ``"percentile"``.
        vmin: value mapped to black, in the volume's units (HU for CT).
        vmax: value mapped to white.
    """

    name: str
    vmin: float
    vmax: float


def _out_dtype(bits: int) -> type:
    if bits not in _OUT_TYPES:
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    return _OUT_TYPES[bits]


def apply_range(values: np.ndarray, vmin: float, vmax: float, bits: int = 8) -> np.ndarray:
    """Map ``values`` linearly from [vmin, vmax] to [0, 2**bits − 1] (see the module formula).

    Args:
        values: array of any shape (typically an (H, W) slice), any real dtype; not modified.
        vmin, vmax: the value range mapped to black and white. If ``vmax <= vmin`` (a constant
            volume) the ramp degenerates to a step: ``v > vmin`` → white, everything else → 0.
        bits: 8 → uint8 output, 16 → uint16 output.

    Returns:
        Array of the same shape as ``values``, dtype uint8 or uint16, C-contiguous.
    """
    dtype = _out_dtype(bits)
    top = float(2**bits - 1)
    vmin, vmax = float(vmin), float(vmax)
    if not vmax > vmin:
        return np.where(np.asarray(values) > vmin, dtype(top), dtype(0)).astype(dtype)
    y = np.subtract(values, np.float32(vmin), dtype=np.float32)
    y /= np.float32(vmax - vmin)
    y *= np.float32(top)
    y += np.float32(0.5)
    np.fmax(y, np.float32(0.0), out=y)  # fmax/fmin: NaN → the bound, not NaN
    np.fmin(y, np.float32(top), out=y)
    return y.astype(dtype)


def apply_window(values: np.ndarray, width: float, level: float, bits: int = 8) -> np.ndarray:
    """Window ``values`` (e.g. an (H, W) float HU slice) to uint8/uint16 (``bits`` 8/16).

    ``level − width/2`` → 0 and ``level + width/2`` → 2**bits − 1, linear in between, clipped:
    ``out = clip(floor((v − level + width/2) * M / width + 0.5), 0, M)`` with ``M = 2**bits − 1``.
    Returns an array of ``values``' shape. ``width`` must be > 0.
    """
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width!r}")
    return apply_range(values, level - width / 2.0, level + width / 2.0, bits)


def _sample_stride(shape: tuple[int, ...], size: int, max_samples: int) -> int:
    """A stride ≥ size/max_samples, coprime with the product of the trailing axes of ``shape``.

    Being coprime with ``prod(shape[1:])`` means the strided samples cycle through every
    position of the trailing axes instead of aliasing onto a few planes or rows.
    """
    stride = max(1, math.ceil(size / max_samples))
    trailing = math.prod(shape[1:]) if len(shape) > 1 else 1
    while stride > 1 and math.gcd(stride, trailing) != 1:
        stride += 1
    return stride


def _finite_sample(values: np.ndarray, mask: np.ndarray | None, stride: int) -> np.ndarray:
    """Every ``stride``-th element of ``values`` (flat C order), restricted to mask and finite."""
    sample = np.asarray(values.flat[::stride], dtype=np.float64)
    if mask is not None:
        sample = sample[np.asarray(mask.flat[::stride], dtype=bool)]
    return sample[np.isfinite(sample)]


def percentile_range(
    volume_values: np.ndarray,
    lo: float = 0.5,
    hi: float = 99.5,
    mask: np.ndarray | None = None,
    max_samples: int = MAX_PERCENTILE_SAMPLES,
) -> tuple[float, float]:
    """The (lo, hi) percentiles of a whole volume's finite values: its display range.

    Args:
        volume_values: the volume array, any shape (e.g. (X, Y, Z) or (X, Y, Z, T)), real dtype.
        lo, hi: percentiles in [0, 100], ``lo < hi``.
        mask: optional bool array of the same shape; voxels where it is False are ignored.
        max_samples: volumes larger than this are subsampled with a deterministic stride (every
            s-th voxel in C order, s coprime with the trailing axes' sizes); the same volume
            always gives the same range.

    Returns:
        (vmin, vmax) as Python floats; (0.0, 0.0) when no finite voxel is selected.
    """
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got ({lo!r}, {hi!r})")
    values = np.asarray(volume_values)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {mask.shape} differs from values shape {values.shape}")
    stride = _sample_stride(values.shape, values.size, max_samples)
    sample = _finite_sample(values, mask, stride)
    if sample.size == 0 and stride > 1:  # a small mask the subsample missed: look at all of it
        sample = _finite_sample(values, mask, 1)
    if sample.size == 0:
        return 0.0, 0.0
    vmin, vmax = np.percentile(sample, [lo, hi])
    return float(vmin), float(vmax)


def ct_window_spec(name: str) -> WindowSpec:
    """The :class:`WindowSpec` of a CT preset; unknown names raise ValueError listing presets."""
    if name not in CT_WINDOWS:
        raise ValueError(f"unknown CT window {name!r}; presets: {', '.join(sorted(CT_WINDOWS))}")
    width, level = CT_WINDOWS[name]
    return WindowSpec(name, level - width / 2.0, level + width / 2.0)


def windows_for(
    volume,
    ct_windows: Sequence[str] = ("soft_tissue",),
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> list[WindowSpec]:
    """The windows a volume's images are rendered with.

    Args:
        volume: a :class:`pipeline.ingest.volume.Volume` (uses ``modality`` and ``array``).
        ct_windows: preset names used when ``volume.modality`` is ``"CT"``; one spec each.
        percentiles: (lo, hi) percentiles for every other modality.

    Returns:
        CT: one spec per preset, in the given order. A projection image with a header window
        (:func:`header_window`): that one spec. Otherwise: a single ``"percentile"`` spec
        from :func:`percentile_range` over the whole ``volume.array`` (all frames of a 4D one).
    """
    header = header_window(volume)
    if header is not None:
        return [header]
    if str(volume.modality).upper() == "CT":
        if isinstance(ct_windows, str) or len(ct_windows) == 0:
            raise ValueError(
                f"ct_windows must be a non-empty sequence of names, got {ct_windows!r}"
            )
        return [ct_window_spec(name) for name in ct_windows]
    vmin, vmax = percentile_range(volume.array, percentiles[0], percentiles[1])
    return [WindowSpec("percentile", vmin, vmax)]


def header_window(volume) -> WindowSpec | None:
    """The :data:`HEADER_WINDOW` spec of a projection volume (``meta["projection"]``) from the
    reader's validated ``voi_min`` / ``voi_max`` (finite, min < max), when the volume's first
    frame shows something under it; else None."""
    meta = getattr(volume, "meta", None) or {}
    if not meta.get("projection") or meta.get("voi_min") is None:
        return None
    vmin, vmax = float(meta["voi_min"]), float(meta["voi_max"])
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmax > vmin):
        return None
    array = np.asarray(volume.array)
    first = array[..., 0] if array.ndim == 4 else array
    if is_blank(apply_range(first, vmin, vmax)):
        return None
    return WindowSpec(HEADER_WINDOW, vmin, vmax)


def is_blank(pixels: np.ndarray) -> bool:
    """True when a windowed (H, W) image holds one value only (all black, all white, or air
    under a soft-tissue window): it shows nothing, so it is never cut."""
    return pixels.size == 0 or bool(pixels.min() == pixels.max())
