"""``read_volume``: DICOM series and NIfTI files → de-identified canonical :class:`Volume`.

Public API::

    from pipeline.ingest.read import read_volume
    vol = read_volume("series_folder/")          # or a list of DICOM files, or "x.nii.gz"
    vol.array   # (X, Y, Z[, T]) RAS+ closest canonical
    vol.affine  # 4x4 voxel -> RAS mm

Every failure raises :class:`pipeline.errors.IngestError` with a reason code and a fixed
message (never a value read from the file or its path). Read right or refuse: Siemens mosaics
are de-tiled (mosaic.py), gantry-tilted stacks resampled (tilt.py), header values validated as
they are parsed (dicom_values.py), and a volume without signal is refused (``no_signal``).
4D rule: DICOM echoes/phases/mosaic time points and NIfTI 4D volumes keep T as the 4th axis;
2D cutting uses t = 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.deid import VOI_KEYS, Deidentifier, clean_dicom_meta
from pipeline.ingest.dicom_io import (
    Header,
    check_budget,
    check_codestream,
    dcmread_safe,
    header_from_dataset,
    read_header,
)
from pipeline.ingest.dicom_pixels import frames_of, inversion_sum
from pipeline.ingest.dicom_series import assemble, planes_of, projection_facts
from pipeline.ingest.dicom_values import get_value
from pipeline.ingest.mosaic import mosaic_count, mosaic_planes
from pipeline.ingest.nifti_voxels import (
    load_nifti,
    nifti_scaling,
    nifti_shape,
    nifti_voxels,
    stored_header,
)
from pipeline.ingest.tilt import RESAMPLED, deshear, is_sheared
from pipeline.ingest.volume import LPS_TO_RAS, Volume, check_affine, to_canonical

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class ReadConfig:
    """Limits and policies applied while reading one series."""

    file_budget_bytes: int = 1 << 30  # max declared decoded size of one file (bomb guard)
    series_budget_bytes: int = 4 << 30  # max declared decoded size of one series
    min_slices: int = 1  # fewer distinct positions → too_few_slices
    allow_burned_in: bool = False  # ingest images flagged as burned-in risk
    refuse_gantry_tilt: bool = False  # refuse tilted stacks (gantry_tilt) instead of resampling
    # keep label names (RTSTRUCT ROIName, SEG SegmentLabel, sidecars) the structure vocabulary
    # does not know instead of structure_<value>: they may carry names and dates (PHI)
    allow_unknown_label_names: bool = False


@dataclass
class SeriesRead:
    """Outcome of reading one DICOM series: a volume (or None) and per-file problems."""

    volume: Volume | None
    file_errors: dict[int, IngestError] = field(default_factory=dict)
    error: IngestError | None = None
    # Where each stored frame went, for annotations drawn on frames (pipeline/roi/annotated.py):
    # (file position in ``paths``, frame number in the file) → (k, t), the frame's slice and
    # time index in the assembled (cols, rows, K[, T]) array, and ``grid_affine``, that array's
    # voxel → RAS mm (before reorientation). Empty / None for a resampled (tilted) stack.
    frames: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    grid_affine: np.ndarray | None = None


def is_nifti(path: os.PathLike | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _admit(header: Header, cfg: ReadConfig, total: int, path) -> int:
    """Class, budget and burned-in checks on a header, before any pixel is read.

    Returns the new running total of declared bytes.
    """
    if header.kind != "image":
        raise IngestError("unsupported_sop", "the SOP class is not an image class", path)
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

    With ``headers`` from discovery the checks run before the file is read in full. Then the
    compressed frames' own dimensions are checked before anything is decoded.
    """
    out, total = [], 0
    for i, p in enumerate(paths):
        try:
            if headers is not None:
                header = headers[i]
                total = _admit(header, cfg, total, p)
                ds = dcmread_safe(Path(p), inflate_budget=cfg.file_budget_bytes)
            else:
                ds = dcmread_safe(Path(p), inflate_budget=cfg.file_budget_bytes)
                header = header_from_dataset(ds)
                total = _admit(header, cfg, total, p)
            check_codestream(ds, header, cfg.file_budget_bytes, p)
            out.append((i, ds))
        except IngestError as e:
            errors[i] = e
    return out


