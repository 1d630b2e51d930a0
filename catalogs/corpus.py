"""Interactive, single-node queries over a corpus written by ``build-corpus`` (Polars, lazy).

``Corpus.open(DIR)`` reads ``DIR/manifest.json`` and scans only the Parquet files of committed
shards it lists (``pipeline.write.committed_files``: a half-written or stray file in
``DIR/<table>/`` is never read). Every table is a :class:`polars.LazyFrame`; nothing is read
until ``.collect()``, and Polars pushes column selections and filters down into the Parquet
reader. Other engines get the same file list: ``python -m catalogs.corpus files DIR TABLE``
prints it, ``python -m catalogs.corpus duckdb DIR`` prints DuckDB views over it
(:func:`duckdb_views`).

Tables (columns and dtypes are those of ``pipeline.write.SCHEMAS``, documented in
docs/schema.md; columns added later — e.g. ``caption_summary``, ``caption_report`` on images,
``caption_region``, ``negatives``, ``negative_kinds`` on regions — appear when any shard has
them and are null for shards written before):

* ``files``   one row per filesystem entry (``file_key``, ``status``, ``reason``, ...)
* ``series``  one row per assembled volume (``patient_key``, ``split``, ``modality``, ...)
* ``images``  one row per 2D image; the PNG lives in the struct column ``image``
  {bytes: binary, path: str}, which is *dropped from the scan* unless ``with_pixels=True``
* ``regions`` one row per region: ``bbox`` list[f64] [x0, y0, x1, y1] in pixel-edge
  coordinates, ``mask_rle`` struct {size: list[i32] [H, W], counts: str} (COCO RLE), ...

    >>> c = Corpus.open("data/corpus")
    >>> c.table("regions").filter(pl.col("label") == "liver").collect()
    >>> c.filter("label = 'liver' AND area_mm2 > 100").collect()
    >>> c.region_stats(by=("label", "split"))
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalogs.base import PIXEL_COLUMN, CorpusError  # noqa: F401  (re-exported)
from pipeline import storage
from pipeline.write import SCHEMAS, committed_files, committed_tables

TABLES = ("files", "series", "images", "regions")
KEY_COLUMNS = {"files": "file_key", "series": "unit_key", "images": "image_id",
               "regions": "region_id"}
# Image columns carried into regions_with_images() (those not already on regions).
IMAGE_CONTEXT = ("study_key", "slice_index", "window", "height", "width", "pixel_to_ras",
                 "pixel_spacing_mm", "slice_thickness_mm", "label_values", "body_part",
                 "caption_summary", "caption_report")
OPTIONAL_COLUMNS = {"images": ("caption_summary", "caption_report"),
                    "regions": ("caption_region", "negatives", "negative_kinds")}


def _read_manifest(path) -> dict:
    """The manifest at ``path`` (a local path or a URI: ``pipeline.storage``)."""
    try:
        manifest = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise CorpusError(f"{path}: no manifest.json (not a corpus written by "
                          "build-corpus, or the build has not committed a shard yet)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise CorpusError(f"{path}: manifest has no 'shards' mapping")
    return manifest


def _unified_schema(paths: Sequence[Path], table: str) -> pa.Schema:
    """Union of the files' schemas (shards written before a column was added lack it)."""
    schemas = [pq.read_schema(p) for p in paths] or [SCHEMAS[table]]
    if all(s.equals(schemas[0]) for s in schemas[1:]):
        return schemas[0]
    return pa.unify_schemas(schemas, promote_options="permissive")


