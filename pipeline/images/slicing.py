"""Cut canonical volumes into 2D images: slice selection, display orientation, geometry, PNG.

Input: a :class:`pipeline.ingest.volume.Volume` whose ``array`` is (X, Y, Z[, T]) RAS+ closest canonical
(i → patient Right, j → Anterior, k → Superior) with ``affine`` voxel (i, j, k) → RAS mm.

Slice selection (:func:`select_slices`)
    Along the plane's normal axis (axial: k, coronal: j, sagittal: i), keep every slice whose
    label map has any nonzero voxel, plus every k-th slice of the others, k = ``every_k``, counted
    on the volume's own indices (0, k, 2k, ...). ``every_k = 0`` keeps labelled slices only, so a
    volume without labels then gives no images; a volume without labels otherwise gives slices
    0, k, 2k, ...

Display orientation (radiological convention, :func:`extract_plane`)
    axial:    rows Anterior → Posterior (row 0 most anterior), columns patient Right → Left
              (the patient's right on the viewer's left; seen from the feet).
    coronal:  rows Superior → Inferior, columns Right → Left (seen from the front).
    sagittal: rows Superior → Inferior, columns Anterior → Posterior (face to the viewer's left).
    In every plane ``image[r, c] = s[n0 - 1 - c, n1 - 1 - r]`` where ``s`` is the (n0, n1) slice
    with the two remaining axes in ascending order, i.e. ``image = s[::-1, ::-1].T``.

Geometry (:func:`plane_geometry`)
    ``pixel_to_ras`` is a (3, 3) float64 matrix taking homogeneous pixel coordinates
    (col, row, 1) of the OUTPUT image (after any resize; pixel centres at integer coordinates)
    to RAS mm. A resize by factor s per axis (new = old * s) maps output pixel p to input pixel
    (p + 0.5) / s − 0.5.

Images are windowed (:mod:`pipeline.images.windows`, one mapping per volume), downscaled so the longest
side is at most ``max_side`` (area interpolation; labels nearest), and PNG-encoded (uint8 → 8-bit
grey "L", uint16 → 16-bit grey "I;16"). Label slices are kept as arrays for later stages, never
written as image bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.images.png import encode_png
from pipeline.images.windows import CT_WINDOWS, WindowSpec, apply_range, is_blank, windows_for

PLANES = ("axial", "coronal", "sagittal")
#: Voxel axis normal to each plane.
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

_AREA_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SliceConfig:
    """How :func:`cut_images` cuts a volume. Invalid values raise ValueError naming the field."""

    # Planes to cut, any of "axial", "coronal", "sagittal" (no repeats), in output order.
    planes: tuple[str, ...] = ("axial",)
    # Besides every labelled slice, also take slices 0, k, 2k, ... of the unlabelled ones;
    # 0 = labelled slices only. A volume without labels gives slices 0, k, 2k, ...
    every_k: int = 4
    # Cap on the longest image side in pixels; images are only downscaled, never upscaled.
    max_side: int = 512
    # PNG bit depth: 8 (uint8, "L") or 16 (uint16, "I;16").
    bits: int = 8
    # CT window presets (keys of windows.CT_WINDOWS); one image per preset per slice.
    ct_windows: tuple[str, ...] = ("soft_tissue",)
    # (lo, hi) volume percentiles mapped to black/white for non-CT modalities.
    percentiles: tuple[float, float] = (0.5, 99.5)
    # Time index cut from 4D (X, Y, Z, T) volumes; ignored for 3D ones.
    frame: int = 0

    def __post_init__(self):
        for name in ("planes", "ct_windows", "percentiles"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"SliceConfig.{name} must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if (
            not self.planes
            or any(p not in PLANES for p in self.planes)
            or (len(set(self.planes)) != len(self.planes))
        ):
            raise ValueError(
                f"SliceConfig.planes must be distinct names of {PLANES}, got {self.planes!r}"
            )
        for name, low in (("every_k", 0), ("max_side", 1), ("frame", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"SliceConfig.{name} must be an int >= {low}, got {value!r}")
        if self.bits not in (8, 16) or isinstance(self.bits, bool):
            raise ValueError(f"SliceConfig.bits must be 8 or 16, got {self.bits!r}")
        if not self.ct_windows or any(w not in CT_WINDOWS for w in self.ct_windows):
            raise ValueError(
                f"SliceConfig.ct_windows must name presets of {sorted(CT_WINDOWS)}, got {self.ct_windows!r}"
            )
        p = self.percentiles
        if (
            len(p) != 2
            or not all(isinstance(x, (int, float, np.integer, np.floating)) for x in p)
            or not 0 <= p[0] < p[1] <= 100
        ):
            raise ValueError(
                f"SliceConfig.percentiles must be (lo, hi) with 0 <= lo < hi <= 100, got {p!r}"
            )


@dataclass(eq=False)
class SliceImage:
    """One 2D image cut from a volume (one plane, slice and window).

    Attributes:
        plane: "axial", "coronal" or "sagittal".
        slice_index: voxel index along the plane's normal axis (k, j or i) of the canonical array.
        window: name of the :class:`~pipeline.images.windows.WindowSpec` it was rendered with.
        height, width: PNG size in pixels (after resize).
        png: the encoded image, 8-bit grey ("L") or 16-bit grey ("I;16").
        pixel_to_ras: (3, 3) float64, homogeneous (col, row, 1) of the PNG → RAS mm.
        pixel_spacing_mm: (row, col) spacing of the PNG's pixels in mm, i.e. the distance between
            vertically / horizontally adjacent pixel centres.
        slice_thickness_mm: voxel spacing along the plane normal in mm.
        labels: (height, width) int32 label slice in the PNG's display orientation, resized with
            nearest; None when the volume has no labels. Shared by the images of one slice.
        window_min, window_max: modality values mapped to 0 and to the top grey level, so a
            pixel v of a b-bit PNG stands for window_min + v / (2**b − 1) · (max − min).
        pixels: the (height, width) uint8 or uint16 array ``png`` encodes (decoding ``png``
            gives it back exactly), kept when ``labels`` is set so the labels route and the
            captions measure it without decoding the PNG again; None otherwise.
    """

    plane: str
    slice_index: int
    window: str
    height: int
    width: int
    png: bytes
    pixel_to_ras: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float
    labels: np.ndarray | None = None
    window_min: float = 0.0
    window_max: float = 255.0
    pixels: np.ndarray | None = None


def select_slices(has_label: np.ndarray, every_k: int) -> np.ndarray:
    """Indices of the slices to cut (see the module docstring for the rule).

    Args:
        has_label: (N,) bool, True where the slice's label map has a nonzero voxel.
        every_k: also keep indices 0, k, 2k, ... among unlabelled slices; 0 = labelled only.

    Returns:
        (M,) int64 ascending slice indices.
    """
    has_label = np.asarray(has_label, dtype=bool)
    if has_label.ndim != 1:
        raise ValueError(f"has_label must be 1-D, got shape {has_label.shape}")
    if not _is_int(every_k) or every_k < 0:
        raise ValueError(f"every_k must be an int >= 0, got {every_k!r}")
    keep = has_label.copy()
    if every_k > 0:
        keep[::every_k] = True
    return np.flatnonzero(keep).astype(np.int64)


def label_presence(labels: np.ndarray, plane: str) -> np.ndarray:
    """(N,) bool: which slices of an (X, Y, Z) label map along ``plane``'s axis are nonzero."""
    axis = _plane_axis(plane)
    return np.any(labels, axis=tuple(a for a in range(3) if a != axis))


