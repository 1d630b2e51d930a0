"""Header values are validated where they are parsed: a bad value is a reason code, never a
wrong image, a crash, or a message that quotes it.

Generators (hypothesis) cover the value space of each field: text, NaN, ±Inf, overflowing
exponents, zero and negative lengths, non-orthonormal orientations, scale factors that overflow
the float32 the pixels land in. Text values carry a CANARY that must not appear in the error.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from factories import ramp_volume, write_series
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement

from pipeline.errors import IngestError
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.dicom_io import INVALID_UID, missing_decoders
from pipeline.ingest.dicom_values import as_float, is_uid, parse_orientation
from pipeline.ingest.read import read_volume

DEID = Deidentifier(b"test-key-not-secret-0123456789")
SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# DS/IS strings (≤ 16 characters) that are not finite numbers
texts = st.text(st.sampled_from("ABCXYZ^_ -+.,e"), min_size=0, max_size=9).map(
    lambda s: "CANARY" + s)
non_numbers = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e999", "1.5.2", "--1"]),
    texts)
non_positive = st.one_of(st.sampled_from(["0", "-0", "0.0"]),
                         st.floats(-1e6, -1e-6).map(lambda v: f"{v:.6g}"))


def set_raw(ds, keyword: str, text: str) -> None:
    """Put ``text`` into ``keyword`` as its raw bytes (pydicom refuses invalid DS on assignment)."""
    tag = pydicom.tag.Tag(tag_for_keyword(keyword))
    raw = text.encode("latin-1")
    raw += b" " * (len(raw) % 2)
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def series_with(folder: Path, raw: dict[str, str], volume=None) -> Path:
    """A 3-slice CT series (tests/factories.py) with ``raw`` element texts in every slice."""
    paths = write_series(folder, ramp_volume((3, 8, 8)) if volume is None else volume)
    for p in paths:
        ds = pydicom.dcmread(p)
        for keyword, text in raw.items():
            set_raw(ds, keyword, text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(p)
    return folder


def refused(raw: dict[str, str], volume=None) -> IngestError:
    """The IngestError reading a series with ``raw`` values raises (anything else fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = series_with(Path(tmp) / "s", raw, volume)
        with pytest.raises(IngestError) as e:
            read_volume(folder, DEID)
    assert "CANARY" not in str(e.value) and "CANARY" not in e.value.problem
    return e.value


# -- rescale: bad_scaling ------------------------------------------------------------------------

@SETTINGS
@given(keyword=st.sampled_from(["RescaleSlope", "RescaleIntercept"]), value=non_numbers)
def test_non_finite_rescale_is_bad_scaling(keyword, value):
    assert refused({keyword: value}).reason == "bad_scaling"


@SETTINGS
@given(slope=st.floats(1e36, 1e300), sign=st.sampled_from([1, -1]))
def test_rescale_overflowing_float32_is_bad_scaling(slope, sign):
    """Stored values ≥ 1024 (HU + 1024) times a slope ≥ 1e36 do not fit in float32."""
    assert refused({"RescaleSlope": f"{sign * slope:.6e}"}).reason == "bad_scaling"


@SETTINGS
@given(intercept=st.floats(3.5e38, 1e300), sign=st.sampled_from([1, -1]))
def test_intercept_overflowing_float32_is_bad_scaling(intercept, sign):
    assert refused({"RescaleIntercept": f"{sign * intercept:.6e}"}).reason == "bad_scaling"


@SETTINGS
@given(slope=st.one_of(st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3)),
       intercept=st.floats(-1e4, 1e4))
def test_valid_rescale_is_applied(slope, intercept):
    s, i = f"{slope:.6g}", f"{intercept:.6g}"
    volume = ramp_volume((3, 8, 8))
    with tempfile.TemporaryDirectory() as tmp:
        base = read_volume(series_with(Path(tmp) / "a", {}, volume), DEID).array
        vol = read_volume(series_with(Path(tmp) / "b", {"RescaleSlope": s,
                                                         "RescaleIntercept": i}, volume), DEID)
    stored = base.astype(np.float64) + 1024  # factories store HU + 1024 with intercept −1024
    np.testing.assert_array_equal(vol.array, (stored * float(s) + float(i)).astype(np.float32))


# -- geometry ------------------------------------------------------------------------------------

