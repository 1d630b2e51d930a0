"""Tests of the synthetic CT phantom generator (pipeline.phantoms.studies, workflows.make_phantoms)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dicom2nifti
import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipeline.phantoms.anatomy import LESION_HOSTS, build_phantom, sample_spec
from pipeline.phantoms.studies import (
    LABELS,
    make_phantoms,
    patient_identity,
    phi_strings,
    ras_slice_to_pixels,
    slice_position_lps,
)
from workflows.make_phantoms import main

SEED, N = 0, 3  # patient index 2 has shuffled hex file names


def _series(folder: Path) -> Path:
    (series,) = [p for p in folder.iterdir() if p.is_dir()]
    return series


def _sidecar(series: Path, suffix: str) -> Path:
    return series.with_name(series.name + suffix)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _labels_canonical(series: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(_sidecar(series, "_seg.nii.gz")))
    return np.asarray(img.dataobj), img.affine


def _centroid_ras(labels: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (affine @ [*np.argwhere(mask).mean(axis=0), 1.0])[:3]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(out, patients=N, seed=SEED)
    return out


@pytest.fixture(scope="module")
def folders(collection) -> list[Path]:
    by_index = {}
    for folder in collection.iterdir():
        truth = json.loads(_sidecar(_series(folder), "_truth.json").read_text())
        by_index[truth["patient_index"]] = folder
    assert sorted(by_index) == list(range(N))
    return [by_index[i] for i in range(N)]


def test_layout_and_sidecars(folders):
    for i, folder in enumerate(folders):
        who = patient_identity(SEED, i)
        assert folder.name == who.folder == f"{who.name}_{who.patient_id}"
        series = _series(folder)
        assert series.name == f"CT_{who.series_number}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [
                series.name,
                f"{series.name}_seg.nii.gz",
                f"{series.name}_seg.json",
                f"{series.name}_truth.json",
            ]
        )
        truth = json.loads(_sidecar(series, "_truth.json").read_text())
        files = sorted(series.glob("*.dcm"))
        assert len(files) == truth["shape"][2] and 40 <= len(files) <= 64
        names = json.loads(_sidecar(series, "_seg.json").read_text())
        labels, _ = _labels_canonical(series)
        assert {int(k) for k in names} == {int(v) for v in np.unique(labels) if v}
        assert all(LABELS[int(k)] == v for k, v in names.items())
        assert truth["organs"] == {LABELS[v]: v for v in range(1, 10)}
        sequential = all(p.name.startswith("IM-") for p in files)
        assert sequential == (i % 3 != 2)
    assert LABELS[10] == "lung_nodule" and LABELS[12] == "kidney_mass" and len(LABELS) == 12


def test_same_seed_is_byte_identical_and_other_seed_differs(collection, tmp_path):
    again = tmp_path / "again"
    make_phantoms(again, patients=N, seed=SEED)
    assert _hashes(again) == _hashes(collection)
    other = tmp_path / "other"
    make_phantoms(other, patients=1, seed=SEED + 1)
    assert not set(_hashes(other).values()) & set(_hashes(collection).values())


def test_dicom_headers_and_pixel_encoding(folders):
    for folder in folders:
        series = _series(folder)
        truth = json.loads(_sidecar(series, "_truth.json").read_text())
        dss = [pydicom.dcmread(p) for p in series.glob("*.dcm")]
        for p in list(series.glob("*.dcm"))[:2]:
            assert p.read_bytes()[128:132] == b"DICM"
        ds = dss[0]
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Modality, ds.Manufacturer, ds.BurnedInAnnotation) == ("CT", "PHANTOM", "NO")
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
            16,
            12,
            11,
            0,
        )
        assert ("ContrastBolusAgent" in ds) == truth["contrast"]
        assert [float(v) for v in ds.PixelSpacing] == truth["spacing"][1::-1]
        assert len({d.SOPInstanceUID for d in dss}) == len(dss)
        assert len({d.SeriesInstanceUID for d in dss}) == 1
        by_instance = sorted(dss, key=lambda d: int(d.InstanceNumber))
        z = [float(d.ImagePositionPatient[2]) for d in by_instance]
        assert [int(d.InstanceNumber) for d in by_instance] == list(range(1, len(dss) + 1))
        assert np.allclose(np.diff(z), -truth["spacing"][2])  # instance 1 = most superior
        assert max(int(d.pixel_array.max()) for d in dss) <= 4095


def test_pixel_grid_mapping_matches_ras_array(folders):
    """Pixel (r, c) of slice IPP sits at LPS = IPP + c*dc*(1,0,0) + r*dr*(0,1,0)."""
    i = 2
    ph = build_phantom(sample_spec(SEED, i))
    inv = np.linalg.inv(ph.spec.affine)
    rows, cols = np.meshgrid([0, 7, 80, 159], [0, 3, 120, 159], indexing="ij")
    for path in list(_series(folders[i]).glob("*.dcm"))[:6]:
        ds = pydicom.dcmread(path)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        lps = np.asarray(ds.ImagePositionPatient, float)[:, None, None] + np.stack(
            [cols * dc, rows * dr, np.zeros_like(rows, float)]
        )
        ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
        idx = np.rint(np.einsum("ab,bij->aij", inv[:3, :3], ras) + inv[:3, 3, None, None]).astype(
            int
        )
        expected = np.clip(np.rint(ph.hu[idx[0], idx[1], idx[2]]), -1024, 3071)
        hu = ds.pixel_array[rows, cols].astype(float) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept
        )
        assert np.array_equal(hu, expected)
    plane = np.arange(12).reshape(3, 4)  # (X=3, Y=4)
    pix = ras_slice_to_pixels(plane)
    assert pix.shape == (4, 3) and pix[0, 0] == plane[2, 3] and pix[3, 2] == plane[0, 0]
    assert slice_position_lps(np.diag([2.0, 3.0, 4.0, 1.0]), (3, 4, 5), 1) == (-4.0, -9.0, 4.0)


@pytest.mark.parametrize("index", range(N))
def test_geometry_oracle_dicom2nifti(folders, tmp_path, index):
    series = _series(folders[index])
    result = dicom2nifti.convert_dicom.dicom_series_to_nifti(
        str(series), str(tmp_path / "ct.nii.gz"), reorient_nifti=True
    )
    ct = nib.as_closest_canonical(result["NII"])
    labels, lab_affine = _labels_canonical(series)
    assert ct.shape == labels.shape
    assert np.allclose(ct.affine, lab_affine, atol=1e-3)
    hu = np.asarray(ct.dataobj, dtype=np.float64)
    for lung in ("lung_left", "lung_right"):
        assert hu[labels == _value(lung)].mean() < -700
    assert hu[labels == _value("spine")].mean() > 400
    assert hu[labels == 0].mean() < -900
    aff = lab_affine
    assert (
        _centroid_ras(labels, aff, labels == _value("lung_right"))[0]
        > _centroid_ras(labels, aff, labels == _value("lung_left"))[0] + 20
    )
    truth = json.loads(_sidecar(series, "_truth.json").read_text())
    for lesion in truth["lesions"]:
        mask = _lesion_component(labels, aff, lesion)
        assert (
            abs(hu[mask].mean() - lesion["density_hu"])
            < 4 * truth["noise_sigma_hu"] / np.sqrt(mask.sum()) + 1
        )


def _value(name: str) -> int:
    return {v: k for k, v in LABELS.items()}[name]


def _lesion_component(labels: np.ndarray, affine: np.ndarray, lesion: dict) -> np.ndarray:
    ijk = np.rint(np.linalg.solve(affine, [*lesion["centre_ras_mm"], 1.0])[:3]).astype(int)
    assert labels[tuple(ijk)] == lesion["label_value"]
    comp, _ = ndimage.label(labels == lesion["label_value"])
    return comp == comp[tuple(ijk)]


def test_laterality(folders):
    for folder in folders:
        series = _series(folder)
        labels, aff = _labels_canonical(series)
        body_x = _centroid_ras(labels, aff, labels > 0)[0]
        truth = json.loads(_sidecar(series, "_truth.json").read_text())
        assert abs(body_x - truth["body_centre_ras_mm"][0]) < 1.0
        x = {
            name: _centroid_ras(labels, aff, labels == v)[0] - body_x
            for v, name in LABELS.items()
            if v <= 9
        }
        for right in ("lung_right", "kidney_right", "liver"):
            assert x[right] > 5, right
        for left in ("lung_left", "kidney_left", "spleen", "aorta"):
            assert x[left] < -2, left
        y = {
            name: _centroid_ras(labels, aff, labels == _value(name))[1]
            for name in ("spine", "aorta")
        }
        assert y["aorta"] > y["spine"]  # aorta anterior of the spine
        for lesion in truth["lesions"]:
            dx = lesion["centre_ras_mm"][0] - truth["body_centre_ras_mm"][0]
            assert lesion["side"] == ("right" if dx > 0 else "left")
            if lesion["organ"].endswith(("_left", "_right")):
                assert lesion["organ"].endswith(lesion["side"])


def test_lesions_match_label_map(folders):
    for folder in folders:
        series = _series(folder)
        labels, aff = _labels_canonical(series)
        truth = json.loads(_sidecar(series, "_truth.json").read_text())
        spacing = np.asarray(truth["spacing"])
        assert 2 <= len(truth["lesions"]) <= 6
        for lesion in truth["lesions"]:
            assert lesion["organ"] in LESION_HOSTS[lesion["label"]]
            mask = _lesion_component(labels, aff, lesion)
            extent = (np.ptp(np.argwhere(mask), axis=0) + 1) * spacing
            assert np.all(np.abs(extent - lesion["diameter_mm"]) <= 2 * spacing), (lesion, extent)
            shell = ndimage.binary_dilation(mask, iterations=1) & ~mask
            around = np.bincount(labels[shell].astype(int), minlength=13)
            assert around.argmax() == _value(lesion["organ"])


def test_lesion_mix_over_default_collection():
    lesions = [les for i in range(8) for les in build_phantom(sample_spec(SEED, i)).lesions]
    kinds = {les.label for les in lesions}
    assert {"lung_nodule", "liver_mass"} <= kinds
    assert sum(les.diameter >= 10 for les in lesions) >= len(lesions) / 2
    assert {les.side for les in lesions} == {"left", "right"}


def test_phi_is_seeded_into_headers(folders):
    table = phi_strings(SEED, N)
    assert len(table) == N
    for i, folder in enumerate(folders):
        ds = pydicom.dcmread(next(_series(folder).glob("*.dcm")))
        text = "\n".join(str(el.value) for el in ds.iterall() if el.VR not in ("OB", "OW", "UN"))
        assert ds.PatientName == table[i][0]
        assert ds.get_private_item(0x0011, 0x01, "PHANTOM PRIVATE").value.endswith(ds.PatientID)
        assert str(ds.PatientName) in ds.StudyDescription
        for s in table[i]:
            assert len(s) >= 4
            assert s in text or s in folder.name, s
    assert len({row[4] for row in table}) == N  # unique patient IDs


def test_cli_writes_patients(tmp_path):
    out = tmp_path / "p"
    assert main(["--out", str(out), "--patients", "2", "--seed", "1", "--matrix", "64"]) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2
    for folder in folders:
        series = _series(folder)
        assert _sidecar(series, "_seg.nii.gz").is_file()
        assert pydicom.dcmread(next(series.glob("*.dcm"))).Rows == 64


@pytest.mark.parametrize(
    ("flag", "value"), [("--patients", "0"), ("--seed", "-3"), ("--matrix", "8")]
)
def test_cli_rejects_bad_values(tmp_path, capsys, flag, value):
    args = {"--out": str(tmp_path / "p"), "--patients": "2", "--seed": "1", flag: value}
    assert main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert flag in err and value in err
    assert not (tmp_path / "p").exists()
