"""Builders of test inputs: DICOM series written with pydicom, with controllable geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PHI = {
    "PatientName": "CANARYNAME^ALICE",
    "PatientID": "CANARYPID777",
    "OtherPatientIDs": "CANARYOTHER555",
    "PatientBirthDate": "19230405",
    "InstitutionName": "CANARY GENERAL HOSPITAL",
    "ReferringPhysicianName": "CANARYDOC^BOB",
    "AccessionNumber": "CANARYACC999",
    "StudyID": "CANARYSTUDY1",
}


def ct_slice(pixels: np.ndarray, ipp, iop=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.7),
             series_uid="1.2.3.4.5", instance=1, study_uid="1.2.3.4", **tags) -> Dataset:
    """One CT slice: ``pixels`` (rows, cols) int16 HU stored with intercept −1024 as uint16."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop = generate_uid(entropy_srcs=[series_uid, str(instance), str(ipp)])
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = study_uid + ".1"
    ds.Modality, ds.StudyDate, ds.KVP = "CT", "20200102", 120
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(x) for x in ipp]
    ds.ImageOrientationPatient = [float(x) for x in iop]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def ramp_volume(shape=(3, 24, 20), seed=0) -> np.ndarray:
    """(Z, rows, cols) int16 test pattern, distinct per slice and asymmetric in-plane."""
    z, r, c = shape
    rng = np.random.default_rng(seed)
    base = np.arange(r)[:, None] * 7 + np.arange(c)[None, :] * 3
    return np.stack([base + 50 * k + rng.integers(0, 5, (r, c)) for k in range(z)]).astype(np.int16)


def write_series(folder: Path, volume: np.ndarray, origin=(-10.0, -20.0, 30.0), step=2.5,
                 iop=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.7), names=None, **kw) -> list[Path]:
    """Write (Z, rows, cols) slices along the IOP normal; returns the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(iop[:3], iop[3:])
    paths = []
    for k, plane in enumerate(volume):
        ipp = np.asarray(origin, float) + k * step * normal
        ds = ct_slice(plane, ipp, iop, spacing, instance=k + 1, **kw)
        path = folder / (names[k] if names else f"IM{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