@SETTINGS
@given(value=st.one_of(non_numbers, non_positive))
def test_bad_slice_thickness_is_geometry(value):
    assert refused({"SliceThickness": value}).reason == "geometry"


@SETTINGS
@given(bad=st.one_of(non_numbers, non_positive), which=st.integers(0, 1))
def test_bad_pixel_spacing_is_geometry(bad, which):
    values = ["0.8", "0.7"]
    values[which] = bad
    assert refused({"PixelSpacing": "\\".join(values)}).reason == "geometry"


def test_pixel_spacing_with_one_value_is_geometry():
    assert refused({"PixelSpacing": "0.8"}).reason == "geometry"


@SETTINGS
@given(bad=non_numbers, which=st.integers(0, 2), slices=st.sampled_from([1, 3]))
def test_non_finite_position_is_geometry(bad, which, slices):
    """Also for a single slice, which without a position would read as a nominal grid."""
    values = ["-10", "-20", "30"]
    values[which] = bad
    error = refused({"ImagePositionPatient": "\\".join(values)}, ramp_volume((slices, 8, 8)))
    assert error.reason == "geometry"


unit = st.floats(-2.0, 2.0)


@SETTINGS
@given(iop=st.tuples(unit, unit, unit, unit, unit, unit))
@example(iop=(2.0, 0.0, 0.0, 0.866025, 0.5, 0.0))  # |row × col| = 1, yet neither unit nor ⟂
def test_non_orthonormal_orientation_is_geometry(iop):
    row, col = np.array(iop[:3]), np.array(iop[3:])
    assume(abs(np.linalg.norm(row) - 1) > 2e-3 or abs(np.linalg.norm(col) - 1) > 2e-3
           or abs(row @ col) > 2e-3)
    text = "\\".join(f"{v:.6f}" for v in iop)
    assert refused({"ImageOrientationPatient": text}).reason == "geometry"


@SETTINGS
@given(bad=non_numbers, which=st.integers(0, 5))
def test_non_numeric_orientation_is_geometry(bad, which):
    values = ["1", "0", "0", "0", "1", "0"]
    values[which] = bad
    assert refused({"ImageOrientationPatient": "\\".join(values)}).reason == "geometry"


@SETTINGS
@given(a=st.floats(-np.pi, np.pi), b=st.floats(-np.pi, np.pi))
def test_orthonormal_orientations_are_accepted(a, b):
    """Any rotation of the axial orientation, written with 6 decimals, passes."""
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    iop = [float(f"{v:.6f}") for v in (*row, *col)]
    assert parse_orientation(iop, None) == tuple(iop)


# -- no signal -----------------------------------------------------------------------------------

@pytest.mark.parametrize("hu", [-1024, 0, 40])
def test_constant_dicom_series_is_no_signal(hu):
    assert refused({}, np.full((3, 8, 8), hu, np.int16)).reason == "no_signal"


def test_zero_slope_is_no_signal():
    assert refused({"RescaleSlope": "0"}).reason == "no_signal"


def _nifti(path: Path, data, slope=None, inter=None) -> Path:
    """An uncompressed NIfTI-1 file; ``slope``/``inter`` are written into the header's bytes
    (scl_slope at offset 112, scl_inter at 116, float32), past nibabel's own choices."""
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    if slope is not None or inter is not None:
        raw = bytearray(path.read_bytes())
        raw[112:120] = np.array([slope, inter], dtype="<f4").tobytes()
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("data", [np.zeros((6, 6, 3), np.int16),
                                  np.full((6, 6, 3), 7.5, np.float32),
                                  np.full((6, 6, 3), np.nan, np.float32),
                                  np.full((6, 6, 3), np.inf, np.float32)],
                         ids=["zeros", "constant", "all_nan", "all_inf"])
def test_nifti_without_signal_is_no_signal(tmp_path, deid, data):
    with pytest.raises(IngestError) as e:
        read_volume(_nifti(tmp_path / "x.nii", data), deid)
    assert e.value.reason == "no_signal"


def test_nifti_with_some_nan_but_signal_is_read(tmp_path, deid):
    data = np.arange(108, dtype=np.float32).reshape(6, 6, 3)
    data[0, 0, 0] = np.nan
    assert read_volume(_nifti(tmp_path / "x.nii", data), deid).shape == (6, 6, 3)


