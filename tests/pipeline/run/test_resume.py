"""Resume when the sources change: shard membership follows unit keys, not positions.

A collection grows (studies added), shrinks (a study gone), a label arrives before its image,
a unit is killed for lack of memory, the configuration changes: after each rerun every file
and region has exactly one row, committed shards are untouched unless they must be redone,
and what could not be done is reported (keys and counts only).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import IngestError
from pipeline.write import committed_files, read_table
from workflows.build_corpus import main

ARGS = ["--executor", "local", "--workers", "2"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[Path]:
    """Five phantom patients (one CT series + its NIfTI label map + a sidecar each)."""
    from pipeline.phantoms.studies import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("resume") / "all", patients=5, seed=3,
                         matrix=32)


@pytest.fixture(scope="module")
def clean(studies, tmp_path_factory) -> Path:
    """A clean build of all five patients."""
    out = tmp_path_factory.mktemp("clean") / "corpus"
    assert main([str(studies[0].parent), "--out", str(out), "--units-per-shard", "2", *ARGS]) == 0
    return out


def _source(studies: list[Path], folder: Path, which) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in which:
        shutil.copytree(studies[i], folder / studies[i].name)
    return folder


def _build(src: Path, out: Path, *extra: str) -> dict:
    assert main([str(src), "--out", str(out), "--units-per-shard", "2", *ARGS, *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _ids(out: Path, table: str = "regions", key: str = "region_id") -> Counter:
    return Counter(r[key] for r in read_table(out, table, [key]))


def _committed(out: Path) -> dict[str, bytes]:
    """Every committed table file (relative path → bytes)."""
    return {str(p.relative_to(out)): p.read_bytes()
            for t in ("files", "series", "images", "regions") for p in committed_files(out, t)}


def _check_exactly_once(out: Path, manifest: dict) -> None:
    """One row per file and per region; the manifest's counts are the committed rows; no table
    file outside the committed ones; no empty table file."""
    for table, key in (("files", "file_key"), ("regions", "region_id"), ("images", "image_id")):
        ids = _ids(out, table, key)
        assert all(n == 1 for n in ids.values()), f"duplicate {key}"
        assert sum(ids.values()) == manifest["rows"][table]
    listed = {p for t in ("files", "series", "images", "regions") for p in committed_files(out, t)}
    on_disk = {p for t in ("files", "series", "images", "regions")
               for p in (out / t).glob("*.parquet")}
    assert on_disk == listed
    assert all(pq.ParquetFile(p).metadata.num_rows > 0 for p in listed)


def _marker(out: Path, entry: dict) -> dict:
    return json.loads((out / "_commits" / f"{entry['shard']}.json").read_text())


def _units(out: Path) -> dict[str, set[str]]:
    """Committed shard → the unit keys its commit marker lists."""
    return {p.stem: set(json.loads(p.read_text())["units"])
            for p in (out / "_commits").glob("*.json")}


def test_added_studies_only_add_shards(studies, clean, tmp_path):
    src, out = _source(studies, tmp_path / "src", range(3)), tmp_path / "out"
    _build(src, out)
    before, units = _committed(out), _units(out)
    _source(studies, src, (3, 4))  # two more patients arrive
    second = _build(src, out)

    assert _ids(out) == _ids(clean)  # the region ids of a clean build of all five
    _check_exactly_once(out, second)
    after = _committed(out)
    assert {k: after[k] for k in before} == before  # committed files untouched
    assert set(after) - set(before)
    assert all(Path(k).name.split(".")[0] not in units for k in set(after) - set(before))
    assert second["complete"] and second["missing_units"]["count"] == 0
    now = _units(out)
    assert {k: now[k] for k in units} == units  # old shards keep exactly their units
    new = set().union(*(now[k] for k in now if k not in units))
    assert len(new) == 2 and not new & set().union(*units.values())


def test_removed_study_is_reported_and_its_rows_kept(studies, tmp_path):
    src, out = _source(studies, tmp_path / "src", range(3)), tmp_path / "out"
    first = _build(src, out)
    regions = _ids(out)
    committed = _committed(out)
    gone = studies[1].name
    alone = _build(_source(studies, tmp_path / "alone", [1]), tmp_path / "alone_out")
    assert alone["rows"]["series"] == 1
    shutil.rmtree(src / gone)
    second = _build(src, out)

    assert second["missing_units"] == {"count": 1, "keys": sorted(_units(tmp_path / "alone_out")
                                                                  ["shard-00000"])}
    assert second["missing_files"] == 1  # the patient's sidecar (a discovery-level file)
    assert _ids(out) == regions and _committed(out) == committed  # rows kept, nothing rewritten
    assert second["rows"] == first["rows"] and second["found"] < first["found"]
    text = (out / "manifest.json").read_text() + (out / "README.md").read_text()
    assert gone.split("_")[0] not in text and "PID" not in text  # keys and counts only


def test_label_before_its_image_has_one_row(studies, tmp_path):
    """A label map whose image is not there yet is skipped (discovery shard); when the image
    arrives, the label joins its unit and its skipped row leaves the discovery shard."""
    src, out = _source(studies, tmp_path / "src", range(2)), tmp_path / "out"
    series_dir = next(p for p in (src / studies[1].name).iterdir() if p.is_dir())
    parked = tmp_path / "parked"
    shutil.move(series_dir, parked)
    _build(src, out)
    assert [f["status"] for f in read_table(out, "files", ["status", "reason"])
            if f["reason"] == "unpaired_label"] == ["skipped"]
    shutil.move(parked, series_dir)
    second = _build(src, out)

    _check_exactly_once(out, second)
    files = read_table(out, "files", ["file_key", "status", "reason"])
    assert not [f for f in files if f["reason"] == "unpaired_label"]
    assert len(files) == second["found"] and second["complete"]
    clean = _build(src, tmp_path / "clean")
    assert _ids(out) == _ids(tmp_path / "clean")
    assert second["rows"] == clean["rows"]


def test_label_after_its_image_redoes_the_shard(studies, tmp_path):
    """A unit that gains files (its label map arrives after the series was committed) is
    redone: its shard's files are replaced once, its regions appear, nothing else changes."""
    src, out = _source(studies, tmp_path / "src", range(3)), tmp_path / "out"
    label = next((src / studies[2].name).glob("*_seg.nii.gz"))
    parked = tmp_path / label.name
    shutil.move(label, parked)
    first = _build(src, out)
    before = _committed(out)
    shutil.move(parked, label)
    second = _build(src, out)

    assert len(second["rebuilt_shards"]) == 1 and second["complete"]
    assert second["changed_units"]["count"] == 0
    _check_exactly_once(out, second)
    clean = _build(src, tmp_path / "clean")
    assert _ids(out) == _ids(tmp_path / "clean") and second["rows"] == clean["rows"]
    assert second["rows"]["regions"] > first["rows"]["regions"]
    # the unit's shard and the discovery shard (whose row of the label's names JSON moved into
    # the unit) are redone; every other committed file is untouched
    redone = (second["rebuilt_shards"][0] + ".", "discovery.")
    after = _committed(out)
    assert {k: v for k, v in after.items() if not Path(k).name.startswith(redone)} == {
        k: v for k, v in before.items() if not Path(k).name.startswith(redone)}


