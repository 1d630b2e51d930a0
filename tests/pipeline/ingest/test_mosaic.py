"""Siemens mosaics: read as volumes equal to nibabel's MosaicWrapper reading of the same files.

The oracle is ``nibabel.nicom.dicomwrappers.wrapper_from_file(path)``: ``get_data()`` is
(rows, cols, N) and ``affine`` maps (row, col, slice) to DICOM LPS mm; it is brought to our
frame (RAS+, closest canonical) here with ``nibabel.orientations`` alone. Real mosaics come from
nibabel's test data; generated ones carry a hand-written CSA2 header.
"""

from __future__ import annotations

import gzip
import math
import struct
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nibabel import orientations as ornt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pipeline.errors import IngestError
from pipeline.ingest.read import read_volume

with warnings.catch_warnings():  # nibabel.nicom warns on import that it is experimental
    warnings.simplefilter("ignore")
    from nibabel.nicom import dicomwrappers

NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nibabel_canonical(path) -> tuple[np.ndarray, np.ndarray]:
    """nibabel's (rows, cols, N) mosaic data and LPS affine → (X, Y, Z) RAS+ closest canonical."""
    w = dicomwrappers.wrapper_from_file(str(path))
    assert isinstance(w, dicomwrappers.MosaicWrapper)
    data = np.asarray(w.get_data(), dtype=np.float32)
    ras = LPS_TO_RAS @ w.affine
    transform = ornt.ornt_transform(ornt.io_orientation(ras), ornt.axcodes2ornt("RAS"))
    return (ornt.apply_orientation(data, transform),
            ras @ ornt.inv_ornt_aff(transform, data.shape))


def assert_same_volume(array, affine, ref_array, ref_affine):
    """Same shape and values; affines, and the RAS mm of the volume's corners, within 1e-3 mm."""
    assert array.shape == ref_array.shape
    np.testing.assert_array_equal(array, ref_array)
    np.testing.assert_allclose(affine, ref_affine, atol=1e-3)
    corners = np.array([[i, j, k, 1.0] for i in (0, array.shape[0] - 1)
                        for j in (0, array.shape[1] - 1) for k in (0, array.shape[2] - 1)])
    np.testing.assert_allclose(corners @ affine.T, corners @ ref_affine.T, atol=1e-3)


def _real_mosaic(name: str, out: Path, seed: int) -> Path:
    """A mosaic nibabel ships, its real header kept; nibabel zeroed its pixels to save space, so
    12-bit pixels are put back (seeded)."""
    ds = pydicom.dcmread(gzip.open(NICOM_DATA / name))
    pixels = np.random.default_rng(seed).integers(0, 4096, (ds.Rows, ds.Columns), np.uint16)
    ds.add_new(0x7FE00010, "OW", pixels.tobytes())
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)
    return out


def test_siemens_dwi_mosaics_match_nibabel(tmp_path, deid):
    """nibabel's two real DWI mosaic headers (b=0, b=1000; 48 slices of 128² in 7×7 tiles of
    896²): each file is a 3D volume, the two together one 4D volume in InstanceNumber order."""
    b0 = _real_mosaic("siemens_dwi_0.dcm.gz", tmp_path / "dwi" / "b0.dcm", 0)
    b1000 = _real_mosaic("siemens_dwi_1000.dcm.gz", tmp_path / "dwi" / "b1000.dcm", 1)
    refs = [nibabel_canonical(p) for p in (b0, b1000)]
    for path, (ref_array, ref_affine) in zip((b0, b1000), refs, strict=True):
        vol = read_volume(path, deid)
        assert vol.shape == (128, 128, 48)
        assert_same_volume(vol.array, vol.affine, ref_array, ref_affine)
    both = read_volume(tmp_path / "dwi", deid)
    assert both.shape == (128, 128, 48, 2)
    assert_same_volume(both.array, both.affine, np.stack([a for a, _ in refs], axis=-1),
                       refs[0][1])


def test_shipped_blank_mosaic_is_no_signal(tmp_path, deid):
    """As shipped (every pixel 0) the mosaic is de-tiled, then refused: no signal."""
    path = tmp_path / "b0.dcm"
    path.write_bytes(gzip.decompress((NICOM_DATA / "siemens_dwi_0.dcm.gz").read_bytes()))
    with pytest.raises(IngestError) as e:
        read_volume(path, deid)
    assert e.value.reason == "no_signal"


def test_oblique_mosaic_with_reversed_csa_normal_matches_nibabel(tmp_path, deid):
    """csa_slice_norm.dcm: a real oblique mosaic header (32 slices of 64², 6×6 tiles) whose CSA
    SliceNormalVector points against col × row; nibabel ships it without pixels, so pixels are
    added here."""
    ds = pydicom.dcmread(NICOM_DATA / "csa_slice_norm.dcm")
    pixels = np.random.default_rng(1).integers(0, 4096, (384, 384), np.uint16)
    ds.add_new(0x7FE00010, "OW", pixels.tobytes())
    path = tmp_path / "oblique.dcm"
    ds.save_as(path)
    vol = read_volume(path, deid)
    assert sorted(vol.shape) == [32, 64, 64]
    assert_same_volume(vol.array, vol.affine, *nibabel_canonical(path))


def test_mosaic_whose_tiles_do_not_divide_the_image_is_refused(deid):
    """0.dcm claims 48 slices (7×7 tiles) in a 256² image: nibabel cannot reshape it either."""
    with pytest.raises(IngestError) as e:
        read_volume(NICOM_DATA / "0.dcm", deid)
    assert e.value.reason == "geometry"


def test_mosaic_without_pixels_is_no_pixel_data(deid):
    with pytest.raises(IngestError) as e:
        read_volume(NICOM_DATA / "csa_slice_norm.dcm", deid)
    assert e.value.reason == "no_pixel_data"


