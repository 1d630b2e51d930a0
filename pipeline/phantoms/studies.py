"""Deterministic synthetic CT studies written as real DICOM series plus NIfTI label maps.

Layout written by :func:`make_phantoms` (one study per patient)::

    OUT/<FAMILY^GIVEN_PIDnnnnnnn>/CT_<series>/<one file per slice>.dcm
    OUT/<FAMILY^GIVEN_PIDnnnnnnn>/CT_<series>_seg.nii.gz   label map, int16, RAS+ grid
    OUT/<FAMILY^GIVEN_PIDnnnnnnn>/CT_<series>_seg.json     {"1": "body", ...} (values used)
    OUT/<FAMILY^GIVEN_PIDnnnnnnn>/CT_<series>_truth.json   ground truth (no identifying values)

The same seed gives byte-identical files: UIDs come from
``pydicom.uid.generate_uid(entropy_srcs=...)`` over (seed, patient, ...), dates are drawn from
the seed, and gzip headers carry no time. Every third patient (index % 3 == 2) gets slices with
random hex file names written in shuffled order; InstanceNumber always counts from the most
superior slice (1) downward.

Geometry: the anatomy is a RAS+ array ``A[i, j, k]`` (see :mod:`pipeline.phantoms.anatomy`).
DICOM patient coordinates are LPS. With ImageOrientationPatient [1, 0, 0, 0, 1, 0] the pixel at
(row r, column c) of a slice at ImagePositionPatient P lies at
``LPS = P + c * col_spacing * (1, 0, 0) + r * row_spacing * (0, 1, 0)``: columns grow toward
patient Left (−i), rows toward Posterior (−j). Hence slice k is ``A[::-1, ::-1, k].T`` and P is
the LPS position of voxel (X-1, Y-1, k).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from pipeline.phantoms.anatomy import LABELS, Phantom, build_phantom, patient_rng, sample_spec

__all__ = [
    "LABELS",
    "PatientIdentity",
    "patient_identity",
    "phi_strings",
    "ras_slice_to_pixels",
    "slice_position_lps",
    "write_series",
    "write_labels",
    "write_patient",
    "make_phantoms",
]

STREAM_IDENTITY, STREAM_FILES = 11, 12
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0011, "PHANTOM PRIVATE"
_FAMILY = (
    "KOWALSKI",
    "FITZGERALD",
    "OKONKWO",
    "HALVORSEN",
    "MARCHETTI",
    "BRANDVOLD",
    "ABERNATHY",
    "DELACROIX",
    "YAMAMOTO",
    "GRUNWALD",
    "OYELARAN",
    "PETRAKIS",
)
_GIVEN = (
    ("JANE", "F"),
    ("MARGARET", "F"),
    ("PRIYANKA", "F"),
    ("ROSALIND", "F"),
    ("WINIFRED", "F"),
    ("TOBIAS", "M"),
    ("EZEKIEL", "M"),
    ("HOLLIS", "M"),
    ("BARNABY", "M"),
    ("LEOPOLD", "M"),
)
_INSTITUTIONS = (
    ("SAINT ELSEWHERE GENERAL HOSPITAL", "12 HARBOR ROAD, PORT ELLIS"),
    ("MERCY VALLEY MEDICAL CENTER", "400 ORCHARD LANE, GLENHAVEN"),
    ("NORTHFIELD UNIVERSITY CLINIC", "7 COLLEGE SQUARE, NORTHFIELD"),
)
_DOCTORS = ("HOUSE^GREGORY", "QUINN^MICHAELA", "KILDARE^JAMES", "CROSS^CHRISTINA")
_OPERATORS = ("TECH^ANNIKA", "TECH^BORIS", "TECH^CELESTE")


@dataclass(frozen=True)
class PatientIdentity:
    """Fake identifying values of one patient (all seeded from (seed, index))."""

    index: int
    family: str
    given: str
    sex: str
    patient_id: str
    other_id: str
    birth_date: str
    age: str
    study_date: str
    study_time: str
    institution: str
    institution_address: str
    referring: str
    operator: str
    station: str
    accession: str
    study_id: str
    series_number: int

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"

    @property
    def folder(self) -> str:
        return f"{self.name}_{self.patient_id}"

    @property
    def private_value(self) -> str:
        return f"ORIGINAL ID {self.patient_id}"

    def phi(self) -> list[str]:
        """Identifying strings that must never survive de-identification (each ≥ 4 chars)."""
        return [
            self.name,
            self.family,
            self.given,
            self.folder,
            self.patient_id,
            self.other_id,
            self.birth_date,
            self.institution,
            self.institution_address,
            self.referring,
            self.referring.split("^")[0],
            self.operator,
            self.station,
            self.accession,
            self.study_id,
            self.private_value,
        ]


def patient_identity(seed: int, index: int) -> PatientIdentity:
    """The seeded fake identity of patient ``index`` (unique IDs for index < 1000)."""
    r = patient_rng(seed, index, STREAM_IDENTITY)
    given, sex = _GIVEN[int(r.integers(len(_GIVEN)))]
    institution, address = _INSTITUTIONS[int(r.integers(len(_INSTITUTIONS)))]
    study = dt.date(2021, 1, 4) + dt.timedelta(days=int(r.integers(0, 730)))
    birth = dt.date(
        study.year - int(r.integers(25, 85)), int(r.integers(1, 13)), int(r.integers(1, 29))
    )
    age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return PatientIdentity(
        index=index,
        family=_FAMILY[int(r.integers(len(_FAMILY)))],
        given=given,
        sex=sex,
        patient_id=f"PID{int(r.integers(10_000)):04d}{index % 1000:03d}",
        other_id=f"MRN-{int(r.integers(10**6)):06d}-{index:03d}",
        birth_date=birth.strftime("%Y%m%d"),
        age=f"{age:03d}Y",
        study_date=study.strftime("%Y%m%d"),
        study_time=f"{int(r.integers(7, 19)):02d}{int(r.integers(60)):02d}{int(r.integers(60)):02d}",
        institution=institution,
        institution_address=address,
        referring=_DOCTORS[int(r.integers(len(_DOCTORS)))],
        operator=_OPERATORS[int(r.integers(len(_OPERATORS)))],
        station=f"CTSCAN{int(r.integers(1, 9))}{institution[:4]}",
        accession=f"ACC{int(r.integers(10**7)):07d}",
        study_id=f"STU{int(r.integers(10**6)):06d}",
        series_number=int(r.integers(2, 10)),
    )


def phi_strings(seed: int, patients: int) -> list[list[str]]:
    """Per patient index (0 .. patients-1), the identifying strings seeded into its files."""
    return [patient_identity(seed, i).phi() for i in range(patients)]


def ras_slice_to_pixels(plane: np.ndarray) -> np.ndarray:
    """(X, Y) RAS+ plane ``A[:, :, k]`` → (Rows, Columns) DICOM pixels for IOP [1,0,0,0,1,0].

    Row r, column c take voxel (X-1-c, Y-1-r): columns grow toward Left, rows toward Posterior.
    """
    return np.ascontiguousarray(plane[::-1, ::-1].T)


def slice_position_lps(
    affine: np.ndarray, shape: tuple[int, ...], k: int
) -> tuple[float, float, float]:
    """ImagePositionPatient (LPS mm) of slice k: the centre of RAS voxel (X-1, Y-1, k)."""
    x, y, z = (np.asarray(affine, float) @ [shape[0] - 1, shape[1] - 1, k, 1.0])[:3]
    return (float(-x), float(-y), float(z))


def _ds(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _uid(seed: int, index: int, *parts: object) -> str:
    return generate_uid(
        entropy_srcs=["regioncorpus-phantom", str(seed), str(index), *map(str, parts)]
    )


def _series_header(ph: Phantom, who: PatientIdentity) -> Dataset:
    """Attributes shared by every slice of the series (patient, study, series, equipment)."""
    s, ds = ph.spec, Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, kw, who.study_date)
    for kw in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, kw, who.study_time)
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = who.accession, "CT", "PHANTOM"
    ds.InstitutionName, ds.InstitutionAddress = who.institution, who.institution_address
    ds.ReferringPhysicianName, ds.StationName = who.referring, who.station
    ds.StudyDescription = f"CT CHEST ABDOMEN {who.name}"
    ds.SeriesDescription = f"AXIAL {_ds(s.spacing[2])}MM {'C+' if s.contrast else 'NON-CON'}"
    ds.OperatorsName, ds.ManufacturerModelName = who.operator, "SYNTHETIC CT"
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs = who.name, who.patient_id, who.other_id
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = who.birth_date, who.sex, who.age
    ds.BurnedInAnnotation, ds.BodyPartExamined = "NO", "CHESTABDOMEN"
    if s.contrast:
        ds.ContrastBolusAgent, ds.ContrastBolusRoute = "IOHEXOL", "IV"
    ds.SliceThickness, ds.SpacingBetweenSlices = _ds(s.spacing[2]), _ds(s.spacing[2])
    ds.KVP, ds.PatientPosition = "120", "HFS"
    ds.StudyInstanceUID = _uid(s.seed, s.index, "study")
    ds.SeriesInstanceUID = _uid(s.seed, s.index, "series", who.series_number)
    ds.StudyID, ds.SeriesNumber = who.study_id, who.series_number
    ds.FrameOfReferenceUID = _uid(s.seed, s.index, "frame")
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = s.shape[1], s.shape[0]
    ds.PixelSpacing = [_ds(s.spacing[1]), _ds(s.spacing[0])]  # [row spacing (y), col spacing (x)]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", who.private_value)
    return ds


def write_series(ph: Phantom, who: PatientIdentity, series_dir: Path, shuffled: bool) -> list[Path]:
    """Write one CT Image Storage file per slice (Explicit VR Little Endian) into ``series_dir``.

    Stored values are uint16 ``round(HU) + 1024`` clipped to 12 bits. Returns the paths in
    slice order k = 0 .. Z-1 (inferior → superior).
    """
    s = ph.spec
    series_dir.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.rint(ph.hu) + 1024, 0, 4095).astype(np.uint16)
    nz = s.shape[2]
    r = patient_rng(s.seed, s.index, STREAM_FILES)
    if shuffled:
        names = [f"{r.bytes(8).hex()}.dcm" for _ in range(nz)]
        order = r.permutation(nz)
    else:
        names = [f"IM-{who.series_number:04d}-{nz - k:04d}.dcm" for k in range(nz)]
        order = np.arange(nz)
    paths = [series_dir / name for name in names]
    for k in (int(o) for o in order):
        ds = _series_header(ph, who)
        ds.InstanceNumber = nz - k  # 1 = most superior slice
        ds.SOPInstanceUID = _uid(s.seed, s.index, "instance", who.series_number, k)
        ipp = slice_position_lps(s.affine, s.shape, k)
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.SliceLocation = _ds(ipp[2])
        ds.add_new(0x7FE00010, "OW", ras_slice_to_pixels(stored[:, :, k]).tobytes())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.save_as(paths[k], enforce_file_format=True)
    return paths


def write_labels(ph: Phantom, base: Path, series_number: int) -> tuple[Path, Path, Path]:
    """Write ``<base>_seg.nii.gz`` (labels as-is: (X, Y, Z) int16 RAS+ with ``spec.affine`` as
    qform and sform), ``<base>_seg.json`` (label value → name, values present) and
    ``<base>_truth.json``. Returns the three paths."""
    aff = ph.spec.affine
    img = nib.Nifti1Image(ph.labels.astype(np.int16), aff)
    img.header.set_data_dtype(np.int16)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm")
    seg, names, truth = (
        base.with_name(base.name + suffix) for suffix in ("_seg.nii.gz", "_seg.json", "_truth.json")
    )
    nib.save(img, seg)
    used = sorted(int(v) for v in np.unique(ph.labels) if v != 0)
    names.write_text(json.dumps({str(v): LABELS[v] for v in used}, indent=2) + "\n")
    truth_doc = {**ph.truth(), "series_number": series_number}
    truth.write_text(json.dumps(truth_doc, indent=2) + "\n")
    return seg, names, truth


def write_patient(ph: Phantom, who: PatientIdentity, out: Path) -> Path:
    """Write the series and its label files under ``out/<who.folder>``; returns that folder."""
    folder = Path(out) / who.folder
    series = folder / f"CT_{who.series_number}"
    write_series(ph, who, series, shuffled=who.index % 3 == 2)
    write_labels(ph, series, who.series_number)
    return folder


def _make_one(out: Path, seed: int, index: int, matrix: int) -> Path:
    return write_patient(build_phantom(sample_spec(seed, index, matrix)),
                         patient_identity(seed, index), out)


def make_phantoms(out: Path, patients: int = 8, seed: int = 0, matrix: int = 160,
                  workers: int = 1) -> list[Path]:
    """Generate ``patients`` studies under ``out`` (``workers`` processes; each study depends
    only on (seed, index), so the files are the same for any worker count); returns the
    patient folders in index order."""
    if patients < 1 or seed < 0 or matrix < 32 or workers < 1:
        raise ValueError(f"need patients >= 1, seed >= 0, matrix >= 32, workers >= 1 "
                         f"(got {patients}, {seed}, {matrix}, {workers})")
    Path(out).mkdir(parents=True, exist_ok=True)
    if workers == 1:
        return [_make_one(out, seed, i, matrix) for i in range(patients)]
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(partial(_make_one, out, seed, matrix=matrix), range(patients),
                             chunksize=8))