def test_unit_that_lost_files_is_reported_and_kept(studies, tmp_path):
    """A committed unit with fewer files now (a slice unreadable, deleted): reported as changed,
    its rows kept, the corpus not complete; nothing is redone or rewritten."""
    src, out = _source(studies, tmp_path / "src", range(2)), tmp_path / "out"
    _build(src, out)
    before, regions = _committed(out), _ids(out)
    series_dir = next(p for p in (src / studies[0].name).iterdir() if p.is_dir())
    sorted(series_dir.glob("*.dcm"))[0].unlink()
    second = _build(src, out)

    assert second["changed_units"]["count"] == 1 and not second["complete"]
    assert second["rebuilt_shards"] == [] and second["missing_units"]["count"] == 0
    assert _committed(out) == before and _ids(out) == regions


def test_out_of_memory_shard_is_redone_once(studies, clean, tmp_path, monkeypatch):
    """A unit killed for lack of memory is not done: the manifest says so and is not complete;
    the next run redoes its shard (new files, new marker, old files gone), nothing else."""
    from pipeline.run import execute

    src, out = _source(studies, tmp_path / "src", range(5)), tmp_path / "out"
    victim = min(r["unit_key"] for r in read_table(clean, "series", ["unit_key"]))
    real = execute.process_unit

    def oom(task, *a, **k):
        if task.unit_key == victim:
            raise IngestError("out_of_memory", "killed for lack of memory (test)")
        return real(task, *a, **k)

    monkeypatch.setattr(execute, "process_unit", oom)
    first = _build(src, out)
    monkeypatch.setattr(execute, "process_unit", real)
    assert not first["complete"] and first["out_of_memory_units"]["keys"] == [victim]
    assert {f["reason"] for f in read_table(out, "files", ["unit_key", "reason"])
            if f["unit_key"] == victim} == {"out_of_memory"}
    shard = next(n for n, m in first["shards"].items() if victim in _marker(out, m)["units"])
    before = _committed(out)

    second = _build(src, out)
    assert second["rebuilt_shards"] == [shard] and second["complete"]
    assert second["out_of_memory_units"]["count"] == 0
    assert _ids(out) == _ids(clean)
    _check_exactly_once(out, second)
    after = _committed(out)
    redone = {k for k in after if Path(k).name.startswith(shard + ".")}
    assert redone and all(".r1." in k for k in redone)
    assert {k: v for k, v in after.items() if k not in redone} == {
        k: v for k, v in before.items() if not Path(k).name.startswith(shard + ".")}
    assert _marker(out, second["shards"][shard])["attempt"] == 1
    assert _build(src, out)["rebuilt_shards"] == []  # done: a third run redoes nothing


def test_changed_config_is_refused_naming_the_field(studies, tmp_path, capsys):
    src, out = _source(studies, tmp_path / "src", range(2)), tmp_path / "out"
    _build(src, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = [str(src), "--out", str(out), "--units-per-shard", "2", *ARGS, "--every-k", "2",
            "--min-area-mm2", "9"]
    capsys.readouterr()
    assert main(args) == 2
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1
    assert message.startswith(f"build-corpus: error: --out {out}: built with another config")
    assert "slicing.every_k" in message and "regions.min_area_mm2" in message
    assert "config hash" not in message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # how it runs is not what it makes: other worker counts and shard sizes resume
    assert main([str(src), "--out", str(out), "--units-per-shard", "1", "--executor", "local",
                 "--workers", "1"]) == 0