@dataclass
class Corpus:
    """A committed corpus, on disk or in object storage (``s3://``, ``gs://``). Build with
    :meth:`open`."""

    root: Path | str  # a local folder, or a URI string for a remote corpus
    manifest: dict
    _schemas: dict[str, pa.Schema] = field(default_factory=dict, repr=False)

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path, manifest: str | Path | None = None) -> Corpus:
        """Open ``root``; ``manifest`` overrides ``root/manifest.json`` (file paths in it stay
        relative to ``root``). Raises :class:`CorpusError` when it is not a corpus or a
        committed file is missing."""
        root = storage.location(root)
        if not storage.is_dir(root):
            raise CorpusError(f"{root}: not a directory")
        corpus = cls(root, _read_manifest(storage.location(manifest) if manifest
                                          else storage.join(root, "manifest.json")))
        listed = [p for table in TABLES for p in corpus.files(table)]
        for p in storage.missing(listed):
            raise CorpusError(f"{p}: listed in the manifest but missing")
        return corpus

    # -- layout ------------------------------------------------------------------------------

    def shard_names(self) -> list[str]:
        """Committed shard names, sorted (``discovery*`` hold only files rows)."""
        return list(committed_tables(self.root, self.manifest))

    def files(self, table: str) -> list:
        """Parquet files of ``table`` in committed shards, in shard-name order (tables without
        rows have none): :func:`pipeline.write.committed_files` (Paths, or URI strings for a
        remote corpus)."""
        _check_table(table)
        return committed_files(self.root, table, self.manifest)

    def manifest_rows(self, table: str) -> int:
        """Row count of ``table`` according to the manifest's shard entries."""
        _check_table(table)
        return sum(self.manifest["shards"][s].get("tables", {}).get(table, {}).get("rows", 0)
                   for s in self.shard_names())

    def arrow_schema(self, table: str) -> pa.Schema:
        """Arrow schema of ``table`` (union over its committed files)."""
        _check_table(table)
        if table not in self._schemas:
            self._schemas[table] = _unified_schema(self.files(table), table)
        return self._schemas[table]

    def columns(self, table: str) -> list[str]:
        return list(self.arrow_schema(table).names)

    # -- tables ------------------------------------------------------------------------------

    def table(self, name: str, *, with_pixels: bool = False) -> pl.LazyFrame:
        """Lazy scan of one table over its committed files. ``images`` comes without its
        ``image`` (PNG bytes) column unless ``with_pixels=True``: the column is projected away
        in the scan, so its bytes are never read or decoded."""
        _check_table(name)
        arrow = self.arrow_schema(name)
        schema = pl.from_arrow(arrow.empty_table()).schema
        paths = self.files(name)
        if paths:
            lf = pl.scan_parquet([str(p) for p in paths], schema=schema,
                                 missing_columns="insert", extra_columns="ignore")
        else:
            lf = pl.LazyFrame(schema=schema)
        if name == "images" and not with_pixels and PIXEL_COLUMN in schema:
            lf = lf.select([c for c in schema if c != PIXEL_COLUMN])
        return lf

    def images(self, with_pixels: bool = False) -> pl.LazyFrame:
        """``images`` table; see :meth:`table`."""
        return self.table("images", with_pixels=with_pixels)

    def regions(self) -> pl.LazyFrame:
        return self.table("regions")

    def regions_with_images(self) -> pl.LazyFrame:
        """Regions left-joined on ``image_id`` to their image's metadata (never its pixels).

        Columns: every regions column, then the image columns not already on regions —
        study_key str, slice_index i32, window str, height i32, width i32, pixel_to_ras
        list[f64], pixel_spacing_mm list[f64], slice_thickness_mm f64, label_values list[i32],
        and body_part, caption_summary, caption_report (str) when the images table has them.
        One row per region (image_id is unique in images)."""
        regions = self.table("regions")
        have = set(regions.collect_schema().names())
        image_cols = self.images().collect_schema().names()
        extra = [c for c in IMAGE_CONTEXT if c in image_cols and c not in have]
        right = self.images().select(["image_id", *extra])
        return regions.join(right, on="image_id", how="left", maintain_order="left")

    # -- queries -----------------------------------------------------------------------------

    def filter(self, where: str, table: str = "regions_with_images") -> pl.LazyFrame:
        """Rows of ``table`` (a table name or ``regions_with_images``) matching ``where``, a SQL
        boolean expression parsed by :func:`polars.sql_expr`, e.g.
        ``"label = 'liver' AND area_mm2 > 100"`` or ``"split IN ('val', 'test')"``.
        Raises :class:`CorpusError` for a malformed expression or an unknown column."""
        lf = self._frame(table)
        return lf.filter(parse_where(where, lf))

    def sample(self, n: int, seed: int = 0, where: str | None = None,
               table: str = "regions_with_images") -> pl.DataFrame:
        """``n`` rows (fewer if fewer match) drawn uniformly without replacement, the same
        rows for the same corpus and seed whatever the file order. Only the key column is read
        to draw; the rows are then fetched by key. Returned sorted by key."""
        if n < 0:
            raise CorpusError(f"sample size must be >= 0, got {n}")
        lf = self.filter(where, table) if where else self._frame(table)
        key = KEY_COLUMNS["regions" if table == "regions_with_images" else table]
        keys = lf.select(key).collect().get_column(key).sort()
        if n < len(keys):
            keys = keys.sample(n, seed=seed, shuffle=False).sort()
        return lf.filter(pl.col(key).is_in(keys.implode())).sort(key).collect()

    def region_stats(self, by: Iterable[str] = ("label", "modality", "split"),
                     where: str | None = None) -> pl.DataFrame:
        """Per-group region statistics, sorted by ``by``. Columns: the ``by`` columns, then
        n_regions u32, n_images u32, n_patients u32, area_mm2_mean f64, area_mm2_median f64,
        area_mm2_sum f64, max_diameter_mm_mean f64, max_diameter_mm_max f64, score_mean f64
        (null when no region of the group has a score). ``by`` may name image columns
        (e.g. ``window``, ``plane``)."""
        by = list(by)
        lf = self.filter(where) if where else self._frame("regions_with_images")
        missing = [c for c in by if c not in lf.collect_schema().names()]
        if missing:
            raise CorpusError(f"region_stats: unknown column(s) {missing}")
        return (lf.group_by(by).agg(
            n_regions=pl.len(),
            n_images=pl.col("image_id").n_unique(),
            n_patients=pl.col("patient_key").n_unique(),
            area_mm2_mean=pl.col("area_mm2").mean(),
            area_mm2_median=pl.col("area_mm2").median(),
            area_mm2_sum=pl.col("area_mm2").sum(),
            max_diameter_mm_mean=pl.col("max_diameter_mm").mean(),
            max_diameter_mm_max=pl.col("max_diameter_mm").max(),
            score_mean=pl.col("score").mean(),
        ).sort(by, nulls_last=True).collect())

    def count(self, table: str) -> int:
        return int(self._frame(table).select(pl.len()).collect().item())

    def summary(self) -> dict:
        """Plain-dict overview (JSON-serialisable): rows per table (read from the files) and
        the manifest's counts; files per status, per reason and per status/reason; series,
        images and regions per split / modality (images also per plane, report-caption source
        and annotation status; regions per label, source and caption provenance); patients per
        split."""
        def counts(lf: pl.LazyFrame, col: str) -> dict:
            df = lf.group_by(col).agg(pl.len()).sort(col, nulls_last=True).collect()
            return {("null" if k is None else str(k)): int(v) for k, v in df.iter_rows()}

        def provenance(lf: pl.LazyFrame, cols: dict[str, str]) -> dict:
            """Counts of the columns a corpus built before them does not have: skipped there."""
            have = set(lf.collect_schema().names())
            return {key: counts(lf, col) for key, col in cols.items() if col in have}

        files, series, images, regions = (self._frame(t) for t in TABLES)
        status_reason = (files.group_by("status", "reason").agg(pl.len())
                         .sort("status", "reason").collect())
        patients = (series.select("patient_key", "split").unique().group_by("split")
                    .agg(pl.len()).sort("split").collect())
        return {
            "root": str(self.root),
            "pipeline_version": self.manifest.get("pipeline_version"),
            "complete": self.manifest.get("complete"),
            "shards": len([s for s in self.shard_names() if not s.startswith("discovery")]),
            "rows": {t: self.count(t) for t in TABLES},
            "manifest_rows": {t: self.manifest_rows(t) for t in TABLES},
            "files": {
                "by_status": counts(files, "status"),
                "by_reason": counts(files, "reason"),
                "by_status_reason": {f"{s}/{r}": int(n) for s, r, n in status_reason.iter_rows()},
            },
            "series": {"by_split": counts(series, "split"),
                       "by_modality": counts(series, "modality")},
            "images": {"by_split": counts(images, "split"),
                       "by_modality": counts(images, "modality"),
                       "by_plane": counts(images, "plane"),
                       **provenance(images, {"by_report_source": "caption_report_source",
                                             "by_annotation_status": "annotation_status"})},
            "regions": {"by_split": counts(regions, "split"),
                        "by_label": counts(regions, "label"),
                        "by_modality": counts(regions, "modality"),
                        "by_source": counts(regions, "source"),
                        **provenance(regions, {"by_caption_provenance": "caption_provenance"})},
            "patients": {"total": int(series.select(pl.col("patient_key").n_unique())
                                      .collect().item()),
                         "by_split": {str(k): int(v) for k, v in patients.iter_rows()}},
        }

    def iter_image_bytes(self, columns: Sequence[str] = ("image_id",),
                         ids: Iterable[str] | None = None, batch_rows: int = 64):
        """Yield ``(row, png_bytes)`` per image, ``row`` a dict of ``columns``, streaming each
        committed images file in batches of ``batch_rows`` (memory stays bounded). With
        ``ids``, only those image_ids are yielded."""
        for path in self.files("images"):
            yield from iter_image_file(path, columns, ids, batch_rows)

    # -- regions as arrays (catalogs/regions.py) -----------------------------------------------

    def region(self, region_id: str, margin_px: int = 8):
        """The region ``region_id`` as a :class:`catalogs.regions.Region`: its row, the stored
        image (H, W) uint8/uint16, mask (H, W) bool, box (4,) float32 XYXY pixel-edge, and crop
        / crop_mask cut to the box grown by ``margin_px`` (clipped) at ``crop_origin`` (x0, y0).
        Reads one regions row and one image's PNG (scans filtered on the id). KeyError when
        no committed region has that id."""
        from catalogs.regions import load_region

        return load_region(self, region_id, margin_px)

    def iter_regions(self, where: str | None = None, split: str | None = None,
                     limit: int | None = None, margin_px: int = 8):
        """Iterator of :class:`catalogs.regions.Region` (see :meth:`region`) for the regions
        matching ``where`` (SQL condition, as :meth:`filter`) and ``split``, at most ``limit``,
        in corpus order. Images are fetched by image_id in batches and each is decoded once per
        run of consecutive regions on it."""
        from catalogs.regions import iter_region_objects, region_rows

        return iter_region_objects(self, region_rows(self, where, split, limit), margin_px)

    # -- helpers -----------------------------------------------------------------------------

    def _frame(self, table: str) -> pl.LazyFrame:
        if table == "regions_with_images":
            return self.regions_with_images()
        return self.table(table)


