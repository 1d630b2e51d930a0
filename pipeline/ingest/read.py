"""``read_volume``: DICOM series and NIfTI files → de-identified canonical :class:`Volume`.

Public API::

    from pipeline.ingest.read import read_volume
    vol = read_volume("series_folder/")          # or a list of DICOM files, or "x.nii.gz"
    vol.array   # (X, Y, Z[, T]) RAS+ closest canonical
    vol.affine  # 4x4 voxel -> RAS mm

Every failure raises :class:`pipeline.errors.IngestError` naming the file and the problem.
4D rule: DICOM echoes/phases and NIfTI 4D volumes keep T as the 4th axis; 2D cutting uses t = 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.deid import Deidentifier, clean_dicom_meta
from pipeline.ingest.dicom_io import (
    Header,
    check_budget,
    dcmread_safe,
    header_from_dataset,
    read_header,
)
from pipeline.ingest.dicom_pixels import frames_of
from pipeline.ingest.dicom_series import assemble, planes_of
from pipeline.ingest.volume import LPS_TO_RAS, Volume, check_affine, to_canonical

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class ReadConfig:
    """Limits and policies applied while reading one series."""

    file_budget_bytes: int = 1 << 30  # max declared decoded size of one file (bomb guard)
    series_budget_bytes: int = 4 << 30  # max declared decoded size of one series
    min_slices: int = 1  # fewer distinct positions → too_few_slices
    allow_burned_in: bool = False  # ingest images flagged as burned-in risk


@dataclass
class SeriesRead:
    """Outcome of reading one DICOM series: a volume (or None) and per-file problems."""

    volume: Volume | None
    file_errors: dict[int, IngestError] = field(default_factory=dict)
    error: IngestError | None = None


def is_nifti(path: os.PathLike | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _admit(header: Header, cfg: ReadConfig, total: int, path) -> int:
    """Budget and burned-in checks on a header, before any pixel is read. Returns new total."""
    check_budget(header, cfg.file_budget_bytes, path)
    total += header.declared_bytes
    if total > cfg.series_budget_bytes:
        raise IngestError("size_budget", "series exceeds the series byte budget", path)
    if not cfg.allow_burned_in and header.burned_in:
        raise IngestError("burned_in_risk", "BurnedInAnnotation is YES, or absent on a "
                          "modality that customarily burns in text", path)
    return total


def _read_datasets(paths, cfg: ReadConfig, errors: dict, headers=None) -> list[tuple[int, object]]:
    """Full reads (pixels included) of the files that pass header and budget checks.

    With ``headers`` from discovery the checks run before the file is read in full.
    """
    out, total = [], 0
    for i, p in enumerate(paths):
        try:
            if headers is not None:
                total = _admit(headers[i], cfg, total, p)
                out.append((i, dcmread_safe(Path(p))))
            else:
                ds = dcmread_safe(Path(p))
                total = _admit(header_from_dataset(ds), cfg, total, p)
                out.append((i, ds))
        except IngestError as e:
            errors[i] = e
    return out


def _decode_planes(datasets, errors: dict) -> list:
    planes = []
    for i, ds in datasets:
        try:
            frames, facts = frames_of(ds, ds.filename)
            planes.extend(planes_of(ds, frames))
        except IngestError as e:
            errors[i] = e
    return planes


def _facts(ds, planes) -> dict:
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    return {
        "inverted_monochrome1": photometric == "MONOCHROME1",
        "color_to_luminance": photometric not in ("MONOCHROME1", "MONOCHROME2", ""),
        "geometry_known": planes[0].iop is not None,
    }


def read_dicom_series(paths, deid: Deidentifier, cfg: ReadConfig = ReadConfig(),
                      headers: list[Header] | None = None) -> SeriesRead:
    """Read the DICOM files ``paths`` (one series) into a canonical RAS+ :class:`Volume`.

    A file that cannot be read is recorded in ``file_errors`` and left out; the series is then
    assembled from the others (so a lost slice surfaces as ``missing_slices``).
    """
    paths = [Path(p) for p in paths]
    where = paths[0].parent if paths else None
    errors: dict[int, IngestError] = {}
    datasets = _read_datasets(paths, cfg, errors, headers)
    planes = _decode_planes(datasets, errors)
    if not planes:
        first = next(iter(errors.values()), None)
        err = first or IngestError("no_pixel_data", "series has no readable image", where)
        return SeriesRead(None, errors, err)
    try:
        array, affine_lps = assemble(planes, where, cfg.min_slices)
        affine = LPS_TO_RAS @ affine_lps
        check_affine(affine, where)
        array, affine = to_canonical(array, affine)
    except IngestError as e:
        return SeriesRead(None, errors, e)
    ds0 = datasets[0][1]
    meta = clean_dicom_meta(ds0, deid)
    meta.update(_facts(ds0, planes), n_files=len(datasets))
    return SeriesRead(Volume(array, affine, meta["modality"], meta), errors)


def _nifti_modality(data: np.ndarray, hint: str | None) -> tuple[str, str]:
    """Modality of a NIfTI volume: the caller's hint, else "CT" when the 1st percentile is at
    or below −900 (air in HU), else "MR". Returns (modality, how it was decided)."""
    if hint:
        return hint.upper(), "collection"
    sample = np.asarray(data[::4, ::4, ::2], dtype=np.float32)
    return ("CT" if np.percentile(sample, 1) <= -900 else "MR"), "heuristic"


def read_nifti(path, deid: Deidentifier, identity: str | None = None,
               modality: str | None = None, cfg: ReadConfig = ReadConfig()) -> Volume:
    """Read a NIfTI-1/2 file: scaling applied, canonical RAS+, header reduced to geometry.

    ``identity`` keys the patient/series pseudonyms (default: the file name stem). Header text
    fields (descrip, aux_file, intent_name, db_name) and extensions are never read into outputs.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt headers
        raise IngestError("unreadable", f"not a readable NIfTI file ({type(e).__name__}: "
                          f"{str(e)[:200]})", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or getattr(img, "affine", None) is None:
        raise IngestError("not_a_volume", f"{type(img).__name__} holds no image volume", path)
    shape = tuple(int(s) for s in img.shape)
    declared = int(np.prod(shape, dtype=np.int64)) * max(4, img.get_data_dtype().itemsize)
    if declared > cfg.series_budget_bytes:
        raise IngestError("size_budget", f"declared shape {shape} exceeds the byte budget", path)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3, 4):
        raise IngestError("unreadable", f"unsupported NIfTI dimensionality {shape}", path)
    check_affine(img.affine, path)
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except (EOFError, OSError, ValueError, Exception) as e:
        raise IngestError("truncated", f"voxel data could not be read ({type(e).__name__})",
                          path) from None
    if data.ndim == 2:
        data = data[:, :, None]
    data = data.astype(np.float32) if data.dtype.kind == "f" or data.dtype.itemsize > 2 else data
    array, affine = to_canonical(data, np.asarray(img.affine, dtype=np.float64))
    ident = identity or path.name
    mod, how = _nifti_modality(array if array.ndim == 3 else array[..., 0], modality)
    patient_key = deid.pseudonym("patient", "nifti:" + ident)
    meta = {
        "patient_key": patient_key, "study_key": deid.pseudonym("study", "nifti:" + ident),
        "series_key": deid.pseudonym("series", "nifti:" + ident), "modality": mod,
        "modality_source": how, "slice_thickness_mm": float(np.linalg.norm(affine[:3, 2])),
        "contrast": False, "deid_key_id": deid.key_id,
        "deid_method": "NIfTI: geometry only (no header text, no extensions)",
    }
    return Volume(array, affine, mod, meta)