# -- generated mosaics: a CSA2 header written by hand ------------------------------------------

def _csa_item(text: str) -> bytes:
    data = text.encode() + b"\0"
    pad = b"\0" * (-len(data) % 4)
    return struct.pack("<4i", len(data), len(data), 77, len(data)) + data + pad


def csa2_header(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA2 ("SV10") header: name → (VR, item strings)."""
    out = b"SV10" + b"\4\3\2\1" + struct.pack("<2I", len(tags), 77)
    for name, (vr, items) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(items), vr.encode(), 0, len(items), 77)
        out += b"".join(_csa_item(v) for v in items)
    return out


def _ds(values) -> list[str]:
    return [f"{v:.8f}" for v in values]


def write_mosaic(path: Path, tiles: np.ndarray, iop, ipp, spacing, step: float,
                 csa_normal=None, instance: int = 1, n_in_csa: int | None = None,
                 image_type=("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC")) -> Path:
    """A Siemens MR mosaic of ``tiles`` (N, r, c) uint16: tile k at (k // m, k % m)."""
    n, r, c = tiles.shape
    m = math.ceil(math.sqrt(n))
    image = np.zeros((m * r, m * c), np.uint16)
    for k in range(n):
        image[(k // m) * r:(k // m + 1) * r, (k % m) * c:(k % m + 1) * c] = tiles[k]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality, ds.Manufacturer = MRImageStorage, "MR", "SIEMENS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.InstanceNumber, ds.BurnedInAnnotation = instance, "NO"
    ds.ImageType = list(image_type)
    ds.ImageOrientationPatient = _ds(iop)
    ds.ImagePositionPatient = _ds(ipp)
    ds.PixelSpacing = _ds(spacing)
    ds.SpacingBetweenSlices, ds.SliceThickness = f"{step:.6f}", f"{step:.6f}"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = image.tobytes()
    tags = {"NumberOfImagesInMosaic": ("US", [str(n if n_in_csa is None else n_in_csa)]),
            "AcquisitionMatrixText": ("SH", [f"{r}p*{c}"])}
    if csa_normal is not None:
        tags["SliceNormalVector"] = ("FD", _ds(csa_normal))
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    block.add_new(0x10, "OB", csa2_header(tags))
    ds.save_as(path, enforce_file_format=True)
    return path


def rotation(a: float, b: float, c: float) -> np.ndarray:
    """A rotation matrix from three Euler angles (radians)."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


angles = st.floats(-math.pi, math.pi, allow_nan=False)
lengths = st.floats(0.3, 5.0).map(lambda v: round(v, 4))
coords = st.floats(-400.0, 400.0).map(lambda v: round(v, 3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), r=st.integers(2, 9), c=st.integers(2, 9),
       euler=st.tuples(angles, angles, angles), csa_along_cross=st.booleans(),
       spacing=st.tuples(lengths, lengths), step=lengths,
       ipp=st.tuples(coords, coords, coords), seed=st.integers(0, 2**16))
def test_generated_mosaics_match_nibabel(n, r, c, euler, csa_along_cross, spacing, step, ipp,
                                         seed):
    """Any N, tile size, orientation, CSA normal sign, spacing and position: same volume."""
    from pipeline.ingest.deid import Deidentifier

    rot = np.round(rotation(*euler), 8)
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(col_dir, row_dir) * (1 if csa_along_cross else -1)
    tiles = np.random.default_rng(seed).integers(0, 4096, (n, r, c), np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_mosaic(Path(tmp) / "m.dcm", tiles, [*row_dir, *col_dir], ipp, spacing,
                            step, normal)
        vol = read_volume(path, Deidentifier(b"k" * 32))
        assert_same_volume(vol.array, vol.affine, *nibabel_canonical(path))


def test_generated_time_series_is_four_d(tmp_path, deid):
    """Three mosaics of one series (time points): a T axis in InstanceNumber order."""
    rng = np.random.default_rng(4)
    iop, ipp = [1, 0, 0, 0, 1, 0], [-100.0, -90.0, 20.0]
    folder = tmp_path / "fmri"
    folder.mkdir()
    refs = []
    for t in (3, 1, 2):
        path = write_mosaic(folder / f"t{t}.dcm", rng.integers(0, 4096, (10, 6, 5), np.uint16),
                            iop, ipp, (2.0, 2.5), 3.0, [0, 0, 1], instance=t)
        refs.append((t, nibabel_canonical(path)))
    vol = read_volume(folder, deid)
    refs.sort(key=lambda x: x[0])
    assert_same_volume(vol.array, vol.affine, np.stack([a for _, (a, _) in refs], axis=-1),
                       refs[0][1][1])


@pytest.mark.parametrize("case", ["marked_without_csa_count", "too_many_slices_for_tiles",
                                  "csa_normal_not_parallel"])
def test_inconsistent_mosaics_are_refused_with_geometry(tmp_path, deid, case):
    tiles = np.ones((4, 6, 6), np.uint16) * np.arange(4, dtype=np.uint16)[:, None, None]
    kw = dict(iop=[1, 0, 0, 0, 1, 0], ipp=[0, 0, 0], spacing=(1.0, 1.0), step=2.0,
              csa_normal=[0, 0, 1])
    if case == "marked_without_csa_count":
        kw["n_in_csa"] = 0
    elif case == "too_many_slices_for_tiles":
        kw["n_in_csa"] = 17  # 5×5 tiles do not divide the 12×12 image
    else:
        kw["csa_normal"] = [0, 0.6, 0.8]
    path = write_mosaic(tmp_path / "m.dcm", tiles, **kw)
    with pytest.raises(IngestError) as e:
        read_volume(path, deid)
    assert e.value.reason == "geometry"