def _planes(ds, path) -> list:
    """Decode one data set into planes: a Siemens mosaic's tiles, or its frames."""
    frames, _ = frames_of(ds, path)
    n = mosaic_count(ds, path)
    return planes_of(ds, frames, path) if n is None else mosaic_planes(ds, frames, n, path)


def _decode_planes(datasets, errors: dict, owners: list | None = None) -> list:
    """Every plane of ``datasets``; ``owners`` (when given) gets each plane's file position."""
    planes = []
    for i, ds in datasets:
        try:
            got = _planes(ds, ds.filename)
        except IngestError as e:
            errors[i] = e
            continue
        planes.extend(got)
        if owners is not None:
            owners.extend([i] * len(got))
    return planes


def frame_slots(planes, owners, affine_lps: np.ndarray, shape) -> dict:
    """(file position, frame number) → (k, t) in the assembled array (see SeriesRead).

    With geometry a plane's k is where its ImagePositionPatient falls along the stack
    (``affine_lps⁻¹``); without, frames of one object are its T axis. Frames of a multi-echo
    stack (T > 1 with geometry) are left out: which echo a frame became is not recorded."""
    four_d = len(shape) == 4
    if all(p.ipp is None for p in planes):
        ordered = sorted(range(len(planes)), key=lambda i: planes[i].order)
        return {(owners[i], planes[i].order[1]): (0, t if four_d else 0)
                for t, i in enumerate(ordered)}
    if four_d:
        return {}
    inv = np.linalg.inv(affine_lps)
    out = {}
    for p, owner in zip(planes, owners, strict=True):
        k = float((inv @ np.append(np.asarray(p.ipp, float), 1.0))[2])
        if abs(k - round(k)) < 0.05 and 0 <= round(k) < shape[2]:
            out[(owner, p.order[1])] = (int(round(k)), 0)
    return out


def check_signal(array: np.ndarray, path: object = None) -> None:
    """``no_signal`` when ``array`` has no finite value, or every finite value is the same."""
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        lo = np.min(array, where=finite, initial=np.inf)
        hi = np.max(array, where=finite, initial=-np.inf)
    else:
        lo, hi = array.min(), array.max()
    if not lo < hi:
        raise IngestError("no_signal", "no finite voxel, or every voxel has the same value", path)


def _orthogonal(array, affine_lps, cfg: ReadConfig, path):
    """(array, affine, resampled): a gantry-tilted (sheared) stack resampled onto an orthogonal
    grid (resampled = tilt.RESAMPLED), or refused with ``gantry_tilt`` when the config says so;
    any other stack unchanged (resampled = None)."""
    if not is_sheared(affine_lps):
        return array, affine_lps, None
    if cfg.refuse_gantry_tilt:
        raise IngestError("gantry_tilt", "slice positions drift off the slice normal (tilted "
                          "gantry or sheared stack)", path)
    array, affine_lps = deshear(array, affine_lps, cfg.series_budget_bytes, path)
    return array, affine_lps, RESAMPLED


def _facts(ds, planes) -> dict:
    photometric = str(get_value(ds, "PhotometricInterpretation") or "").upper()
    return {
        "inverted_monochrome1": photometric == "MONOCHROME1",
        "color_to_luminance": photometric not in ("MONOCHROME1", "MONOCHROME2", ""),
        "geometry_known": planes[0].iop is not None,
    }


