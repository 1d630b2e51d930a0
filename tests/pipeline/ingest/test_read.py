"""read_volume on DICOM series built in tmp_path: ordering, geometry checks, pixel handling."""

from __future__ import annotations

import random

import numpy as np
import pydicom
import pytest
from factories import ramp_volume, write_series

from pipeline.errors import IngestError
from pipeline.ingest.read import ReadConfig, read_volume


def _expected_ras(vol_zrc: np.ndarray) -> np.ndarray:
    """(Z, rows, cols) axial slices with IOP [1,0,0,0,1,0] → (X, Y, Z) RAS canonical."""
    # columns grow toward patient Left (RAS −x), rows toward Posterior (RAS −y)
    return vol_zrc.transpose(2, 1, 0)[::-1, ::-1, :].astype(np.float32)


def test_axial_series_values_and_affine(tmp_path, deid):
    v = ramp_volume()
    write_series(tmp_path / "s", v, origin=(-10.0, -20.0, 30.0), step=2.5, spacing=(0.8, 0.7))
    vol = read_volume(tmp_path / "s", deid)
    np.testing.assert_array_equal(vol.array, _expected_ras(v))
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))
    # voxel (X-1, Y-1, 0) is DICOM pixel (row 0, col 0) of the first slice: LPS (-10,-20,30)
    corner = vol.affine @ np.array([v.shape[2] - 1, v.shape[1] - 1, 0, 1.0])
    np.testing.assert_allclose(corner[:3], [10.0, 20.0, 30.0], atol=1e-6)
    assert vol.modality == "CT" and vol.meta["series_key"] != "1.2.3.4.5"


def test_shuffled_files_and_duplicate_instance_numbers(tmp_path, deid):
    v = ramp_volume((6, 16, 12))
    names = [f"{n:08x}.dcm" for n in random.Random(3).sample(range(10**6), 6)]
    paths = write_series(tmp_path / "s", v, names=names)
    for p in paths:  # every slice claims InstanceNumber 1: order must come from positions
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = 1
        ds.save_as(p)
    vol = read_volume(sorted(paths, key=lambda p: p.name), deid)
    np.testing.assert_array_equal(vol.array, _expected_ras(v))


def test_missing_slice(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((5, 8, 8)))
    paths[2].unlink()
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "s", deid)
    assert e.value.reason == "missing_slices"


def test_uneven_spacing(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((4, 8, 8)), step=2.0)
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = [-10.0, -20.0, 30.0 + 2.0 * 2 + 2.7]
    ds.save_as(paths[3])
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "s", deid)
    assert e.value.reason == "uneven_spacing"


def test_gantry_tilt_refused_when_configured(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((4, 8, 8)), step=2.0)
    for k, p in enumerate(paths):  # positions drift 0.5 mm in y per slice: a tilted gantry
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = [-10.0, -20.0 + 0.5 * k, 30.0 + 2.0 * k]
        ds.save_as(p)
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "s", deid, ReadConfig(refuse_gantry_tilt=True))
    assert e.value.reason == "gantry_tilt"
    # by default the stack is resampled (tests/pipeline/ingest/test_tilt.py checks where to)
    assert read_volume(tmp_path / "s", deid).meta["resampled"] == "gantry_tilt_linear"


def test_mixed_orientation(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((3, 8, 8)))
    ds = pydicom.dcmread(paths[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.999, 0.0447]
    ds.save_as(paths[1])
    with pytest.raises(IngestError) as e:
        read_volume(paths, deid)
    assert e.value.reason == "mixed_orientation"


def test_sagittal_series_is_canonical(tmp_path, deid):
    # IOP rows along +y (posterior), columns along -z (inferior); normal = +x LPS (patient left)
    v = ramp_volume((4, 10, 12))
    write_series(tmp_path / "s", v, iop=(0, 1, 0, 0, 0, -1), origin=(5.0, -30.0, 40.0), step=3.0)
    vol = read_volume(tmp_path / "s", deid)
    assert vol.shape == (4, 12, 10)
    m = vol.affine[:3, :3]
    assert np.all(np.diag(m) > 0) and np.allclose(m - np.diag(np.diag(m)), 0)
    # DICOM pixel (r=0, c=0) of slice 0 sits at LPS (5, -30, 40) = RAS (-5, 30, 40)
    ijk = np.linalg.inv(vol.affine) @ np.array([-5.0, 30.0, 40.0, 1.0])
    i, j, k = np.round(ijk[:3]).astype(int)
    assert vol.array[i, j, k] == v[0, 0, 0]


def test_monochrome1_inverted(tmp_path, deid):
    v = ramp_volume((2, 8, 8))
    write_series(tmp_path / "m2", v)
    write_series(tmp_path / "m1", v, PhotometricInterpretation="MONOCHROME1")
    a = read_volume(tmp_path / "m2", deid).array
    b = read_volume(tmp_path / "m1", deid).array
    lo, hi = -1024.0, 65535.0 - 1024.0  # stored range through the rescale
    np.testing.assert_allclose(b, lo + hi - a)


def test_truncated_file(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((3, 16, 16)))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 200])
    with pytest.raises(IngestError) as e:
        read_volume([paths[1]], deid)
    assert e.value.reason == "truncated" and str(paths[1]) in str(e.value)


