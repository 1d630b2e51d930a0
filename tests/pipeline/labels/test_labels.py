"""Tests for pipeline.labels.nifti: NIfTI label maps, names JSON, RTSTRUCT and SEG on real files.

Expected voxel indices are derived by hand from the DICOM geometry: for an axial series with
IOP [1,0,0,0,1,0], DICOM column c grows to patient Left (RAS -x) and row r to Posterior
(RAS -y), so on the canonical RAS+ grid voxel (i, j, k) = (cols-1-c, rows-1-r, slice).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from label_factories import (
    axial,
    axial_expected,
    box,
    canonical_labels,
    contour,
    make_rtstruct,
    make_seg,
    sagittal,
    square,
    voxels,
)
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.errors import IngestError
from pipeline.ingest.dicom_io import header_from_dataset
from pipeline.ingest.volume import Volume
from pipeline.labels.dicom import rasterize_rtstruct, read_dicom_seg
from pipeline.labels.nifti import label_names_from_json, read_nifti_labels

# ----------------------------------------------------------------------------- geometry


def test_canonical_volumes_have_expected_axes():
    ax = axial().volume()
    assert ax.shape == (40, 30, 10)
    assert np.allclose(np.diag(ax.affine)[:3], [0.8, 0.7, 2.5])
    # voxel (0, 0, 0) of the canonical grid is DICOM column 39, row 29, slice 0
    assert np.allclose(ax.affine[:3, 3], axial().lps(39, 29, 0) * [-1, -1, 1])
    sag = sagittal().volume()
    assert sag.shape == (12, 24, 20)
    assert np.allclose(np.diag(sag.affine)[:3], [2.0, 1.25, 1.5])


# ----------------------------------------------------------------------------- RTSTRUCT


def test_rtstruct_axial_squares_ring_point_and_overlap(tmp_path):
    s = axial()
    vol = s.volume()
    uid = generate_uid()
    rois = [
        (7, "liver", [contour(square(s, 10, 20, 5, 15, 2)), contour(square(s, 10, 20, 5, 15, 3)),
                      contour(square(s, 10, 20, 5, 15, 50))]),  # slice 50: off the volume
        (3, "ring", [contour(square(s, 25, 35, 10, 20, 5)), contour(square(s, 28, 32, 13, 17, 5))]),
        (9, "marker", [contour([s.lps(5, 5, 5)], kind="POINT")]),
        (4, "overlap", [contour(square(s, 15, 25, 5, 15, 2))]),
    ]
    ds = make_rtstruct(tmp_path / "rs.dcm", s, rois, uid)
    labels, names = rasterize_rtstruct(ds, vol)

    assert labels.dtype == np.int32 and labels.shape == vol.shape
    # values 1..N in StructureSetROISequence order; the POINT-only ROI gets none
    assert names == {1: "liver", 2: "ring", 3: "overlap"}
    # square on DICOM columns 10..20, rows 5..15 → canonical i 19..29, j 14..24 (pixel centres on
    # the contour are inside: exactly 11 × 11 voxels per slice)
    liver = box(19, 29, 14, 24, 2, 3)
    overlap = box(14, 24, 14, 24, 2, 2)  # columns 15..25 on slice 2, written after liver
    assert voxels(labels, 3) == overlap
    assert voxels(labels, 1) == liver - overlap
    assert len(box(19, 29, 14, 24, 3, 3)) == 121
    # ring: outer columns 25..35 / rows 10..20, hole columns 28..32 / rows 13..17 (XOR)
    assert voxels(labels, 2) == box(4, 14, 9, 19, 5, 5) - box(7, 11, 12, 16, 5, 5)
    assert labels[9, 14, 5] == 0
    assert header_from_dataset(ds).referenced_series == uid
    assert header_from_dataset(ds).kind == "rtstruct"


def test_rtstruct_sagittal_contour_lies_on_first_axis(tmp_path):
    s = sagittal()
    vol = s.volume()
    ds = make_rtstruct(tmp_path / "rs.dcm", s, [(1, "cord", [contour(square(s, 3, 8, 2, 6, 4))])],
                       generate_uid())
    labels, names = rasterize_rtstruct(ds, vol)
    # slice 4 → i = 11 - 4; columns 3..8 → j = 23-8..23-3; rows 2..6 → k = 19-6..19-2
    assert voxels(labels, 1) == box(7, 7, 15, 20, 13, 17)
    assert names == {1: "cord"}


def test_rtstruct_errors(tmp_path):
    s = axial()
    vol = s.volume()
    off = make_rtstruct(tmp_path / "off.dcm", s, [(1, "far", [contour(square(s, 1, 5, 1, 5, 40))])],
                        generate_uid())
    with pytest.raises(IngestError) as err:
        rasterize_rtstruct(off, vol)
    assert err.value.reason == "label_mismatch"
    points = make_rtstruct(tmp_path / "pt.dcm", s,
                           [(1, "iso", [contour([s.lps(1, 1, 1)], kind="POINT")])], generate_uid())
    with pytest.raises(IngestError) as err:
        rasterize_rtstruct(points, vol)
    assert err.value.reason == "bad_label"
    # a contour oblique to the grid (spans slices 1..4) is not on any voxel slice
    oblique = [s.lps(2, 2, 1), s.lps(10, 2, 4), s.lps(10, 10, 4), s.lps(2, 10, 1)]
    tilted = make_rtstruct(tmp_path / "tilt.dcm", s, [(1, "t", [contour(oblique)])], generate_uid())
    with pytest.raises(IngestError) as err:
        rasterize_rtstruct(tilted, vol)
    assert err.value.reason == "label_mismatch"


def test_pydicom_bundled_rtstruct():
    ds = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    assert header_from_dataset(ds).kind == "rtstruct"
    assert header_from_dataset(ds).referenced_series == "1.2.826.0.1.3680043.8.498.2010020400001.2.1.1"
    small = Volume(array=np.zeros((8, 8, 4), np.float32), affine=np.eye(4), modality="CT")
    with pytest.raises(IngestError) as err:
        rasterize_rtstruct(ds, small)
    assert err.value.reason == "label_mismatch"


# ----------------------------------------------------------------------------- SEG


def test_seg_binary(tmp_path):
    s = axial()
    vol = s.volume()
    rng = np.random.default_rng(0)
    f = [(rng.random((30, 40)) < 0.3).astype(np.uint8) for _ in range(5)]
    frames = [(1, 1, f[0]), (2, 2, f[1]), (1, 2, f[2]), (2, 4, f[3]), (1, 7, f[4])]
    ds = make_seg(tmp_path / "seg.dcm", s, frames, {1: "liver", 2: "lesion"})
    assert ds.pixel_array.shape == (5, 30, 40)
    labels, names = read_dicom_seg(ds, vol)
    assert labels.dtype == np.int32 and labels.shape == vol.shape
    np.testing.assert_array_equal(labels, axial_expected(s, frames))
    assert names == {1: "liver", 2: "lesion"}
    # on slice 2 segment 2 overwrites segment 1
    both = (f[1].T[::-1, ::-1] == 1) & (f[2].T[::-1, ::-1] == 1)
    assert both.any() and np.all(labels[:, :, 2][both] == 2)
    assert header_from_dataset(ds).kind == "seg"
    assert header_from_dataset(ds).referenced_series == "1.2.3.4.5"


def test_seg_single_frame_and_absent_segment(tmp_path):
    s = axial()
    frame = np.zeros((30, 40), np.uint8)
    frame[3, 4] = 1
    ds = make_seg(tmp_path / "one.dcm", s, [(2, 6, frame)], {1: "unused", 2: "dot"})
    labels, names = read_dicom_seg(ds, s.volume())
    assert voxels(labels, 2) == {(35, 26, 6)}
    assert names == {2: "dot"}


def test_seg_fractional_sagittal(tmp_path):
    s = sagittal()
    vol = s.volume()
    f = np.zeros((20, 24), np.uint8)
    f[2, 3], f[2, 4], f[5, 6], f[7, 8] = 200, 128, 127, 100
    g = np.zeros((20, 24), np.uint8)
    g[0, 0] = 255
    ds = make_seg(tmp_path / "frac.dcm", s, [(1, 4, f), (3, 9, g)], {1: "cord", 3: "disc"},
                  kind="FRACTIONAL")
    labels, names = read_dicom_seg(ds, vol)
    # frame pixel (r, c) on slice s → (11 - s, 23 - c, 19 - r); ≥ 0.5 × 255 is inside
    assert voxels(labels, 1) == {(7, 20, 17), (7, 19, 17)}
    assert voxels(labels, 3) == {(2, 23, 19)}
    assert names == {1: "cord", 3: "disc"}


def test_seg_off_grid_and_outside(tmp_path):
    s = axial()
    vol = s.volume()
    frame = np.ones((30, 40), np.uint8)
    half = make_seg(tmp_path / "half.dcm", s, [(1, 3, frame)], {1: "x"}, shift=(0.4, 0.0, 0.0))
    with pytest.raises(IngestError) as err:
        read_dicom_seg(half, vol)
    assert err.value.reason == "label_mismatch"
    far = make_seg(tmp_path / "far.dcm", s, [(1, 3, frame)], {1: "x"}, shift=(0.0, 0.0, 500.0))
    with pytest.raises(IngestError) as err:
        read_dicom_seg(far, vol)
    assert err.value.reason == "label_mismatch"
    unknown = make_seg(tmp_path / "unk.dcm", s, [(5, 3, frame)], {1: "x"})
    with pytest.raises(IngestError) as err:
        read_dicom_seg(unknown, vol)
    assert err.value.reason == "bad_label"


def test_not_a_label_object():
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert header_from_dataset(ds).kind not in ("rtstruct", "seg")
    assert header_from_dataset(ds).referenced_series is None


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_non_canonical_orientation(tmp_path):
    s = axial()
    vol = s.volume()
    want = canonical_labels(s)
    # store in DICOM (L, P, S) order and then transpose to (S, P, L): columns of the affine follow
    lps_order = want[::-1, ::-1, :]
    flip = np.array([[-1, 0, 0, 39], [0, -1, 0, 29], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    affine = vol.affine @ flip
    assert np.allclose(affine, s.ras_affine())
    stored = np.transpose(lps_order, (2, 1, 0)).astype(np.int16)
    perm = np.eye(4)[:, [2, 1, 0, 3]]
    nib.save(nib.Nifti1Image(stored, affine @ perm), tmp_path / "lab.nii.gz")
    labels, names = read_nifti_labels(tmp_path / "lab.nii.gz", vol)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, want)
    assert names == {1: "label_1", 4: "label_4"}
    labels, names = read_nifti_labels(tmp_path / "lab.nii.gz", vol, names={1: "liver", 2: "x"})
    assert names == {1: "liver", 4: "label_4"}


def test_nifti_atlas_sized_ids(tmp_path):
    """A label value of 614 454 277 (an Allen CCF id) is read and named without an array sized
    by the value (np.bincount over it would take 4.9 GB)."""
    import tracemalloc

    s = axial()
    vol = s.volume()
    want = np.where(canonical_labels(s) == 4, 614_454_277, canonical_labels(s)).astype(np.int32)
    nib.save(nib.Nifti1Image(want, vol.affine), tmp_path / "atlas.nii.gz")
    tracemalloc.start()
    labels, names = read_nifti_labels(tmp_path / "atlas.nii.gz", vol, names={614_454_277: "VISp"})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(labels, want)
    assert names == {1: "label_1", 614_454_277: "VISp"}
    assert peak < 64 << 20, f"peak {peak} bytes"


def test_nifti_float_and_4d(tmp_path):
    s = axial()
    vol = s.volume()
    want = canonical_labels(s)
    img = nib.Nifti1Image(want.astype(np.float32)[..., None] + 1e-5, vol.affine)
    nib.save(img, tmp_path / "f.nii")
    labels, _ = read_nifti_labels(tmp_path / "f.nii", vol)
    np.testing.assert_array_equal(labels, want)
    nib.save(nib.Nifti1Image(want.astype(np.float32) * 0.5, vol.affine), tmp_path / "h.nii")
    with pytest.raises(IngestError) as err:
        read_nifti_labels(tmp_path / "h.nii", vol)
    assert err.value.reason == "bad_label"


def test_nifti_mismatch(tmp_path):
    s = axial()
    vol = s.volume()
    short = canonical_labels(s)[:, :, :9]
    nib.save(nib.Nifti1Image(short, vol.affine), tmp_path / "short.nii.gz")
    with pytest.raises(IngestError) as err:
        read_nifti_labels(tmp_path / "short.nii.gz", vol)
    assert err.value.reason == "label_mismatch"
    assert err.value.message == "label map shape differs from the image's"  # no shapes quoted
    moved = vol.affine.copy()
    moved[0, 3] += 1.0
    nib.save(nib.Nifti1Image(canonical_labels(s), moved), tmp_path / "moved.nii.gz")
    with pytest.raises(IngestError) as err:
        read_nifti_labels(tmp_path / "moved.nii.gz", vol)
    assert err.value.reason == "label_mismatch"
    nearly = vol.affine.copy()
    nearly[0, 3] += 5e-3  # within the 1e-2 mm translation tolerance
    nib.save(nib.Nifti1Image(canonical_labels(s), nearly), tmp_path / "near.nii.gz")
    labels, _ = read_nifti_labels(tmp_path / "near.nii.gz", vol)
    np.testing.assert_array_equal(labels, canonical_labels(s))


# ----------------------------------------------------------------------------- names JSON


@pytest.mark.parametrize(
    "doc, want",
    [
        ({"1": "liver", "2": "tumour"}, {1: "liver", 2: "tumour"}),
        ({"name": "Task03", "labels": {"0": "background", "1": "liver", "2": "cancer"}},
         {1: "liver", 2: "cancer"}),
        ({"labels": {"background": 0, "liver": 1, "tumour": 2, "whole": [1, 2]},
          "channel_names": {"0": "CT"}}, {1: "liver", 2: "tumour"}),
    ],
    ids=["plain", "msd", "nnunet_v2"],
)
def test_label_names_from_json(tmp_path, doc, want):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(doc))
    assert label_names_from_json(path) == want


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_label_names_bad_json(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(IngestError) as err:
        label_names_from_json(path)
    assert err.value.reason == "bad_label"