def _plane_axis(plane: str) -> int:
    if plane not in PLANE_AXIS:
        raise ValueError(f"unknown plane {plane!r}; expected one of {PLANES}")
    return PLANE_AXIS[plane]


def extract_plane(array: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The (H, W) display-oriented view of slice ``index`` of an (X, Y, Z) canonical array.

    axial → (Y, X) rows A→P, cols R→L; coronal → (Z, X) rows S→I, cols R→L;
    sagittal → (Z, Y) rows S→I, cols A→P. Returns a (non-contiguous) view, same dtype.
    For 4D data pass one 3D frame.
    """
    if array.ndim != 3:
        raise ValueError(f"extract_plane needs an (X, Y, Z) array, got shape {array.shape}")
    axis = _plane_axis(plane)
    if not 0 <= index < array.shape[axis]:
        raise IndexError(f"{plane} slice {index} outside 0..{array.shape[axis] - 1}")
    s = array[(slice(None),) * axis + (index,)]
    return s[::-1, ::-1].T


def plane_geometry(
    affine: np.ndarray,
    plane: str,
    index: int,
    shape: Sequence[int],
    scale: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """``pixel_to_ras``: (3, 3) float64 mapping (col, row, 1) of the output image to RAS mm.

    Args:
        affine: (4, 4) voxel (i, j, k) → RAS mm of the canonical volume.
        plane, index: the slice, as for :func:`extract_plane`.
        shape: the volume's (X, Y, Z) shape (further entries ignored).
        scale: (row_scale, col_scale) of the resize, new size / old size (1.0 = no resize), as
            returned by :func:`resize_longest`. Output pixel p ↔ input pixel (p + 0.5)/s − 0.5.
    """
    axis = _plane_axis(plane)
    p0, p1 = (a for a in range(3) if a != axis)
    # (4, 3): input pixel (c, r, 1) → voxel (i, j, k, 1); image[r, c] = s[n0-1-c, n1-1-r].
    to_voxel = np.zeros((4, 3))
    to_voxel[p0] = (-1.0, 0.0, shape[p0] - 1.0)
    to_voxel[p1] = (0.0, -1.0, shape[p1] - 1.0)
    to_voxel[axis] = (0.0, 0.0, float(index))
    to_voxel[3] = (0.0, 0.0, 1.0)
    row_s, col_s = (float(s) for s in scale)
    to_input = np.array(
        [
            [1.0 / col_s, 0.0, 0.5 / col_s - 0.5],
            [0.0, 1.0 / row_s, 0.5 / row_s - 0.5],
            [0.0, 0.0, 1.0],
        ]
    )
    return np.asarray(affine, dtype=np.float64)[:3, :] @ to_voxel @ to_input


def pixel_spacing(pixel_to_ras: np.ndarray) -> tuple[float, float]:
    """(row_mm, col_mm): distance in mm between vertically / horizontally adjacent pixels."""
    m = np.asarray(pixel_to_ras, dtype=np.float64)
    return float(np.linalg.norm(m[:, 1])), float(np.linalg.norm(m[:, 0]))


def slice_thickness(affine: np.ndarray, plane: str) -> float:
    """Voxel spacing in mm along ``plane``'s normal axis (norm of that affine column)."""
    return float(np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, _plane_axis(plane)]))


