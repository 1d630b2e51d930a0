"""Every reader of a corpus trusts the commit, not the folder (STYLE 9c): a table file no
manifest entry lists is never read, whichever reader; a table without rows has no file and
every reader copes; Hugging Face ``datasets`` loads the corpus through its dataset card; DuckDB
gets the same file list."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from catalog_helpers import copy_corpus, corpus_once
from factories import ramp_volume, write_series

from catalogs.corpus import Corpus, duckdb_views
from catalogs.corpus import main as corpus_cli
from pipeline.write import committed_files, read_table


def _write_read_table(root: Path) -> int:
    return len(read_table(root, "regions", ["region_id"]))


def _polars(root: Path) -> int:
    return Corpus.open(root).count("regions")


def _dask(root: Path) -> int:
    from catalogs import jobs

    return len(jobs.read_table(root, "regions", ["region_id"]).compute(scheduler="synchronous"))


def _trainer(root: Path) -> int:
    from model.config import DataConfig
    from model.data import CorpusIndex, RegionCorpus

    c = CorpusIndex.open(root)
    return sum(len(row["regions"]) for split in ("train", "val", "test")
               for row in RegionCorpus(c, split, DataConfig(), 64, train=False)
               ._epoch_rows(0, 1, 0))


def _caption_checker(root: Path) -> int:
    from catalogs.verify import verify_captions

    return verify_captions(Corpus.open(root))["regions"]


def _hugging_face(root: Path) -> int:
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset(str(root), "regions", split="corpus",
                                 cache_dir=str(root.parent / "hf")).num_rows


def _duckdb(root: Path) -> int:
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    con.execute(duckdb_views(Corpus.open(root)))
    return con.execute("SELECT count(*) FROM regions").fetchone()[0]


def _files_command(root: Path) -> int:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert corpus_cli(["files", str(root), "regions"]) == 0
    return sum(pq.ParquetFile(line).metadata.num_rows for line in buf.getvalue().split())


READERS = [_write_read_table, _polars, _dask, _trainer, _caption_checker, _hugging_face,
           _duckdb, _files_command]


@pytest.fixture(scope="module")
def with_strays(tmp_path_factory):
    """A copy of the catalog corpus plus table files no manifest lists: a copy of a committed
    file under a fresh shard name, one named like a rebuilt attempt, a compaction's leftover."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    root = copy_corpus(corpus_once(tmp_path_factory), tmp_path_factory.mktemp("strays") / "c")
    for table in ("files", "images", "regions"):
        first = committed_files(root, table)[-1]
        for name in ("shard-09999.parquet", "shard-00000.r4.parquet", "compact-00007.parquet"):
            shutil.copy(first, root / table / name)
    yield root
    mp.undo()


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__.strip("_"))
def test_a_file_without_a_marker_is_never_read(with_strays, reader):
    manifest = json.loads((with_strays / "manifest.json").read_text())
    assert reader(with_strays) == manifest["rows"]["regions"] > 0


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """Two phantom patients, a series without labels (its shard has no regions) and a file
    that is not medical, one unit per shard: as the quick start's corpus, shards with empty
    tables."""
    from pipeline.phantoms.studies import make_phantoms
    from workflows.build_corpus import main

    root = tmp_path_factory.mktemp("small")
    make_phantoms(root / "src", patients=2, seed=1, matrix=32)
    write_series(root / "src" / "plain", ramp_volume((3, 24, 20)), series_uid="1.2.44.1")
    (root / "src" / "notes.txt").write_text("not an image")
    out = root / "corpus"
    assert main([str(root / "src"), "--out", str(out), "--units-per-shard", "1",
                 "--workers", "2"]) == 0
    return out


def test_no_empty_table_file_and_readers_cope(small_corpus):
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    # table files (the build's own folders _commits/, _index/ hold markers and the file index)
    files = [p for p in small_corpus.glob("*/*.parquet") if not p.parent.name.startswith("_")]
    assert files and all(pq.ParquetFile(p).metadata.num_rows > 0 for p in files)
    empty = [(s, t) for s, m in manifest["shards"].items() for t, info in m["tables"].items()
             if info["rows"] == 0]
    assert [t for _, t in empty] == ["regions"]  # the plain series' shard
    assert all("file" not in manifest["shards"][s]["tables"][t] for s, t in empty)
    assert {p.relative_to(small_corpus) for p in files} == {
        p.relative_to(small_corpus) for t in ("files", "series", "images", "regions")
        for p in committed_files(small_corpus, t)}
    assert _trainer(small_corpus) == _polars(small_corpus) == manifest["rows"]["regions"]
    assert Corpus.open(small_corpus).count("images") == manifest["rows"]["images"]
    from model.config import DataConfig
    from model.data import CorpusIndex, RegionCorpus

    c = CorpusIndex.open(small_corpus)
    rows = [r for split in ("train", "val", "test")
            for r in RegionCorpus(c, split, DataConfig(), 64, train=False)._epoch_rows(0, 1, 0)]
    assert len(rows) == manifest["rows"]["images"] and any(not r["regions"] for r in rows)


def test_hugging_face_loads_images_and_regions(small_corpus, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    regions = datasets.load_dataset(str(small_corpus), "regions", split="corpus",
                                    cache_dir=str(tmp_path / "hf"))
    images = datasets.load_dataset(str(small_corpus), "images", split="corpus",
                                   cache_dir=str(tmp_path / "hf"))
    assert regions.num_rows == manifest["rows"]["regions"] > 0
    assert images.num_rows == manifest["rows"]["images"] > 0
    assert isinstance(images.features["image"], datasets.Image)
    first = images[0]
    assert first["image"].size == (first["width"], first["height"])
    assert set(images.unique("split")) <= {"train", "val", "test"}
