"""Builders of DICOM label objects (RTSTRUCT, SEG) over a hand-specified image series geometry,
shared by the label and unit tests. Geometry conventions: see tests/pipeline/labels/test_labels.py."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    SegmentationStorage,
    generate_uid,
)

from pipeline.ingest.volume import LPS_TO_RAS, Volume, to_canonical


class Series:
    """A DICOM image series geometry: IOP, first IPP, PixelSpacing (Δrow, Δcol), slice step."""

    def __init__(self, iop, origin, spacing, step, cols, rows, nslices):
        self.iop = np.asarray(iop, float)
        self.origin = np.asarray(origin, float)
        self.spacing = spacing
        self.step = np.asarray(step, float)
        self.cols, self.rows, self.nslices = cols, rows, nslices

    def lps(self, c, r, s):
        """LPS mm of column c, row r on slice s (the DICOM definition)."""
        return (self.origin + c * self.spacing[1] * self.iop[:3]
                + r * self.spacing[0] * self.iop[3:] + s * self.step)

    def ipp(self, s):
        return self.lps(0, 0, s)

    def ras_affine(self):
        """Voxel (c, r, s) → RAS mm, before canonical reorientation."""
        a = np.eye(4)
        a[:3, 0] = self.spacing[1] * self.iop[:3]
        a[:3, 1] = self.spacing[0] * self.iop[3:]
        a[:3, 2] = self.step
        a[:3, 3] = self.origin
        return LPS_TO_RAS @ a

    def volume(self):
        arr = np.zeros((self.cols, self.rows, self.nslices), np.float32)
        arr, aff = to_canonical(arr, self.ras_affine())
        return Volume(array=arr, affine=aff, modality="CT")


def axial():
    return Series([1, 0, 0, 0, 1, 0], [-100.0, -80.0, 30.0], (0.7, 0.8), [0, 0, 2.5], 40, 30, 10)


def sagittal():
    # rows run to Inferior, columns to Posterior, slices to Left
    return Series([0, 1, 0, 0, 0, -1], [-20.0, -50.0, 60.0], (1.5, 1.25), [2.0, 0, 0], 24, 20, 12)


def box(i0, i1, j0, j1, k0, k1):
    """Set of voxel index triples with inclusive bounds."""
    return {(i, j, k) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)
            for k in range(k0, k1 + 1)}


def voxels(labels, value):
    return {tuple(int(x) for x in v) for v in np.argwhere(labels == value)}


def write(ds, path, sop_class):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def square(series, c0, c1, r0, r1, s):
    corners = [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]
    return [series.lps(c, r, s) for c, r in corners]


def contour(points, kind="CLOSED_PLANAR"):
    item = Dataset()
    item.ContourGeometricType = kind
    item.NumberOfContourPoints = len(points)
    item.ContourData = [round(float(x), 4) for p in points for x in p]
    return item


def make_rtstruct(path, series, rois, series_uid):
    """rois: list of (ROINumber, ROIName, [contour items]); ROIContourSequence is reversed."""
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    frame_uid = generate_uid()
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series_uid
    ref_study = Dataset()
    ref_study.ReferencedSOPInstanceUID = generate_uid()
    ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
    ref_frame = Dataset()
    ref_frame.FrameOfReferenceUID = frame_uid
    ref_frame.RTReferencedStudySequence = Sequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_frame])
    ssroi, roic = [], []
    for number, name, contours in rois:
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = frame_uid
        item.ROIName = name
        ssroi.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = Sequence(contours)
        roic.append(rc)
    ds.StructureSetROISequence = Sequence(ssroi)
    ds.ROIContourSequence = Sequence(roic[::-1])
    return write(ds, path, RTStructureSetStorage)


def make_seg(path, series, frames, names, kind="BINARY", shift=(0.0, 0.0, 0.0)):
    """frames: list of (segment number, slice index, (rows, cols) array)."""
    ds = Dataset()
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.SegmentationType = kind
    ref = Dataset()
    ref.SeriesInstanceUID = "1.2.3.4.5"
    ds.ReferencedSeriesSequence = Sequence([ref])
    segs = []
    for number, name in names.items():
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = name
        segs.append(item)
    ds.SegmentSequence = Sequence(segs)
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = [float(v) for v in series.iop]
    measures.PixelSpacing = list(series.spacing)
    measures.SliceThickness = 1.0
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for number, index, _ in frames:
        ident, pos, item = Dataset(), Dataset(), Dataset()
        ident.ReferencedSegmentNumber = number
        pos.ImagePositionPatient = [float(v) for v in series.ipp(index) + shift]
        item.SegmentIdentificationSequence = Sequence([ident])
        item.PlanePositionSequence = Sequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    data = np.stack([f for _, _, f in frames])
    ds.Rows, ds.Columns = series.rows, series.cols
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    if kind == "BINARY":
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit = 0
        ds.PixelData = pack_bits(data.astype(np.uint8))
    else:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.SegmentationFractionalType = "PROBABILITY"
        ds.MaximumFractionalValue = 255
        ds.PixelData = data.astype(np.uint8).tobytes()
    return write(ds, path, SegmentationStorage)


def axial_expected(series, frames, threshold=1):
    """Hand mapping of axial frames: pixel (r, c) on slice s → (cols-1-c, rows-1-r, s)."""
    out = np.zeros((series.cols, series.rows, series.nslices), np.int32)
    for number, s, f in sorted(frames, key=lambda t: t[0]):
        out[:, :, s][(f.T >= threshold)[::-1, ::-1]] = number
    return out


def canonical_labels(series):
    labels = np.zeros((series.cols, series.rows, series.nslices), np.int32)
    labels[3:9, 4:7, 2:5] = 1
    labels[20:25, 10:20, 6] = 4
    return labels
