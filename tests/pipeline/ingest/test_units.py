"""Label pairing through a whole build: RTSTRUCT by referenced series, MSD layout, X_seg rule."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
from factories import ramp_volume, write_series
from label_factories import Series, contour, make_rtstruct, square

from workflows.build_corpus import main


def _rows(out, table):
    return pq.read_table(out / table).to_pylist()


def test_rtstruct_pairs_with_its_series(tmp_path):
    src = tmp_path / "src"
    write_series(src / "ct", ramp_volume((3, 24, 20)), origin=(-10.0, -20.0, 30.0), step=2.5,
                 spacing=(0.8, 0.7), series_uid="1.2.3.4.5")
    geo = Series((1, 0, 0, 0, 1, 0), (-10.0, -20.0, 30.0), (0.8, 0.7), (0, 0, 2.5), 20, 24, 3)
    make_rtstruct(src / "rt.dcm", geo, [(7, "tumour", [contour(square(geo, 4, 9, 5, 12, 1))])],
                  "1.2.3.4.5")
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--every-k", "0"]) == 0
    (series,) = _rows(out, "series")
    assert series["label_source"] == "rtstruct" and series["label_names"] == ["tumor"]  # via the vocabulary
    images = _rows(out, "images")
    assert [(i["slice_index"], i["label_values"]) for i in images] == [(1, [1])]
    assert {r["status"] for r in _rows(out, "files")} == {"ingested"}


def test_msd_layout_pairs_images_labels_and_names(tmp_path):
    task = tmp_path / "Task03_Liver"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    data = np.full((16, 16, 6), -1000, np.int16)
    data[4:12, 4:12, 2:4] = 60
    lab = np.zeros((16, 16, 6), np.uint8)
    lab[4:12, 4:12, 2:4] = 1
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, aff), task / "imagesTr" / "liver_7_0000.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), task / "labelsTr" / "liver_7.nii.gz")
    (task / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    out = tmp_path / "out"
    assert main([str(task), "--out", str(out), "--every-k", "0"]) == 0
    (series,) = _rows(out, "series")
    assert series["label_source"] == "nifti" and series["label_names"] == ["liver"]
    assert series["modality"] == "CT"
    assert sorted(i["slice_index"] for i in _rows(out, "images")) == [2, 3]
    files = {(r["kind"], r["status"], r["reason"]) for r in _rows(out, "files")}
    assert files == {("nifti", "ingested", "ok"), ("nifti_label", "ingested", "ok"),
                     ("json", "ingested", "sidecar")}


def test_seg_suffix_rule_and_mismatch_quarantines_only_the_label(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    img = np.arange(256, dtype=np.int16).reshape(8, 8, 4)  # signal (a blank volume is refused)
    nib.save(nib.Nifti1Image(img, aff), src / "a.nii.gz")
    lab = np.zeros((8, 8, 4), np.uint8)
    lab[2:4, 2:4, 1] = 3
    nib.save(nib.Nifti1Image(lab, aff), src / "a_seg.nii.gz")
    (src / "a_seg.json").write_text(json.dumps({"3": "nodule"}))
    nib.save(nib.Nifti1Image(img, aff), src / "b.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.uint8), aff), src / "b_seg.nii.gz")
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out)]) == 0
    series = sorted(_rows(out, "series"), key=lambda s: s["label_source"])
    assert [s["label_source"] for s in series] == ["nifti", "none"]
    assert series[0]["label_names"] == ["nodule"]
    reasons = sorted(r["reason"] for r in _rows(out, "files") if r["status"] == "quarantined")
    assert reasons == ["label_mismatch"]