# -- NIfTI scaling -------------------------------------------------------------------------------

@pytest.mark.parametrize("slope,inter", [(np.inf, 0.0), (-np.inf, 0.0), (1.0, np.inf),
                                         (2.0, np.nan), (1e38, 0.0)],
                         ids=["slope_inf", "slope_-inf", "inter_inf", "inter_nan", "overflow"])
def test_nifti_bad_scaling(tmp_path, deid, slope, inter):
    data = np.arange(108, dtype=np.int16).reshape(6, 6, 3)
    with pytest.raises(IngestError) as e:
        read_volume(_nifti(tmp_path / "x.nii", data, slope, inter), deid)
    assert e.value.reason == "bad_scaling"


def test_nifti_float64_values_overflowing_float32_are_bad_scaling(tmp_path, deid):
    data = np.arange(108, dtype=np.float64).reshape(6, 6, 3) * 1e300
    with pytest.raises(IngestError) as e:
        read_volume(_nifti(tmp_path / "x.nii", data), deid)
    assert e.value.reason == "bad_scaling"


@pytest.mark.parametrize("slope", [np.nan, 0.0], ids=["nan_is_unset", "zero_is_unset"])
def test_nifti_unset_slope_means_no_scaling(tmp_path, deid, slope):
    """nibabel writes scl_slope = NaN for "no scaling" (every file it saves); 0 is the
    standard's "no scaling": both read the stored values."""
    data = np.arange(108, dtype=np.int16).reshape(6, 6, 3)
    vol = read_volume(_nifti(tmp_path / "x.nii", data, slope, 5.0), deid)
    np.testing.assert_array_equal(np.sort(vol.array.ravel()), np.arange(108))


# -- UIDs ----------------------------------------------------------------------------------------

def test_missing_decoders_never_quotes_a_text_transfer_syntax():
    found = missing_decoders(["CANARY^PATIENT^NAME", "1.2.840.10008.1.2.1 ", "1.2.840.10008.1.2.1",
                              "1.2.840.10008.1.2.4.100", "1.02.3"])
    assert found == {INVALID_UID: "not a valid transfer syntax UID",
                     "1.2.840.10008.1.2.4.100": "MPEG2 Main Profile / Main Level"}


uid_like = st.from_regex(r"[0-3](\.[0-9]{1,6}){0,8}", fullmatch=True)  # some are not UIDs


@SETTINGS
@given(values=st.lists(st.one_of(st.text(max_size=60).map(lambda s: "CANARY" + s), uid_like)))
def test_missing_decoders_keys_are_uids(values):
    """Keys are UIDs from the run or INVALID_UID; no text value reaches the manifest."""
    found = missing_decoders(values)
    assert all(k == INVALID_UID or (is_uid(k) and k in values) for k in found)
    assert "CANARY" not in json.dumps(found)
    assert (INVALID_UID in found) == any(v and not is_uid(v) for v in values)


@given(st.one_of(st.text(), st.binary(), st.floats(), st.integers(), st.none(),
                 st.lists(st.text(), max_size=3)))
def test_as_float_is_total(value):
    """Any value: a finite float or None, never an exception (which would quote the value)."""
    out = as_float(value)
    assert out is None or np.isfinite(out)


def test_is_uid():
    assert is_uid("1.2.840.10008.1.2.1") and is_uid("0") and is_uid("2.25.0")
    for bad in ("", "1.02", "3.1", "1..2", "1.2.", "CANARY", "1.2.3 ", "1." + "1" * 63, None):
        assert not is_uid(bad)


# -- SOP classes: non-image objects are never images ----------------------------------------------

RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"
NON_IMAGE = {"raw_data": RAW_DATA,
             "presentation_state": "1.2.840.10008.5.1.4.1.1.11.1",
             "basic_text_sr": "1.2.840.10008.5.1.4.1.1.88.11",
             "key_object_selection": "1.2.840.10008.5.1.4.1.1.88.59",
             "spatial_registration": "1.2.840.10008.5.1.4.1.1.66.1",
             "mr_spectroscopy": "1.2.840.10008.5.1.4.1.1.4.2",
             "encapsulated_pdf": "1.2.840.10008.5.1.4.1.1.104.1",
             "ecg_waveform": "1.2.840.10008.5.1.4.1.1.9.1.1",
             "rt_plan": "1.2.840.10008.5.1.4.1.1.481.5"}


