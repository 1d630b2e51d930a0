"""read_volume on NIfTI: nibabel's and nilearn's shipped files, scaling, 4D, bad affines."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import IngestError
from pipeline.ingest.read import read_volume

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
NILEARN_DATA = Path(__import__("nilearn").__file__).parent / "datasets" / "data"


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz",
                                  "standard.nii.gz", "functional.nii"])
def test_nibabel_files_are_canonical(deid, name):
    path = NIB_DATA / name
    vol = read_volume(path, deid)
    ref = nib.as_closest_canonical(nib.load(path))
    assert vol.array.shape == ref.shape
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
    np.testing.assert_allclose(vol.array, np.asarray(ref.dataobj, dtype=np.float32), rtol=1e-6)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")


def test_four_d_keeps_time_axis(deid):
    vol = read_volume(NIB_DATA / "example4d.nii.gz", deid)
    assert vol.array.ndim == 4 and vol.array.shape[3] == nib.load(NIB_DATA / "example4d.nii.gz").shape[3]


def test_mni_template_is_mr_in_ras(deid):
    vol = read_volume(NILEARN_DATA / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", deid)
    assert vol.modality == "MR" and vol.meta["modality_source"] == "heuristic"
    assert vol.array.ndim == 3 and min(vol.spacing) > 0.9
    centre = vol.affine @ np.array([*(np.array(vol.shape) - 1) / 2, 1.0])
    assert np.all(np.abs(centre[:3]) < 40)  # MNI space is centred near the origin


def test_scaling_applied(tmp_path, deid):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, -10.0)
    nib.save(img, tmp_path / "s.nii.gz")
    vol = read_volume(tmp_path / "s.nii.gz", deid)
    np.testing.assert_allclose(vol.array, data * 0.5 - 10.0)


def test_ct_heuristic_and_header_text_dropped(tmp_path, deid):
    data = np.full((8, 8, 4), -1000, np.int16)
    data[2:6, 2:6] = 40
    img = nib.Nifti1Image(data, np.eye(4))
    img.header["descrip"] = b"CANARY_DESCRIP patient Smith"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"CANARY_EXTENSION"))
    nib.save(img, tmp_path / "ct.nii.gz")
    vol = read_volume(tmp_path / "ct.nii.gz", deid)
    assert vol.modality == "CT"
    assert "CANARY" not in repr(vol.meta)


@pytest.mark.parametrize("affine,what", [
    (np.diag([1.0, 1.0, 1e-9, 1.0]), "singular"),
    (np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "sheared"),
])
def test_bad_affines_rejected(tmp_path, deid, affine, what):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine)
    img.set_qform(None, code=0)
    img.set_sform(affine, code=2)
    nib.save(img, tmp_path / "bad.nii")
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "bad.nii", deid)
    assert e.value.reason == "bad_affine" and what in e.value.problem
    assert "bad.nii" in str(e.value)


def test_truncated_nifti(tmp_path, deid):
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), tmp_path / "t.nii")
    data = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(data[:-4000])
    with pytest.raises(IngestError) as e:
        read_volume(tmp_path / "t.nii", deid)
    assert e.value.reason in ("truncated", "unreadable")
