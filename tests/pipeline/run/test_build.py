"""build-corpus end to end on real files: accounting, PHI canaries, resume, determinism."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from factories import PHI, ramp_volume, write_series

from pipeline.write import FILES_SCHEMA, IMAGES_SCHEMA, SERIES_SCHEMA
from workflows.build_corpus import main

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _table(out: Path, name: str):
    return pq.read_table(out / name).to_pylist()


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]


def test_pydicom_test_files_every_file_accounted(tmp_path):
    out = tmp_path / "corpus"
    assert main([str(PYDICOM_FILES), "--out", str(out), "--workers", "2"]) == 0
    files = _table(out, "files")
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(files) == len(_all_files(PYDICOM_FILES)) == manifest["found"]
    assert len({f["file_key"] for f in files}) == len(files)
    assert manifest["found"] == manifest["ingested"] + manifest["quarantined"] + manifest["skipped"]
    assert all(f["status"] in ("ingested", "quarantined", "skipped") and f["reason"] for f in files)
    assert all(f["error"] for f in files if f["status"] == "quarantined")
    reasons = {f["reason"] for f in files}
    assert {"ok", "truncated", "unsupported_sop", "unpaired_label", "archive",
            "not_medical", "burned_in_risk"} <= reasons
    images = _table(out, "images")
    assert len(images) == manifest["rows"]["images"] > 10
    assert pq.read_schema(next((out / "images").glob("*.parquet"))).equals(IMAGES_SCHEMA)


def _canary_source(root: Path) -> Path:
    """A collection whose folder names, headers and NIfTI header text all carry canaries."""
    folder = root / "CANARYFOLDER^SMITH_CANARYPID777" / "CT_1"
    paths = write_series(folder, ramp_volume((3, 16, 16)), StudyDescription="CANARYDESC study")
    for p in paths:
        ds = pydicom.dcmread(p)
        block = ds.private_block(0x0011, "CANARY PRIVATE", create=True)
        block.add_new(0x01, "LO", "CANARYPRIVATEVALUE")
        ds.save_as(p)
    img = nib.Nifti1Image(np.full((8, 8, 4), 100, np.int16), np.eye(4))
    img.header["descrip"] = b"CANARYDESCRIP"
    img.header["aux_file"] = b"CANARYAUX"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"CANARYEXTENSION"))
    nib.save(img, root / "CANARYFOLDER^SMITH_CANARYPID777" / "mr_CANARYFILE.nii.gz")
    broken = root / "CANARYFOLDER^SMITH_CANARYPID777" / "broken_CANARYFILE.dcm"
    broken.write_bytes(paths[0].read_bytes()[:600])
    return root


def test_phi_canaries_never_reach_outputs_or_logs(tmp_path, capfd):
    src = _canary_source(tmp_path / "src")
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--workers", "1"]) == 0
    logs = "".join(capfd.readouterr())
    canaries = [*PHI.values(), "CANARYFOLDER", "CANARYDESC", "CANARYPRIVATEVALUE", "CANARYAUX",
                "CANARYDESCRIP", "CANARYEXTENSION", "CANARYFILE", "SMITH", "19230405"]
    texts = [logs] + [p.name for p in _all_files(out)]
    for p in _all_files(out):
        texts.append(p.read_bytes().decode("latin-1"))
        if p.suffix == ".parquet":
            texts.append(repr(pq.read_table(p).to_pylist()))
    blob = "\n".join(texts).upper()
    leaked = [c for c in canaries if c.upper() in blob]
    assert not leaked, f"PHI reached the outputs: {leaked}"
    statuses = {f["status"] for f in _table(out, "files")}
    assert {"ingested", "quarantined"} <= statuses  # the broken file was really processed


def test_symlink_outside_root_and_archives_are_skipped(tmp_path):
    outside = tmp_path / "outside"
    write_series(outside, ramp_volume((2, 8, 8)))
    src = tmp_path / "src"
    write_series(src / "s", ramp_volume((2, 8, 8)), series_uid="1.2.9")
    os.symlink(outside / "IM0000.dcm", src / "link.dcm")
    os.symlink(outside, src / "linkdir")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(outside / "IM0000.dcm", arcname="../../evil.dcm")
    (src / "bundle.tar").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out)]) == 0
    rows = {(r["status"], r["reason"]) for r in _table(out, "files")}
    assert ("skipped", "symlink_outside_root") in rows and ("skipped", "archive") in rows
    # never unpacked: the member would land two folders above the archive (tar's own
    # extraction filter would refuse it; a hand-written unpacker would not)
    assert not (src / ".." / ".." / "evil.dcm").resolve().exists()
    assert not list(tmp_path.rglob("evil.dcm"))
    assert len(_table(out, "series")) == 1


def test_two_series_in_one_folder_become_two_series(tmp_path):
    src = tmp_path / "src"
    write_series(src / "mixed", ramp_volume((3, 8, 8)), series_uid="1.2.3.1")
    write_series(src / "mixed", ramp_volume((2, 10, 6)), series_uid="1.2.3.2",
                 names=["b0.dcm", "b1.dcm"], origin=(0, 0, 0))
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out)]) == 0
    series = _table(out, "series")
    assert sorted(s["shape"][2] for s in series) == [2, 3]


def test_resume_skips_committed_shards_and_is_deterministic(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        write_series(src / f"s{i}", ramp_volume((3, 12, 12), seed=i), series_uid=f"1.2.7.{i}")
    args = ["--units-per-shard", "1", "--workers", "2"]
    out1, out2 = tmp_path / "a", tmp_path / "b"
    assert main([str(src), "--out", str(out1), *args]) == 0
    stamps = {p: p.stat().st_mtime_ns for p in (out1 / "images").glob("*.parquet")}
    assert len(stamps) == 3
    assert main([str(src), "--out", str(out1), *args]) == 0  # resume: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in (out1 / "images").glob("*.parquet")} == stamps
    assert main([str(src), "--out", str(out2), *args]) == 0
    for table in ("files", "series", "images"):
        for p in sorted((out1 / table).glob("*.parquet")):
            assert p.read_bytes() == (out2 / table / p.name).read_bytes(), p
    # worker seconds per stage: in every shard's marker, summed in the manifest
    manifest = json.loads((out2 / "manifest.json").read_text())
    shards = [m for k, m in manifest["shards"].items() if k != "discovery"]
    stages = ("read", "labels", "cut", "regions", "captions", "rows", "commit")
    assert len(shards) == 3 and all(set(m["stats"]["stage_s"]) == set(stages) for m in shards)
    assert manifest["worker_stage_s"]["read"] == pytest.approx(
        sum(m["stats"]["stage_s"]["read"] for m in shards), abs=1e-2)
    assert all(manifest["worker_stage_s"][k] > 0 for k in ("read", "cut", "commit"))


def test_interrupted_shard_is_redone(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        write_series(src / f"s{i}", ramp_volume((2, 8, 8), seed=i), series_uid=f"1.2.8.{i}")
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--units-per-shard", "1"]) == 0
    before = sorted(r["image_id"] for r in _table(out, "images"))
    (out / "_commits" / "shard-00001.json").unlink()  # as if killed before the marker
    (out / "images" / "shard-00001.parquet").unlink()
    assert main([str(src), "--out", str(out), "--units-per-shard", "1"]) == 0
    assert sorted(r["image_id"] for r in _table(out, "images")) == before


def test_bad_flags_name_the_flag(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--split", "0.5,0.2"]) == 2
    assert "--split" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "SOURCE" in capsys.readouterr().err


def test_schemas_are_the_written_ones(tmp_path):
    src = tmp_path / "src"
    write_series(src / "s", ramp_volume((2, 8, 8)))
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out)]) == 0
    for table, schema in (("files", FILES_SCHEMA), ("series", SERIES_SCHEMA)):
        assert pq.read_schema(sorted((out / table).glob("*.parquet"))[0]).equals(schema)


def test_images_load_as_hugging_face_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    write_series(src / "s", ramp_volume((2, 24, 20)))
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out)]) == 0
    files = sorted(str(p) for p in (out / "images").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]["image"]
    assert first.size == (20, 24) and first.mode == "L"