def non_image(path: Path, sop_class: str, series_uid="1.2.3.4.5", with_pixels=False) -> Path:
    """A non-image object of ``sop_class`` in the series' study; ``with_pixels`` gives it Rows,
    Columns and a PixelData payload (vendors put raw k-space or private blobs there)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3.4", series_uid, "CT"
    ds.PatientName, ds.InstanceNumber = "CANARY^RAW", 99
    block = ds.private_block(0x0019, "CANARY VENDOR RAW", create=True)
    block.add_new(0x10, "OB", b"\x01\x02" * 64)
    if with_pixels:
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 16, 16, 15
        ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.add_new(0x7FE00010, "OW", np.arange(64, dtype=np.uint16).tobytes())
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("with_pixels", [False, True], ids=["plain", "with_rows_and_pixels"])
def test_folder_with_non_image_objects_reads_the_image_series(tmp_path, deid, with_pixels):
    """A CT series plus raw data, a presentation state, reports, ... in one folder (Philips
    exports put the raw data object next to the images): the images are read, the rest left."""
    v = ramp_volume((3, 8, 8))
    write_series(tmp_path / "s", v)
    alone = read_volume(tmp_path / "s", deid)
    for name, sop in NON_IMAGE.items():
        non_image(tmp_path / "s" / f"{name}.dcm", sop, with_pixels=with_pixels)
    vol = read_volume(tmp_path / "s", deid)
    np.testing.assert_array_equal(vol.array, alone.array)
    assert vol.meta["n_files"] == 3


def test_non_image_object_given_by_name_is_unsupported_sop(tmp_path, deid):
    paths = write_series(tmp_path / "s", ramp_volume((2, 8, 8)))
    raw = non_image(tmp_path / "s" / "raw.dcm", RAW_DATA)
    with pytest.raises(IngestError) as e:
        read_volume([*paths, raw], deid)
    assert e.value.reason == "unsupported_sop" and "CANARY" not in str(e.value)
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "s" / "raw.dcm", deid)
    assert e.value.reason == "unsupported_sop"


def test_folder_of_only_non_image_objects_is_unsupported_sop(tmp_path, deid):
    (tmp_path / "s").mkdir()
    non_image(tmp_path / "s" / "raw.dcm", RAW_DATA)
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "s", deid)
    assert e.value.reason == "unsupported_sop"


def test_discovery_skips_non_image_objects_as_unsupported_sop(tmp_path):
    from pipeline.ingest.discover import scan_headers, walk

    write_series(tmp_path / "s", ramp_volume((2, 8, 8)))
    for name, sop in NON_IMAGE.items():
        non_image(tmp_path / "s" / f"{name}.dcm", sop, with_pixels=name == "raw_data")
    entries = scan_headers(walk([tmp_path], DEID))
    got = {e.path.stem: (e.status, e.reason) for e in entries}
    for name in NON_IMAGE:
        assert got[name] == ("skipped", "unsupported_sop"), name
    assert sum(1 for e in entries if e.header is not None and e.header.kind == "image") == 2


sop_texts = st.one_of(texts, st.sampled_from(["", "1.2.3", "1.3.12.2.1107.5.9.1"]))


@SETTINGS
@given(sop=st.one_of(st.sampled_from(sorted(NON_IMAGE.values())), sop_texts),
       pixels=st.booleans(), rows=st.integers(0, 4))
def test_classify(sop, pixels, rows):
    """Known non-image classes are never images; a class off both lists (private, unknown, not
    a UID) is an image only with pixel data and Rows/Columns; image classes always are."""
    from pydicom.dataset import Dataset

    from pipeline.ingest.dicom_io import classify

    ds = Dataset()
    ds.Rows = ds.Columns = rows
    if pixels:
        ds.PixelData = b"\0\0" * max(1, rows * rows)
    kind = classify(sop, ds)
    if sop in NON_IMAGE.values():
        assert kind == "other"
    else:
        assert kind == ("image" if pixels and rows > 0 else "other")
    assert classify("1.2.840.10008.5.1.4.1.1.2", Dataset()) == "image"  # CT, even without pixels