def iter_image_file(path: str | Path, columns: Sequence[str] = ("image_id",),
                    ids: Iterable[str] | None = None, batch_rows: int = 64):
    """``(row, png_bytes)`` for each image of one images Parquet file (see
    :meth:`Corpus.iter_image_bytes`). Reads ``image_id``, ``columns`` and the PNG bytes only."""
    wanted = None if ids is None else pa.array(sorted(set(ids)), pa.string())
    cols = list(dict.fromkeys(["image_id", *columns]))
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[*cols, PIXEL_COLUMN]):
        if wanted is not None:
            keep = pc.is_in(batch.column("image_id"), value_set=wanted)
            if not pc.any(keep).as_py():
                continue
            batch = batch.filter(keep)
        pixels = pc.struct_field(batch.column(PIXEL_COLUMN), "bytes").to_pylist()
        meta = batch.select(cols).to_pylist()
        for row, png in zip(meta, pixels, strict=True):
            yield {c: row[c] for c in columns}, png


def _check_table(name: str) -> None:
    if name not in TABLES:
        raise CorpusError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")


def parse_where(where: str, lf: pl.LazyFrame | None = None) -> pl.Expr:
    """Parse a SQL boolean expression with :func:`polars.sql_expr`; with ``lf``, also resolve
    it against ``lf``'s schema (unknown columns, non-boolean results). Raises CorpusError."""
    if not where or not where.strip():
        raise CorpusError("empty --where expression")
    try:
        expr = pl.sql_expr(where)
    except Exception as e:  # polars raises several SQL error types
        raise CorpusError(f"cannot parse {where!r}: {_first_line(e)}") from None
    if lf is not None:
        try:
            dtype = lf.select(expr).collect_schema().dtypes()[0]
        except Exception as e:
            raise CorpusError(f"{where!r}: {_first_line(e)}") from None
        if dtype != pl.Boolean:
            raise CorpusError(f"{where!r}: not a boolean condition (it gives {dtype})")
    return expr


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def duckdb_views(corpus: Corpus) -> str:
    """SQL creating one DuckDB view per table over its committed files (never a glob), e.g.
    ``duckdb.sql(duckdb_views(Corpus.open(DIR)))`` then ``SELECT ... FROM regions``. A table
    without committed rows gets no view (a comment says so). A remote corpus's views name
    ``s3://`` URIs, which need DuckDB's httpfs extension; without it use
    :func:`duckdb_register`."""
    out = []
    for table in TABLES:
        paths = corpus.files(table)
        if paths:
            files = ", ".join("'" + _absolute(p).replace("'", "''") + "'" for p in paths)
            out.append(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM "
                       f"read_parquet([{files}], union_by_name = true);")
        else:
            out.append(f"-- {table}: no committed rows, no view")
    return "\n".join(out) + "\n"