def _carry_voi(meta: dict, ds, path) -> None:
    """The header window (``voi_min`` .. ``voi_max``, on values before the MONOCHROME1
    inversion) carried through that inversion, so it stays on the volume's values; dropped
    for colour images (a VOI applies to grey values only)."""
    if meta.get("voi_min") is None:
        return
    if meta["color_to_luminance"]:
        meta.update(dict.fromkeys(VOI_KEYS))
    elif meta["inverted_monochrome1"]:
        try:
            total = inversion_sum(ds, path)
        except IngestError:
            meta.update(dict.fromkeys(VOI_KEYS))
            return
        meta["voi_min"], meta["voi_max"] = total - meta["voi_max"], total - meta["voi_min"]


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
    owners: list[int] = []
    planes = _decode_planes(datasets, errors, owners)
    if not planes:
        first = next(iter(errors.values()), None)
        err = first or IngestError("no_pixel_data", "series has no readable image", where)
        return SeriesRead(None, errors, err)
    try:
        array, affine_lps = assemble(planes, where, cfg.min_slices)
        check_signal(array, where)
        slots = frame_slots(planes, owners, affine_lps, array.shape)
        array, affine_lps, resampled = _orthogonal(array, affine_lps, cfg, where)
        affine = grid_affine = LPS_TO_RAS @ affine_lps
        check_affine(affine, where)
        array, affine = to_canonical(array, affine)
    except IngestError as e:
        return SeriesRead(None, errors, e)
    if resampled:
        slots, grid_affine = {}, None
    ds0 = datasets[0][1]
    meta = clean_dicom_meta(ds0, deid)
    meta.update(_facts(ds0, planes), n_files=len(datasets), resampled=resampled)
    meta.update(projection_facts(ds0, planes, meta["modality"], where))
    _carry_voi(meta, ds0, where)
    return SeriesRead(Volume(array, affine, meta["modality"], meta), errors, None, slots,
                      grid_affine)


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
    img = load_nifti(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or getattr(img, "affine", None) is None:
        raise IngestError("not_a_volume", "the NIfTI container holds no image volume", path)
    scaling = nifti_scaling(stored_header(img, path), path)
    shape = nifti_shape(img, scaling, cfg.series_budget_bytes, path)
    check_affine(img.affine, path)
    data = nifti_voxels(img, shape, scaling, path)
    check_signal(data, path)
    array, affine = to_canonical(data, np.asarray(img.affine, dtype=np.float64))
    ident = identity or path.name
    mod, how = _nifti_modality(array if array.ndim == 3 else array[..., 0], modality)
    patient_key = deid.pseudonym("patient", "nifti:" + ident)
    meta = {
        "patient_key": patient_key, "study_key": deid.pseudonym("study", "nifti:" + ident),
        "series_key": deid.pseudonym("series", "nifti:" + ident), "modality": mod,
        "modality_source": how, "slice_thickness_mm": float(np.linalg.norm(affine[:3, 2])),
        "contrast": False, "deid_key_id": deid.key_id, "resampled": None,
        "deid_method": "NIfTI: geometry only (no header text, no extensions)",
    }
    return Volume(array, affine, mod, meta)


def _listing(folder: Path) -> list[Path]:
    """The regular, non-NIfTI files directly in ``folder``, sorted; ``filesystem`` when the OS
    refuses the listing."""
    try:
        return sorted(q for q in folder.iterdir() if q.is_file() and not is_nifti(q))
    except OSError:
        raise IngestError("filesystem", "the folder could not be listed", folder) from None


def _dicom_files(folder: Path) -> list[Path]:
    """Image files of the single series in ``folder``; non-image objects (raw data,
    presentation states, reports, label objects) are left out. An error when it holds several
    image series, or none."""
    series: dict[str, list[Path]] = {}
    others = 0
    for p in _listing(folder):
        try:
            h = read_header(p)
        except IngestError:
            continue
        if h.kind == "image":
            series.setdefault(h.series_uid, []).append(p)
        else:
            others += 1
    if len(series) > 1:
        raise IngestError("geometry", "folder holds several image series; pass the files of "
                          "one series as a list", folder)
    if not series and others:
        raise IngestError("unsupported_sop", "folder holds DICOM objects but no image", folder)
    if not series:
        raise IngestError("no_pixel_data", "folder holds no readable DICOM image", folder)
    return next(iter(series.values()))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        raise IngestError("filesystem", "the path could not be examined", path) from None


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
    elif _is_dir(Path(path)):
        files = _dicom_files(Path(path))
    else:
        files = [Path(path)]
    result = read_dicom_series(files, deid, cfg)
    if result.error is not None:
        raise result.error
    if result.file_errors:
        raise next(iter(result.file_errors.values()))
    return result.volume