def resize_longest(img: np.ndarray, max_side: int, order: str | int = "area"):
    """Downscale an (H, W) image so that max(H, W) <= ``max_side``; never upscale.

    Args:
        img: (H, W) array. ``order="area"`` (alias 1, intensities) uses cv2.INTER_AREA and keeps
            uint8/uint16/int16/float32/float64 (other dtypes come back float32);
            ``order="nearest"`` (alias 0, label maps) keeps any dtype and only ever copies input
            values: output pixel p takes input pixel floor((p + 0.5) / s).
        max_side: cap on the longest side, >= 1.

    Returns:
        (out, (row_scale, col_scale)): out is (round(H*s), round(W*s)) with s = max_side/max(H, W)
        (at least 1 pixel), the scales are the exact per-axis factors new/old. When no resize is
        needed, ``img`` itself and (1.0, 1.0).
    """
    if order not in ("area", "nearest", 0, 1):
        raise ValueError(f"order must be 'area' or 'nearest', got {order!r}")
    if img.ndim != 2:
        raise ValueError(f"resize_longest needs an (H, W) image, got shape {img.shape}")
    h, w = img.shape
    if max(h, w) <= max_side:
        return img, (1.0, 1.0)
    s = max_side / max(h, w)
    nh, nw = max(1, min(max_side, round(h * s))), max(1, min(max_side, round(w * s)))
    scale = (nh / h, nw / w)
    if order in ("nearest", 0):
        rows = np.minimum(((np.arange(nh) + 0.5) / scale[0]).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(nw) + 0.5) / scale[1]).astype(np.int64), w - 1)
        return img[rows[:, None], cols[None, :]], scale
    if img.dtype not in _AREA_DTYPES:
        img = img.astype(np.float32)
    out = cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=cv2.INTER_AREA)
    return out, scale


def _frame(volume, frame: int) -> np.ndarray:
    """The (X, Y, Z) array to cut: the volume's array, or frame ``frame`` of a 4D one."""
    array = np.asarray(volume.array)
    if array.ndim == 3:
        return array
    if array.ndim != 4:
        raise ValueError(f"volume array must be (X, Y, Z) or (X, Y, Z, T), got shape {array.shape}")
    if frame >= array.shape[3]:
        raise ValueError(f"SliceConfig.frame {frame} outside the volume's {array.shape[3]} frames")
    return np.ascontiguousarray(array[..., frame])


def _transpose_xyc(block: np.ndarray) -> np.ndarray:
    """(X, Y, C) C-contiguous → (Y, C, X) C-contiguous, bit-exact for any dtype (cv2.transpose).

    The elements are handed to cv2 as ``itemsize`` uint8 channels, so cv2 only moves bytes.
    """
    x, y, c = block.shape
    size = block.dtype.itemsize
    flat = np.ascontiguousarray(block).reshape(x, y * c).view(np.uint8).reshape(x, y * c, size)
    moved = cv2.transpose(flat if size > 1 else flat[:, :, 0])
    return np.ascontiguousarray(moved).reshape(y * c, x * size).view(block.dtype).reshape(y, c, x)


