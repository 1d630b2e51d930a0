"""build-corpus --collection NAME PATH on small replicas of public layouts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq

from workflows.build_corpus import main

AFF = np.diag([1.0, 1.0, 3.0, 1.0])


def _nii(path: Path, data, dtype=np.int16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype), AFF), path)


def _ct() -> np.ndarray:
    hu = np.full((32, 32, 4), -1000)
    hu[4:28, 4:28] = 40
    return hu


def _rows(out, table):
    return pq.read_table(out / table).to_pylist()


def test_totalsegmentator_masks_are_merged(tmp_path):
    root = tmp_path / "ts"
    for case in ("s0001", "s0002"):
        _nii(root / case / "ct.nii.gz", _ct())
        for k, name in enumerate(("liver", "spleen")):
            m = np.zeros((32, 32, 4), np.uint8)
            m[6 + 10 * k:14 + 10 * k, 8:20, 1:3] = 1
            _nii(root / case / "segmentations" / f"{name}.nii.gz", m, np.uint8)
    (root / "meta.csv").write_text("image_id;age\ns0001;50\n")
    out = tmp_path / "out"
    assert main(["--collection", "totalsegmentator", str(root), "--out", str(out),
                 "--every-k", "0"]) == 0
    series = _rows(out, "series")
    assert len(series) == 2 and all(s["label_names"] == ["liver", "spleen"] for s in series)
    assert all(s["modality"] == "CT" and s["modality_source"] == "collection" for s in series)
    assert {r["label"] for r in _rows(out, "regions")} == {"liver", "spleen"}
    files = _rows(out, "files")
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(files) == manifest["found"] == 7 and manifest["complete"]
    assert sum(f["status"] == "ingested" for f in files) == 6  # 2 CT + 4 masks; meta.csv skipped


def test_brats_sequences_share_one_label_map(tmp_path):
    root = tmp_path / "brats"
    case = "BraTS-GLI-00000-000"
    for seq in ("t1n", "t1c", "t2w", "t2f"):
        _nii(root / case / f"{case}-{seq}.nii.gz", np.random.default_rng(0).integers(0, 500, (32, 32, 4)))
    seg = np.zeros((32, 32, 4), np.uint8)
    seg[10:20, 10:20, 2] = 2
    _nii(root / case / f"{case}-seg.nii.gz", seg, np.uint8)
    out = tmp_path / "out"
    assert main(["--collection", "brats", str(root), "--out", str(out), "--every-k", "0"]) == 0
    series = _rows(out, "series")
    assert len(series) == 4 and all(s["label_names"] == ["peritumoral_edema"] for s in series)  # BraTS "ED"
    files = _rows(out, "files")
    assert len(files) == 5 and len({f["file_key"] for f in files}) == 5
    assert all(f["status"] == "ingested" for f in files)


def test_unknown_collection_is_named(tmp_path, capsys):
    assert main(["--collection", "nope", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--collection nope" in capsys.readouterr().err


def test_remote_collection_root_is_refused_with_its_reason(tmp_path, capsys):
    """A collection layout is read from a local folder; an s3:// root says so (not "no such
    folder"), before any work."""
    assert main(["--collection", "brats", "s3://bucket-a/brats", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "local folder" in err and "no such folder" not in err
    assert not (tmp_path / "o").exists()
