"""read_volume against an independent converter (dicom2nifti) and across transfer syntaxes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from factories import ramp_volume, write_series
from pydicom.uid import (
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from pipeline.ingest.read import read_volume
from pipeline.ingest.volume import to_canonical

dicom2nifti = pytest.importorskip("dicom2nifti")


def _oracle(folder, tmp_path):
    """dicom2nifti's conversion of ``folder``, reoriented to closest canonical."""
    out = tmp_path / f"{folder.name}_oracle.nii.gz"
    dicom2nifti.convert_dicom.dicom_series_to_nifti(str(folder), str(out), reorient_nifti=True)
    img = nib.load(out)
    return to_canonical(np.asanyarray(img.dataobj).astype(np.float32), img.affine)


def _transcode(folder, syntax):
    for p in sorted(folder.iterdir()):
        ds = pydicom.dcmread(p)
        if syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(p, implicit_vr=True, little_endian=True, enforce_file_format=True)
        else:
            ds.compress(syntax)
            ds.save_as(p, enforce_file_format=True)


GEOMETRIES = {
    "axial": dict(iop=(1, 0, 0, 0, 1, 0), origin=(-10.0, -20.0, 30.0), step=2.5),
    "axial_oblique_origin": dict(iop=(1, 0, 0, 0, 1, 0), origin=(101.3, -7.25, -300.5), step=1.25),
    "coronal": dict(iop=(1, 0, 0, 0, 0, -1), origin=(-50.0, 10.0, 60.0), step=3.0),
    "sagittal": dict(iop=(0, 1, 0, 0, 0, -1), origin=(20.0, -60.0, 80.0), step=2.0),
}
SYNTAXES = [None, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless]


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: "explicit_le" if s is None else s.name)
def test_matches_dicom2nifti(tmp_path, deid, geometry, syntax):
    folder = tmp_path / "series"
    write_series(folder, ramp_volume((5, 40, 36), seed=2), spacing=(0.9, 0.6),
                 **GEOMETRIES[geometry])
    if syntax is not None:
        _transcode(folder, syntax)
    ours = read_volume(folder, deid)
    ref_array, ref_affine = _oracle(folder, tmp_path)
    assert ours.array.shape == ref_array.shape
    np.testing.assert_array_equal(ours.array, ref_array)
    np.testing.assert_allclose(ours.affine, ref_affine, atol=1e-3)


def test_phantom_series_matches_dicom2nifti(tmp_path, deid):
    from pipeline.phantoms.studies import make_phantoms

    make_phantoms(tmp_path / "ph", patients=1, seed=5)
    series = next(p for p in (tmp_path / "ph").rglob("CT_*") if p.is_dir())
    ours = read_volume(series, deid)
    ref_array, ref_affine = _oracle(series, tmp_path)
    np.testing.assert_array_equal(ours.array, ref_array)
    np.testing.assert_allclose(ours.affine, ref_affine, atol=1e-3)


MR_VARIANTS = ["MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm",
               "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
               "MR_small_padded.dcm"]


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_pydicom_mr_variants_decode_identically(deid, name):
    """The same MR slice in big endian, implicit VR and lossless compressed syntaxes."""
    from pydicom.data import get_testdata_file

    ref = read_volume(get_testdata_file("MR_small.dcm"), deid)
    other = read_volume(get_testdata_file(name), deid)
    np.testing.assert_array_equal(other.array, ref.array)
    np.testing.assert_allclose(other.affine, ref.affine, atol=1e-6)