def _dicom_files(folder: Path) -> list[Path]:
    """Image files of the single series in ``folder`` (an error when it holds several)."""
    series: dict[str, list[Path]] = {}
    for p in sorted(q for q in folder.iterdir() if q.is_file() and not is_nifti(q)):
        try:
            h = read_header(p)
        except IngestError:
            continue
        if h.kind == "image":
            series.setdefault(h.series_uid, []).append(p)
    if len(series) > 1:
        raise IngestError("geometry", f"folder holds {len(series)} image series; pass the "
                          "files of one series as a list", folder)
    if not series:
        raise IngestError("no_pixel_data", "folder holds no readable DICOM image", folder)
    return next(iter(series.values()))


def read_volume(path, deid: Deidentifier | None = None, cfg: ReadConfig = ReadConfig(),
                modality: str | None = None) -> Volume:
    """Read a DICOM series folder, a list of DICOM files, or a NIfTI file.

    Returns a :class:`Volume` with ``array`` (X, Y, Z[, T]) in closest-canonical RAS+ and
    ``affine`` voxel → RAS mm. Raises :class:`IngestError` on any problem.
    ``deid`` defaults to the project key (see :mod:`pipeline.ingest.deid`).
    """
    deid = deid or Deidentifier.from_env()
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
    elif is_nifti(path):
        return read_nifti(path, deid, modality=modality, cfg=cfg)
    elif Path(path).is_dir():
        files = _dicom_files(Path(path))
    else:
        files = [Path(path)]
    result = read_dicom_series(files, deid, cfg)
    if result.error is not None:
        raise result.error
    if result.file_errors:
        raise next(iter(result.file_errors.values()))
    return result.volume
