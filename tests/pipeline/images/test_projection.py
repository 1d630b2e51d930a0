"""2D projection images (CR, DX, MG, US, XA/RF single frames): read, window, orientation.

A projection image has no 3D geometry: it comes out as stored (PNG row r, column c = stored
row r, column c, resized only), windowed by its header's VOI (WindowCenter/Width or a VOI LUT
Sequence, carried through MONOCHROME1 inversion), else by percentiles; the volume meta says
``projection``, ``spacing_known``, ``view_position``, ``patient_orientation``.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.images.slicing import SliceConfig, cut_images
from pipeline.images.windows import HEADER_WINDOW, windows_for
from pipeline.ingest.read import ReadConfig, read_volume

SOP = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
       "MG": "1.2.840.10008.5.1.4.1.1.1.2", "US": "1.2.840.10008.5.1.4.1.1.6.1",
       "XA": "1.2.840.10008.5.1.4.1.1.12.1", "RF": "1.2.840.10008.5.1.4.1.1.12.2"}


def anatomy(rows: int = 300, cols: int = 200) -> np.ndarray:
    """(rows, cols) uint16 pattern, asymmetric in both axes, values 100..4000."""
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    out = 100 + (r * 7 + c * 3) % 3000
    out[10:40, 20:30] = 4000  # a bright block near the top left
    return out.astype(np.uint16)


def projection_ds(pixels: np.ndarray, modality: str = "CR", photometric: str = "MONOCHROME2",
                  **tags) -> Dataset:
    """One single-frame projection image without IOP/IPP; ``pixels`` (rows, cols) uint16 or
    (rows, cols, 3) uint8 RGB."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP[modality]
    sop = generate_uid(entropy_srcs=[modality, str(pixels.shape), photometric])
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SOP[modality], sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.9"
    ds.Modality, ds.StudyDate = modality, "20200102"
    ds.PatientName, ds.PatientID = "CANARYNAME^ALICE", "CANARYPID777"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BurnedInAnnotation = "NO"
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def save(ds: Dataset, folder, name: str = "img.dcm"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def png_pixels(img) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(img.png)))


def render(path, deid, **cfg) -> list:
    vol = read_volume(path, deid, ReadConfig(allow_burned_in=True))
    return vol, cut_images(vol, SliceConfig(every_k=1, **cfg))


@pytest.mark.parametrize("spacing", [None, "PixelSpacing", "ImagerPixelSpacing"])
def test_cr_monochrome1_non_square_comes_out_as_stored(tmp_path, deid, spacing):
    """300 rows × 200 cols MONOCHROME1: PNG (r, c) is stored (r, c), inverted; meta says
    projection and whether the spacing is known."""
    stored = anatomy()
    tags = {spacing: [0.2, 0.2]} if spacing else {}
    vol, images = render(save(projection_ds(stored, "CR", "MONOCHROME1", **tags), tmp_path),
                         deid, max_side=1024)
    assert vol.meta["projection"] is True
    assert vol.meta["spacing_known"] is (spacing is not None)
    assert len(images) == 1 and (images[0].height, images[0].width) == (300, 200)
    out = png_pixels(images[0]).astype(np.int64)
    # MONOCHROME1: the brightest stored block is the darkest displayed one, at the same place
    assert out[10:40, 20:30].max() == 0
    # monotone decreasing in the stored value at every pixel (orientation and inversion)
    order = np.argsort(stored.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) <= 0)


def test_resized_projection_keeps_stored_orientation(tmp_path, deid):
    stored = anatomy(600, 400)
    _, images = render(save(projection_ds(stored, "DX"), tmp_path), deid, max_side=300)
    out = png_pixels(images[0]).astype(np.int64)
    assert out.shape == (300, 200)
    # the stored image halved by area averaging, in place: grey level is monotone in it
    halved = stored.astype(np.float64).reshape(300, 2, 200, 2).mean(axis=(1, 3))
    order = np.argsort(halved.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)
    assert out[5:20, 10:15].min() == 255  # the bright block, top left


def test_dx_header_window_is_used(tmp_path, deid):
    stored = anatomy()
    path = save(projection_ds(stored, "DX", WindowCenter=[1100, 2000], WindowWidth=[1000, 50],
                              VOILUTFunction="LINEAR_EXACT"), tmp_path)
    vol, images = render(path, deid)
    assert (vol.meta["voi_source"], vol.meta["voi_function"]) == ("window", "LINEAR_EXACT")
    (spec,) = windows_for(vol)
    assert (spec.name, spec.vmin, spec.vmax) == (HEADER_WINDOW, 600.0, 1600.0)
    out = png_pixels(images[0]).astype(np.int64)
    expected = np.clip(np.floor((stored - 600.0) / 1000.0 * 255 + 0.5), 0, 255)
    assert np.array_equal(out, expected)


def test_linear_window_follows_the_standard(tmp_path, deid):
    path = save(projection_ds(anatomy(), "CR", WindowCenter=1100, WindowWidth=1001), tmp_path)
    vol, _ = render(path, deid)
    # PS3.3 C.11.2.1.2.1: c − 0.5 − (w − 1)/2 .. c − 0.5 + (w − 1)/2
    assert (vol.meta["voi_min"], vol.meta["voi_max"]) == (599.5, 1599.5)


