"""catalogs.corpus on a real phantom corpus: counts, lazy scans without pixels, joins, --where,
sampling, summary; DuckDB reads the same tables; the browse-catalog command."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from catalog_helpers import add_shard, copy_corpus, corpus_once, first_rows

from catalogs.corpus import TABLES, Corpus, CorpusError, duckdb_views
from pipeline.write import SCHEMAS, committed_files
from workflows.browse_catalog import main as browse


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return corpus_once(tmp_path_factory)


@pytest.fixture(scope="session")
def corpus(corpus_dir):
    return Corpus.open(corpus_dir)


def _arrow(corpus_dir, table, columns=None) -> pa.Table:
    files = committed_files(corpus_dir, table)  # the manifest's list (empty tables: no file)
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def test_counts_equal_pyarrow_and_manifest(corpus, corpus_dir):
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert len([s for s in manifest["shards"] if s != "discovery"]) == 3
    for table in TABLES:
        n = _arrow(corpus_dir, table).num_rows
        assert corpus.count(table) == n == manifest["rows"][table] == corpus.manifest_rows(table)
        assert corpus.table(table).collect().height == n
    assert corpus.count("regions") > 500 and corpus.count("images") > 100


def test_tables_keep_schema_and_values(corpus, corpus_dir):
    for table in ("series", "regions"):
        df = corpus.table(table).collect()
        for field in SCHEMAS[table]:  # every schema column, with its values
            assert field.name in df.columns
        key = {"series": "unit_key", "regions": "region_id"}[table]
        ours = df.sort(key).to_arrow()
        ref = pl.from_arrow(_arrow(corpus_dir, table)).sort(key).to_arrow()
        assert ours.to_pylist() == ref.to_pylist()


def test_images_scan_does_not_read_pixels(corpus, corpus_dir):
    lf = corpus.images()
    names = lf.collect_schema().names()
    assert "image" not in names and "image_id" in names and "height" in names
    plan = lf.explain()
    n_cols = len(pq.read_schema(corpus.files("images")[0]).names)
    assert f"PROJECT {n_cols - 1}/{n_cols} COLUMNS" in plan  # the column is cut in the scan
    df = lf.collect()
    assert "image" not in df.columns and df.height == corpus.count("images")
    with_px = corpus.images(with_pixels=True).head(2).collect()
    assert with_px["image"].struct.field("bytes")[0][:8] == b"\x89PNG\r\n\x1a\n"


def test_regions_with_images_join_has_no_pixels(corpus):
    lf = corpus.regions_with_images()
    names = lf.collect_schema().names()
    assert "image" not in names and not any(
        isinstance(dt, pl.Binary) for dt in lf.collect_schema().dtypes())
    right = lf.explain().split("RIGHT PLAN", 1)[1]  # the images side of the join
    n_cols = len(pq.read_schema(corpus.files("images")[0]).names)
    assert "images/" in right and "PROJECT */" not in right and f"/{n_cols} COLUMNS" in right
    df = lf.collect()
    assert df.height == corpus.count("regions")
    assert {"slice_index", "window", "height", "width", "label", "bbox"} <= set(df.columns)
    assert df["slice_index"].null_count() == 0 and df["height"].null_count() == 0
    # every box lies inside its image
    b = df.select(pl.col("bbox").list.get(2).alias("x1"), pl.col("bbox").list.get(3).alias("y1"),
                  "width", "height")
    assert (b["x1"] <= b["width"]).all() and (b["y1"] <= b["height"]).all()


def test_only_committed_files_are_scanned(corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path / "c")
    before = Corpus.open(root).count("regions")
    rows = first_rows(root, "regions", 5)
    add_shard(root, "shard-09999", {"regions": rows})  # file on disk, not in manifest.json
    ids = Corpus.open(root).table("regions").select("region_id").collect()["region_id"]
    assert ids.len() == before and ids.n_unique() == before  # the stray copies are not read
    registered = Corpus.open(root, manifest=root / "manifest-shard-09999.json")
    assert registered.count("regions") == before + 5


def test_where_filters_like_polars(corpus):
    df = corpus.table("regions").collect()
    liver = corpus.filter("label = 'liver'").collect()
    assert liver.height == df.filter(pl.col("label") == "liver").height > 0
    assert set(liver["label"]) == {"liver"}
    big = corpus.filter("label IN ('liver', 'spleen') AND area_mm2 > 500").collect()
    ref = df.filter(pl.col("label").is_in(["liver", "spleen"]), pl.col("area_mm2") > 500)
    assert sorted(big["region_id"]) == sorted(ref["region_id"])
    # image columns are usable too
    assert corpus.filter("slice_index < 3").collect()["slice_index"].max() < 3
    for bad in ("label = ", "no_such_column = 1", "area_mm2 + 1", ""):
        with pytest.raises(CorpusError):
            corpus.filter(bad)


def test_sample_is_deterministic_and_filtered(corpus):
    a = corpus.sample(7, seed=3, where="label = 'spine'")
    b = corpus.sample(7, seed=3, where="label = 'spine'")
    assert a.height == 7 and a.equals(b) and set(a["label"]) == {"spine"}
    assert "image" not in a.columns
    c = corpus.sample(7, seed=4, where="label = 'spine'")
    assert set(c["region_id"]) != set(a["region_id"])
    everything = corpus.sample(10**6, seed=0, where="label = 'spleen'")
    assert everything.height == corpus.filter("label = 'spleen'").collect().height


def test_region_stats_and_summary(corpus, corpus_dir):
    stats = corpus.region_stats()
    regions = _arrow(corpus_dir, "regions", ["label", "modality", "split", "image_id",
                                             "area_mm2", "caption_region"]).to_pylist()
    assert int(stats["n_regions"].sum()) == len(regions)
    liver = stats.filter(pl.col("label") == "liver")
    rows = [r for r in regions if r["label"] == "liver"]
    assert int(liver["n_regions"].sum()) == len(rows)
    assert liver["area_mm2_sum"].sum() == pytest.approx(sum(r["area_mm2"] for r in rows))
    by_window = corpus.region_stats(by=["window"])
    assert by_window["window"].to_list() == ["soft_tissue"]

    s = corpus.summary()
    json.dumps(s)  # plain data
    assert s["rows"] == s["manifest_rows"] == {t: corpus.count(t) for t in TABLES}
    files = _arrow(corpus_dir, "files", ["status", "reason"]).to_pylist()
    assert sum(s["files"]["by_status"].values()) == len(files)
    assert s["files"]["by_status"]["ingested"] == sum(f["status"] == "ingested" for f in files)
    assert sum(s["regions"]["by_label"].values()) == len(regions)
    assert s["regions"]["by_split"] == {
        k: sum(r["split"] == k for r in regions) for k in {r["split"] for r in regions}}
    assert s["patients"]["total"] == 6 and sum(s["patients"]["by_split"].values()) == 6
    images = _arrow(corpus_dir, "images", ["caption_report_source"]).to_pylist()
    assert s["images"]["by_report_source"] == {"template": len(images)}  # no reports given
    assert s["images"]["by_annotation_status"] == {"null": len(images)}
    assert s["regions"]["by_caption_provenance"] == {
        "template": sum(r["caption_region"] is not None for r in regions),
        **({"null": n} if (n := sum(r["caption_region"] is None for r in regions)) else {})}


def test_open_rejects_non_corpus(tmp_path, corpus_dir):
    with pytest.raises(CorpusError, match="not a directory"):
        Corpus.open(tmp_path / "missing")
    with pytest.raises(CorpusError, match="no manifest.json"):
        Corpus.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="unreadable manifest"):
        Corpus.open(tmp_path)
    root = copy_corpus(corpus_dir, tmp_path / "c")
    next((root / "regions").glob("shard-*.parquet")).unlink()
    with pytest.raises(CorpusError, match="missing"):
        Corpus.open(root)


def test_duckdb_reads_every_table_unchanged(corpus_dir):
    """Through the documented views over the manifest's files (never a glob)."""
    duckdb = pytest.importorskip("duckdb")
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    keys = {"files": "file_key", "series": "unit_key", "images": "image_id",
            "regions": "region_id"}
    con = duckdb.connect()
    con.execute(duckdb_views(Corpus.open(corpus_dir)))
    for table, key in keys.items():
        n = con.sql(f"select count(*) from {table}").fetchall()[0][0]
        assert n == manifest["rows"][table]
        rel = con.sql(f"select * from {table} order by {key}")
        ours = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        ref = _arrow(corpus_dir, table)
        ref = ref.take(pa.compute.sort_indices(ref, [(key, "ascending")]))
        assert ours.column_names == ref.column_names
        assert ours.to_pylist() == ref.to_pylist()