def iter_plane_slices(array: np.ndarray, plane: str, indices, chunk_bytes: int = 128 << 20):
    """Yield (index, (H, W) C-contiguous display slice) for each index, as :func:`extract_plane`.

    ``array`` is (X, Y, Z), any dtype (kept). Coronal and sagittal slices are copied one by one
    (their rows are contiguous runs of the array). Axial slices of a C-ordered (X, Y, Z) array
    are a stride-Z gather; copying them one at a time cost ~2 ms per 512×512 float32 slice of a
    512×512×240 volume (2-core VM), so they are gathered in chunks of up to ``chunk_bytes``
    (np.take along k, then one cv2.transpose): 60 slices 114 ms → 55 ms, 240 slices 595 → 326 ms.
    """
    indices = [int(i) for i in indices]
    if plane != "axial" or array.ndim != 3 or not indices:
        for index in indices:
            yield index, np.ascontiguousarray(extract_plane(array, plane, index))
        return
    for index in indices:
        extract_plane(array, plane, index)  # validates shape and range before any work
    x, y, _ = array.shape
    per_chunk = max(1, chunk_bytes // max(1, x * y * array.dtype.itemsize))
    for start in range(0, len(indices), per_chunk):
        chosen = indices[start : start + per_chunk]
        block = _transpose_xyc(np.take(array, chosen, axis=2))  # (Y, C, X)
        for m, index in enumerate(chosen):
            yield index, np.ascontiguousarray(block[::-1, m, ::-1])


def _cut_slice(values, labels, affine, shape, plane, index, specs, cfg) -> list[SliceImage]:
    """All windowed images of one slice.

    ``values`` and ``labels`` (or None) are the (H, W) display-oriented slices; they are resized
    once, then windowed and encoded per spec.
    """
    values, scale = resize_longest(np.asarray(values, dtype=np.float32), cfg.max_side, "area")
    lab = None
    if labels is not None:
        lab, _ = resize_longest(np.asarray(labels, dtype=np.int32), cfg.max_side, "nearest")
    p2r = plane_geometry(affine, plane, index, shape, scale)
    spacing, thickness = pixel_spacing(p2r), slice_thickness(affine, plane)
    h, w = values.shape
    out = []
    for spec in specs:
        pixels = apply_range(values, spec.vmin, spec.vmax, cfg.bits)
        if is_blank(pixels):
            continue  # no signal in this window: not a training image
        out.append(SliceImage(
            plane=plane,
            slice_index=index,
            window=spec.name,
            height=h,
            width=w,
            png=encode_png(pixels),
            pixel_to_ras=p2r,
            pixel_spacing_mm=spacing,
            slice_thickness_mm=thickness,
            labels=lab,
            window_min=float(spec.vmin),
            window_max=float(spec.vmax),
            pixels=pixels if lab is not None else None,
        ))
    return out


def cut_images(volume, cfg: SliceConfig | None = None,
               also: dict[str, set[int]] | None = None) -> list[SliceImage]:
    """The slicing stage: cut a Volume into windowed, resized, PNG-encoded 2D images.

    Windows come from :func:`pipeline.images.windows.windows_for` (computed once per volume). For each
    plane of ``cfg.planes`` and each slice chosen by :func:`select_slices`, the slice is extracted
    in display orientation, downscaled to ``cfg.max_side``, windowed with every spec and encoded;
    a windowed image without signal (:func:`is_blank`) is dropped.

    Windowing is per slice, after the resize: windowing the whole volume once per window up front
    measured 2x slower (251 vs 123 ms for every 4th of 240 512×512 slices) because most slices
    are never cut; windowing a contiguous slice costs ~0.35 ms against ~4 ms to encode it.

    ``also``: plane → further slice indices to cut (the slices annotation tables drew on).

    Returns:
        SliceImages ordered by plane (config order), slice index, then window (spec order).
    """
    cfg = cfg or SliceConfig()
    array = _frame(volume, cfg.frame)
    labels = volume.labels
    if labels is not None and tuple(labels.shape) != array.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} differs from the image grid {array.shape}"
        )
    specs: list[WindowSpec] = windows_for(volume, cfg.ct_windows, cfg.percentiles)
    out: list[SliceImage] = []
    for plane in cfg.planes:
        n = array.shape[PLANE_AXIS[plane]]
        has = label_presence(labels, plane) if labels is not None else np.zeros(n, dtype=bool)
        chosen = select_slices(has, cfg.every_k)
        extra = sorted(i for i in (also or {}).get(plane, ()) if 0 <= i < n)
        if extra:
            chosen = np.union1d(chosen, np.asarray(extra, np.int64))
        label_slices = iter_plane_slices(labels, plane, chosen) if labels is not None else None
        for index, values in iter_plane_slices(array, plane, chosen):
            lab = next(label_slices)[1] if label_slices is not None else None
            out.extend(
                _cut_slice(values, lab, volume.affine, array.shape, plane, index, specs, cfg)
            )
    return out