def _absolute(p) -> str:
    return p if storage.is_remote(p) else str(Path(p).resolve())


def duckdb_register(corpus: Corpus, con=None):
    """One DuckDB view per table over its committed files, through pyarrow datasets (their
    filesystem is ``pipeline.storage``'s, so an ``s3://`` corpus is read without DuckDB's
    httpfs extension, with the same credentials and ``AWS_ENDPOINT_URL``) → the connection
    (a new in-memory one when ``con`` is None). Column selections and filters are pushed
    into the Parquet scan."""
    import duckdb
    import pyarrow.dataset as ds

    con = duckdb.connect() if con is None else con
    for table in TABLES:
        paths = corpus.files(table)
        if paths:
            fs, _ = storage.resolve(paths[0])
            data = ds.dataset([storage.resolve(p)[1] for p in paths], filesystem=fs,
                              schema=corpus.arrow_schema(table), format="parquet")
            con.register(table, data)
    return con


def main(argv: list[str] | None = None) -> int:
    """``python -m catalogs.corpus files DIR TABLE``: the committed files of a table, one per
    line; ``python -m catalogs.corpus duckdb DIR``: :func:`duckdb_views`."""
    p = argparse.ArgumentParser(prog="python -m catalogs.corpus", description=main.__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("files", help="committed files of one table, one per line")
    f.add_argument("corpus", type=storage.location)
    f.add_argument("table", choices=TABLES)
    d = sub.add_parser("duckdb", help="SQL: one DuckDB view per table over its committed files")
    d.add_argument("corpus", type=storage.location)
    args = p.parse_args(argv)
    try:
        corpus = Corpus.open(args.corpus)
    except CorpusError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.what == "files":
        print("\n".join(str(path) for path in corpus.files(args.table)))
    else:
        print(duckdb_views(corpus), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