# -- browse-catalog ------------------------------------------------------------------------------

def test_browse_catalog_prints_summary_and_sample(corpus_dir, capsys):
    assert browse([str(corpus_dir), "--where", "label = 'liver'", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "rows per table" in out and "regions by label" in out
    assert "sample of 4 of" in out and "liver" in out
    sample = out.split("sample of 4 of", 1)[1]
    assert "spleen" not in sample and "aorta" not in sample


def test_browse_catalog_json_summary(corpus_dir, capsys):
    assert browse([str(corpus_dir), "--json", "--limit", "0"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.index("\n}\n") + 2])
    assert summary["rows"]["regions"] == Corpus.open(corpus_dir).count("regions")


@pytest.mark.parametrize("where, message", [
    ("label = ", "cannot parse"), ("nope = 'x'", "nope"), ("area_mm2 * 2", "not a boolean")])
def test_browse_catalog_bad_where(corpus_dir, capsys, where, message):
    assert browse([str(corpus_dir), "--where", where]) == 2
    err = capsys.readouterr().err
    assert "browse-catalog: error: --where" in err and message in err


def test_browse_catalog_bad_dir(tmp_path, capsys):
    assert browse([str(tmp_path / "nothing")]) == 2
    assert "browse-catalog: error: DIR" in capsys.readouterr().err
    assert browse([str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
