"""Label maps paired with image volumes: NIfTI label files, names sidecars, DICOM label objects.

Every reader returns ``(labels, names)``: ``labels`` is an (X, Y, Z) int32 array on the RAS+
closest-canonical grid of the image :class:`~pipeline.ingest.volume.Volume` (same shape as
``volume.array.shape[:3]``, same voxel → RAS mm ``volume.affine``), 0 = background; ``names``
maps each label value present in ``labels`` to a name. Label maps are never resampled: a label
on another grid is refused with ``IngestError("label_mismatch")``.

* NIfTI label maps: :func:`read_nifti_labels`; names from a JSON sidecar via
  :func:`label_names_from_json` (plain map, Medical Segmentation Decathlon, nnU-Net v2).
* One binary NIfTI mask per structure (TotalSegmentator): :func:`read_mask_folder`.

DICOM RTSTRUCT / SEG are read in :mod:`pipeline.labels.dicom`; discovery recognises them and
their referenced series from the header (:func:`pipeline.ingest.dicom_io.header_from_dataset`).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import IngestError
from pipeline.geometry import present_values
from pipeline.ingest.volume import Volume, check_affine, to_canonical

MAX_JSON_BYTES = 16 * 1024 * 1024
# Grid match tolerances between a label NIfTI and its image (both after canonical reorientation):
TRANSLATION_TOL_MM = 1e-2  # affine[:3, 3], mm
LINEAR_TOL = 1e-4  # affine[:3, :3] elements (rotation × zoom), mm per voxel
INTEGRAL_TOL = 1e-3  # float label values must be this close to an integer


# ----------------------------------------------------------------------------- names JSON


def _as_int(value: object) -> int | None:
    """An int from an int (not bool) or a decimal-integer string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():
            return int(text)
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _names_from_mapping(mapping: dict) -> dict[int, str]:
    """Both directions: ``{"1": "liver"}`` and ``{"liver": 1}``; lists (nnU-Net regions) skipped."""
    names: dict[int, str] = {}
    for key, value in mapping.items():
        if isinstance(value, str) and _as_int(key) is not None:
            number, name = _as_int(key), value
        elif _as_int(value) is not None and not isinstance(value, str):
            number, name = _as_int(value), str(key)
        else:
            continue  # region-based lists, nested objects, nulls: not a value → name entry
        if number is None or number <= 0 or number in names:
            continue  # background (0), negatives, and repeated values (first one wins)
        if not _utf8(name):
            continue  # a lone surrogate ("\\ud800" in the JSON) cannot be written to Parquet
        names[number] = name.strip() or f"label_{number}"
    return names


def label_names_from_json(path: str | Path) -> dict[int, str]:
    """Label value → name from a JSON sidecar.

    Accepted forms (background / value 0 is dropped from all of them):

    * plain map: ``{"1": "liver", "2": "tumour"}``;
    * Medical Segmentation Decathlon ``dataset.json``: ``{"labels": {"0": "background", ...}}``;
    * nnU-Net v2 ``dataset.json``: ``{"labels": {"background": 0, "liver": 1, "x": [1, 2]}}``
      (region-based list values are skipped; only int values are taken).

    The file is only ever parsed with :func:`json.loads`. Returns ``{}`` for a map with no usable
    entry. Raises ``IngestError("bad_label")`` for oversized or non-JSON files and for JSON
    whose top level is not an object, ``IngestError("filesystem")`` when the file cannot be
    opened.
    """
    try:
        raw = Path(path).read_bytes()[: MAX_JSON_BYTES + 1]
    except OSError:
        raise IngestError("filesystem", "label names file could not be opened", path) from None
    if len(raw) > MAX_JSON_BYTES:
        raise IngestError("bad_label", "label names file larger than 16 MiB", path)
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise IngestError("bad_label", "label names file is not valid JSON", path) from None
    if not isinstance(doc, dict):
        raise IngestError("bad_label", "label names JSON is not an object", path)
    inner = doc.get("labels")
    return _names_from_mapping(inner if isinstance(inner, dict) else doc)


# ----------------------------------------------------------------------------- NIfTI


def _integral_labels(data: np.ndarray, path: object) -> np.ndarray:
    """Raw label data → int32, rejecting non-integral, negative or out-of-range values."""
    if data.dtype.kind == "b":
        return data.astype(np.int32)
    if data.dtype.kind not in "iuf":
        raise IngestError("bad_label", "label data is not numeric", path)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise IngestError("bad_label", "label data holds NaN or infinite values", path)
        rounded = np.rint(data)
        if data.size and float(np.abs(data - rounded).max()) > INTEGRAL_TOL:
            raise IngestError("bad_label", "label data holds non-integer values", path)
        data = rounded
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.int32).max):
        raise IngestError("bad_label", "label values outside 0..2^31-1", path)
    return data.astype(np.int32)