def test_missing_pixel_data(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((1, 8, 8)))
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.save_as(paths[0])
    with pytest.raises(IngestError) as e:
        read_volume(paths, deid)
    assert e.value.reason == "no_pixel_data"


def test_decompression_bomb_header_refused_before_decoding(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((1, 8, 8)))
    ds = pydicom.dcmread(paths[0])
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    ds.save_as(paths[0])
    with pytest.raises(IngestError) as e:
        read_volume(paths, deid, ReadConfig())
    assert e.value.reason == "size_budget" and "budget" in e.value.problem


def test_burned_in_policy(tmp_path, deid):
    write_series(tmp_path / "s", ramp_volume((2, 8, 8)), BurnedInAnnotation="YES")
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "s", deid)
    assert e.value.reason == "burned_in_risk"
    assert read_volume(tmp_path / "s", deid, ReadConfig(allow_burned_in=True)).shape[2] == 2


def test_too_few_slices(tmp_path, deid):
    write_series(tmp_path / "s", ramp_volume((2, 8, 8)))
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "s", deid, ReadConfig(min_slices=3))
    assert e.value.reason == "too_few_slices"


def test_exact_duplicate_slices_are_merged(tmp_path, deid):
    v = ramp_volume((3, 8, 8))
    paths = write_series(tmp_path / "s", v)
    dup = tmp_path / "s" / "dup.dcm"
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(dup)
    vol = read_volume(tmp_path / "s", deid)
    assert vol.shape == (8, 8, 3)


def test_two_series_in_one_folder_is_refused_by_read_volume(tmp_path, deid):
    write_series(tmp_path / "s", ramp_volume((2, 8, 8)), series_uid="1.2.3.1")
    write_series(tmp_path / "s", ramp_volume((2, 8, 8)), series_uid="1.2.3.2",
                 names=["b0.dcm", "b1.dcm"], origin=(0, 0, 0))
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "s", deid)
    assert e.value.reason == "geometry" and "several image series" in e.value.problem


def _enhanced_from(paths, out, order):
    """An Enhanced CT object (per-frame functional groups) holding the slices in ``order``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    slices = [pydicom.dcmread(p) for p in paths]
    spacing, iop = list(slices[0].PixelSpacing), list(slices[0].ImageOrientationPatient)
    ipps = [list(s.ImagePositionPatient) for s in slices]
    ds = pydicom.dcmread(paths[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
               "RescaleIntercept", "RescaleSlope", "SliceThickness", "InstanceNumber"):
        delattr(ds, kw)
    shared, meas, ori, pvt = Dataset(), Dataset(), Dataset(), Dataset()
    meas.PixelSpacing, meas.SliceThickness = spacing, 2.0
    ori.ImageOrientationPatient = iop
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = -1024, 1, "HU"
    shared.PixelMeasuresSequence = Sequence([meas])
    shared.PlaneOrientationSequence = Sequence([ori])
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = ipps[k]
        item.PlanePositionSequence = Sequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.NumberOfFrames = len(order)
    ds.PixelData = b"".join(slices[k].PixelData for k in order)
    ds.InstanceNumber = 1
    ds.save_as(out, enforce_file_format=True)
    return out


def test_enhanced_multiframe_matches_classic(tmp_path, deid):
    v = ramp_volume((5, 12, 10))
    paths = write_series(tmp_path / "classic", v)
    classic = read_volume(tmp_path / "classic", deid)
    (tmp_path / "enh").mkdir()
    enhanced = read_volume(_enhanced_from(paths, tmp_path / "enh" / "e.dcm", [3, 0, 4, 1, 2]),
                           deid)
    np.testing.assert_array_equal(enhanced.array, classic.array)
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-6)


def test_excess_frames_are_quarantined(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((1, 8, 8)))
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 1
    ds.PixelData = ds.PixelData * 3  # three frames of data, one declared
    ds.save_as(paths[0])
    with pytest.raises(IngestError) as e:
        read_volume(paths, deid)
    assert e.value.reason == "excess_frames"


def test_missing_decoders_are_named():
    from pipeline.ingest.dicom_io import missing_decoders

    found = missing_decoders(["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90",
                              "1.2.840.10008.1.2.4.100"])
    assert found == {"1.2.840.10008.1.2.4.100": "MPEG2 Main Profile / Main Level"}


def test_cifti_is_skipped_not_crashed(deid):
    import nibabel as nib

    path = __import__("pathlib").Path(nib.__file__).parent / "tests" / "data" / "row_major.dconn.nii"
    with pytest.raises(IngestError) as e:
        read_volume(path, deid)
    assert e.value.reason == "not_a_volume"


@pytest.mark.parametrize("name", ["SC_rgb_small_odd.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "examples_palette.dcm"])
def test_colour_becomes_luminance(deid, name):
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(get_testdata_file(name))
    rgb = ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(rgb, ds)
    luma = (rgb.astype(np.float32) * np.array([0.299, 0.587, 0.114], np.float32)).sum(-1)
    vol = read_volume(get_testdata_file(name), deid, ReadConfig(allow_burned_in=True))
    assert vol.shape[2] == 1
    # (X, Y) of the canonical array is the display image transposed and flipped as LPS → RAS
    np.testing.assert_allclose(np.sort(vol.array.ravel()), np.sort(luma.ravel()), rtol=1e-5)