@pytest.mark.parametrize("entries, first", [(1000, 600), (0, 0)])
def test_voi_lut_sequence_input_range(tmp_path, deid, entries, first):
    item = Dataset()
    item.LUTDescriptor = [entries, first, 12]
    item.LUTData = np.zeros(4, np.uint16).tobytes()
    path = save(projection_ds(anatomy(), "MG", VOILUTSequence=[item]), tmp_path)
    vol, images = render(path, deid)
    assert vol.meta["voi_source"] == "lut"
    assert (vol.meta["voi_min"], vol.meta["voi_max"]) == (first, first + (entries or 65536) - 1)
    assert images[0].window == HEADER_WINDOW


def test_monochrome1_and_monochrome2_with_matching_windows_give_the_same_png(tmp_path, deid):
    """The same anatomy stored as MONOCHROME2 (values v, window [a, b]) and as MONOCHROME1
    (values lo + hi − v, window [lo + hi − b, lo + hi − a]) looks the same."""
    v = anatomy()
    top = 2**12 - 1
    mono2 = projection_ds(v, "CR", "MONOCHROME2", WindowCenter=1500, WindowWidth=2000,
                          VOILUTFunction="LINEAR_EXACT")
    mono1 = projection_ds((top - v).astype(np.uint16), "CR", "MONOCHROME1",
                          WindowCenter=top - 1500, WindowWidth=2000,
                          VOILUTFunction="LINEAR_EXACT")
    _, (a,) = render(save(mono2, tmp_path / "m2"), deid)
    _, (b,) = render(save(mono1, tmp_path / "m1"), deid)
    assert a.window == b.window == HEADER_WINDOW
    assert np.array_equal(png_pixels(a), png_pixels(b))
    assert a.png == b.png


def test_without_a_header_window_the_percentiles_are_used(tmp_path, deid):
    vol, images = render(save(projection_ds(anatomy(), "CR"), tmp_path), deid)
    assert vol.meta["voi_source"] is None and images[0].window == "percentile"


def test_a_window_that_shows_nothing_falls_back_to_percentiles(tmp_path, deid):
    path = save(projection_ds(anatomy(), "CR", WindowCenter=60000, WindowWidth=10), tmp_path)
    _, images = render(path, deid)
    assert [i.window for i in images] == ["percentile"]


def test_us_rgb_single_frame_is_luminance_without_header_window(tmp_path, deid):
    rgb = np.zeros((120, 80, 3), np.uint8)
    rgb[..., 0] = np.arange(80)[None, :]
    rgb[..., 1] = np.arange(120)[:, None]
    rgb[5:15, 60:70] = 255
    path = save(projection_ds(rgb, "US", WindowCenter=10, WindowWidth=5), tmp_path)
    vol, images = render(path, deid)
    assert vol.meta["projection"] and vol.meta["color_to_luminance"]
    assert vol.meta["voi_source"] is None and images[0].window == "percentile"
    out = png_pixels(images[0])
    assert out.shape == (120, 80) and out[5:15, 60:70].min() == 255


def test_view_and_patient_orientation_are_kept_as_terms(tmp_path, deid):
    path = save(projection_ds(anatomy(), "DX", ViewPosition="PA", PatientOrientation=["L", "F"],
                              BodyPartExamined="CHEST"), tmp_path)
    vol, _ = render(path, deid)
    assert vol.meta["view_position"] == "PA"
    assert vol.meta["patient_orientation"] == ["L", "F"]
    assert vol.meta["body_part"] == "CHEST"


def test_series_with_geometry_is_not_a_projection(tmp_path, deid):
    from factories import ramp_volume, write_series

    paths = write_series(tmp_path / "ct", ramp_volume())
    vol = read_volume(paths, deid)
    assert vol.meta["projection"] is False and vol.meta["spacing_known"] is True


def test_real_ultrasound_files_read_as_projections(deid):
    """pydicom's own US test files (RGB; palette; multi-frame YBR): projection, luminance, as
    stored."""
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    for name in ("examples_rgb_color.dcm", "examples_palette.dcm", "examples_ybr_color.dcm"):
        path = get_testdata_file(name, download=False)
        assert path is not None, name
        ds = pydicom.dcmread(path)
        vol = read_volume(path, deid, ReadConfig(allow_burned_in=True))
        assert vol.meta["projection"] is True and vol.meta["modality"] == "US", name
        (img,) = cut_images(vol, SliceConfig(every_k=1))
        rgb = ds.pixel_array if ds.get("NumberOfFrames", 1) == 1 else ds.pixel_array[0]
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            rgb = apply_color_lut(rgb, ds)
        luma = (rgb.astype(np.float32) * np.float32([0.299, 0.587, 0.114])).sum(-1)
        out = png_pixels(img).astype(np.int64)
        scale = min(1.0, 512 / max(ds.Rows, ds.Columns))
        h, w = round(ds.Rows * scale), round(ds.Columns * scale)
        assert out.shape == (h, w), name
        if scale < 1:  # downscaled by area averaging, as the slicer does
            luma = cv2.resize(luma, (w, h), interpolation=cv2.INTER_AREA)
        order = np.argsort(luma.ravel(), kind="stable")
        assert np.all(np.diff(out.ravel()[order]) >= 0), name