def _load_label_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a label NIfTI → int32 data (file axis order, (I, J, K, 1) squeezed to 3D) and its
    voxel → RAS affine."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception:  # nibabel raises many types for broken files
        raise IngestError("bad_label", "label NIfTI could not be read", path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    try:
        check_affine(affine, path)
    except IngestError:
        raise IngestError("bad_label", "label NIfTI has a singular, sheared or non-finite affine",
                          path) from None
    return _integral_labels(data, path), affine


def _check_grid(shape: tuple, affine: np.ndarray, volume: Volume, path: object) -> None:
    """Raise ``label_mismatch`` unless (shape, affine) equal the image grid within tolerance."""
    image_shape = tuple(int(s) for s in volume.array.shape[:3])
    if tuple(shape) != image_shape:
        raise IngestError("label_mismatch", "label map shape differs from the image's", path)
    ref = np.asarray(volume.affine, dtype=np.float64)
    d_lin = float(np.abs(affine[:3, :3] - ref[:3, :3]).max())
    d_t = float(np.abs(affine[:3, 3] - ref[:3, 3]).max())
    if d_lin > LINEAR_TOL or d_t > TRANSLATION_TOL_MM:
        raise IngestError("label_mismatch", "label map affine differs from the image's", path)


def read_nifti_labels(
    path: str | Path, volume: Volume, names: dict[int, str] | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Read a NIfTI label map and put it on the canonical grid of ``volume``.

    The stored integers are read (``np.asanyarray(img.dataobj)``; float data must be within
    1e-3 of integers and is rounded), a 4D map with a last dimension of 1 is squeezed, and the
    map is reoriented to RAS+ closest canonical with :func:`pipeline.ingest.volume.to_canonical`
    (axes permuted/flipped only). It must then match the image grid: same shape as
    ``volume.array.shape[:3]``, affine within 1e-4 on every rotation/zoom element and 1e-2 mm
    on translation.

    Args:
        path: the label NIfTI (.nii / .nii.gz).
        volume: the image; ``array`` (X, Y, Z[, T]) and ``affine`` (voxel → RAS mm), canonical.
        names: optional value → name map (e.g. from :func:`label_names_from_json`).

    Returns:
        labels: (X, Y, Z) int32, RAS+ canonical grid of ``volume``, 0 = background.
        names: value → name for every value present; values missing from ``names`` (or all of
            them when ``names`` is None) are called ``label_<value>``.

    Raises:
        IngestError: ``label_mismatch`` (not 3D, other shape or affine), ``bad_label``
            (unreadable, non-integral or negative values, bad affine).
    """
    data, affine = _load_label_nifti(path)
    if data.ndim != 3:
        raise IngestError("label_mismatch", "label map is not 3D", path)
    data, affine = to_canonical(data, affine)
    _check_grid(data.shape, affine, volume, path)
    labels = np.ascontiguousarray(data, dtype=np.int32)
    given = names or {}
    present = present_values(labels)
    return labels, {v: given.get(v) or f"label_{v}" for v in present}


def read_mask_folder(paths: list[Path], volume: Volume, names: dict[int, str] | None = None
                     ) -> tuple[np.ndarray, dict[int, str]]:
    """Merge one binary NIfTI mask per structure (TotalSegmentator layout) into a label map on
    the canonical grid of ``volume``: mask i (paths in the given order) → value i + 1, later
    masks win where they overlap. Returns ((X, Y, Z) int32, names of values present)."""
    merged, affine = None, None
    for value, path in enumerate(paths, start=1):
        data, aff = _load_label_nifti(path)
        if merged is None:
            merged, affine = np.zeros(data.shape, np.int32), aff
        elif data.shape != merged.shape or not np.allclose(aff, affine, atol=1e-3):
            raise IngestError("label_mismatch", "mask grid differs from the first mask's", path)
        merged[data > 0] = value
    if merged is None:
        raise IngestError("bad_label", "no masks to merge", None)
    merged, affine = to_canonical(merged, affine)
    _check_grid(merged.shape, affine, volume, paths[0])
    present = present_values(merged)
    given = names or {}
    return merged, {v: given.get(v) or f"label_{v}" for v in present}
