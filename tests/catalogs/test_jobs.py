"""catalogs.jobs on dask: statistics equal Polars', near-duplicates equal the single-node
search, compaction keeps every row exactly once and swaps the manifest atomically."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pyarrow.parquet as pq
import pytest
from catalog_helpers import copy_corpus, corpus_once

from catalogs import jobs, verify
from catalogs.corpus import TABLES, Corpus, CorpusError

SCHEDULER = "threads"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return corpus_once(tmp_path_factory)


def test_region_stats_equal_polars(corpus_dir):
    corpus = Corpus.open(corpus_dir)
    for by in (("label", "modality", "split"), ("split",)):
        ours = pl.from_pandas(jobs.region_stats(corpus_dir, by=by, scheduler=SCHEDULER))
        ref = corpus.region_stats(by=by)
        assert ours.height == ref.height > 0
        assert ours.select(by).rows() == ref.select(by).rows()
        for col in ("n_regions", "n_images", "n_patients"):
            assert ours[col].cast(pl.Int64).to_list() == ref[col].cast(pl.Int64).to_list()
        for col in ("area_mm2_sum", "area_mm2_mean", "max_diameter_mm_max"):
            assert ours[col].to_list() == pytest.approx(ref[col].to_list(), rel=1e-9)


def test_global_stats_equal_polars_summary(corpus_dir):
    stats = jobs.global_stats(corpus_dir, scheduler=SCHEDULER)
    summary = Corpus.open(corpus_dir).summary()
    assert stats["rows"] == summary["rows"]
    assert stats["files"]["by_status"] == summary["files"]["by_status"]
    assert stats["files"]["by_reason"] == summary["files"]["by_reason"]
    for key in ("by_split", "by_modality"):
        assert stats["images"][key] == summary["images"][key]
    for key in ("by_split", "by_label", "by_modality"):
        assert stats["regions"][key] == summary["regions"][key]
    assert stats["patients"] == summary["patients"]


def test_read_table_never_loads_pixels(corpus_dir):
    df = jobs.read_table(corpus_dir, "images")
    assert "image" not in df.columns and "image_id" in df.columns
    assert len(df) == Corpus.open(corpus_dir).count("images")


def test_near_duplicates_on_dask_equal_single_node(corpus_dir):
    corpus = Corpus.open(corpus_dir)
    assert len(corpus.files("images")) == 3  # one hashing task per shard
    for kwargs in ({"max_distance": 4}, {"max_distance": 2, "include_same_series": True}):
        ours = jobs.near_duplicates(corpus_dir, scheduler=SCHEDULER, **kwargs)
        ref = verify.near_duplicates(corpus, **kwargs)
        assert ours.height > 0 and ours.equals(ref)


def _region_ids(root) -> Counter:
    return Counter(Corpus.open(root).table("regions").select("region_id").collect()["region_id"])


def test_compaction_keeps_every_row_once_and_updates_manifest(corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path / "c")
    before = Corpus.open(root)
    ids = _region_ids(root)
    keys = {t: Counter(before.table(t).select(k).collect()[k]) for t, k in
            {"files": "file_key", "series": "unit_key", "images": "image_id"}.items()}
    old_files = {t: before.files(t) for t in TABLES}
    schemas = {t: pq.read_schema(old_files[t][-1]) for t in TABLES}
    counts = {t: before.count(t) for t in TABLES}

    plan = jobs.compact(root, dry_run=True)
    assert plan["groups"] == {"compact-00000": ["shard-00000", "shard-00001", "shard-00002"]}
    assert Corpus.open(root).shard_names() == before.shard_names()  # dry run: no change

    report = jobs.compact(root, scheduler=SCHEDULER)
    assert report["groups"] == plan["groups"]
    assert report["files_before"] == 13 and report["files_after"] == 5

    after = Corpus.open(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["compact-00000", "discovery"]
    entry = manifest["shards"]["compact-00000"]
    assert entry["replaces"] == ["shard-00000", "shard-00001", "shard-00002"]
    for table in ("series", "images", "regions"):
        info = entry["tables"][table]
        path = root / info["file"]
        assert pq.ParquetFile(path).metadata.num_rows == info["rows"] == counts[table]
        assert jobs._sha256(path) == info["sha256"]
        assert pq.read_schema(path).equals(schemas[table])
        assert not any(p.exists() for p in old_files[table])
    assert manifest["rows"] == before.manifest["rows"]
    assert _region_ids(root) == ids  # the exact multiset of region ids
    for t, k in {"files": "file_key", "series": "unit_key", "images": "image_id"}.items():
        assert Counter(after.table(t).select(k).collect()[k]) == keys[t]
    assert sorted(p.name for p in (root / "_commits" / "replaced").iterdir()) == [
        "shard-00000.json", "shard-00001.json", "shard-00002.json"]
    assert not list(root.rglob("*.tmp-*"))
    # nothing left to compact
    assert jobs.compact(root, scheduler=SCHEDULER)["groups"] == {}


def test_build_rerun_after_compaction_redoes_nothing(corpus_dir, tmp_path):
    """The same build-corpus command after a compaction skips the replaced shards (the compact
    marker covers them) and writes a manifest with the compact shard: rows once, same ids."""
    from workflows.build_corpus import main as build_main

    root = copy_corpus(corpus_dir, tmp_path / "c")
    ids = _region_ids(root)
    before = json.loads((root / "manifest.json").read_text())
    jobs.compact(root, scheduler="synchronous")
    assert build_main([str(corpus_dir.parent / "phantoms"), "--out", str(root),
                       "--units-per-shard", "2", "--workers", "2"]) == 0
    after = json.loads((root / "manifest.json").read_text())
    assert sorted(after["shards"]) == ["compact-00000", "discovery"]
    assert not list((root / "regions").glob("shard-*"))  # nothing was rebuilt
    for key in ("rows", "found", "ingested", "quarantined", "skipped", "complete"):
        assert after[key] == before[key], key
    assert _region_ids(root) == ids


def test_compacting_a_compact_shard_keeps_every_replaced_name(tmp_path):
    """A compact shard merged again: the new marker names the original shards too, so a build
    rerun still treats them as committed (they are no longer in any live marker)."""
    from pipeline.write import committed_shards

    commits = tmp_path / "_commits"
    commits.mkdir()
    stats = {"status": {"ingested": 2}, "quarantined_by_reason": {}}
    (commits / "compact-00000.json").write_text(json.dumps(
        {"shard": "compact-00000", "tables": {}, "stats": stats,
         "replaces": ["shard-00000", "shard-00001"]}))
    (commits / "shard-00002.json").write_text(json.dumps(
        {"shard": "shard-00002", "tables": {}, "stats": stats}))
    marker = jobs.compact_marker(tmp_path, "compact-00001", ["compact-00000", "shard-00002"], {})
    assert marker["replaces"] == ["compact-00000", "shard-00000", "shard-00001", "shard-00002"]
    assert marker["stats"]["status"] == {"ingested": 4}
    for old in ("compact-00000", "shard-00002"):  # as compact() moves them
        (commits / f"{old}.json").unlink()
    (commits / "compact-00001.json").write_text(json.dumps(marker))
    live, replaced = committed_shards(tmp_path)
    assert list(live) == ["compact-00001"]
    assert replaced == {"compact-00000", "shard-00000", "shard-00001", "shard-00002"}


def test_compaction_preserves_image_bytes(corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path / "c")
    want = {r["image_id"]: png for r, png in Corpus.open(root).iter_image_bytes()}
    jobs.compact(root, scheduler="synchronous")
    got = {r["image_id"]: png for r, png in Corpus.open(root).iter_image_bytes()}
    assert got == want


def test_failed_compaction_changes_nothing(corpus_dir, tmp_path, monkeypatch):
    root = copy_corpus(corpus_dir, tmp_path / "c")
    manifest = (root / "manifest.json").read_bytes()
    real = jobs._write_merged

    def flaky(root_, table, new, sources, expected_rows):
        if table == "regions":
            return real(root_, table, new, sources, expected_rows + 1)  # count check fails
        return real(root_, table, new, sources, expected_rows)

    monkeypatch.setattr(jobs, "_write_merged", flaky)
    with pytest.raises(CorpusError, match="nothing was changed"):
        jobs.compact(root, scheduler="synchronous")
    assert (root / "manifest.json").read_bytes() == manifest
    assert _region_ids(root) == _region_ids(corpus_dir)
    assert not list((root / "regions").glob("*compact*"))


def test_compaction_needs_a_finished_corpus(corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path / "c")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["complete"] = False
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="not complete"):
        jobs.compact(root)
