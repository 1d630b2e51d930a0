"""The corpus format: table schemas, exactly-once shard commits, the manifest, committed files.

Every table is written against one schema constant below (tests import them). ``DIR`` is a
local folder or an ``s3://`` / ``gs://`` prefix (``pipeline.storage``); the protocol is the
same on both. A shard is committed by writing each non-empty table file under an
attempt-unique name, ``DIR/<table>/<shard>.parquet`` (``<shard>.rN.parquet`` for the N-th
rebuild of a shard; a committed file is never overwritten), and writing
``DIR/_commits/<shard>.json`` last: per table its row count and, when it has rows, its file
and sha256 (an empty table has no file); the unit keys it covers; its status counts. Writing
that marker is the commit, the one atomic act (:func:`pipeline.storage.put_bytes`: locally a
temporary name, fsync and rename; on an object store, which has no rename, one PUT of a small
object). A rebuilt shard's new marker replaces the old one in that one act, and only then are
the old files deleted: a reader sees one attempt or the other, never both. A shard with no
marker is not committed and is redone; files no marker lists are never read.

``manifest.json`` (the markers' summary, rewritten atomically by the build and by compaction)
is what readers trust: :func:`committed_files` gives a table's committed files from it, and
every reader (trainer, evaluator, catalogs, checks) uses it, never a glob over a table folder.
``README.md`` (a dataset card whose ``configs:`` list the same files, for Hugging Face
``datasets``) is rewritten with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # HF datasets Image

FILES_SCHEMA = pa.schema([
    ("file_key", pa.string()),
    ("shard", pa.int32()),
    ("unit_key", pa.string()),
    ("kind", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("error", pa.string()),
    ("size_bytes", pa.int64()),
])

SERIES_SCHEMA = pa.schema([
    ("series_key", pa.string()),
    ("unit_key", pa.string()),
    ("patient_key", pa.string()),
    ("study_key", pa.string()),
    ("split", pa.string()),
    ("modality", pa.string()),
    ("modality_source", pa.string()),
    ("shape", pa.list_(pa.int32())),
    ("spacing_mm", pa.list_(pa.float64())),
    ("affine", pa.list_(pa.float64())),
    ("n_files", pa.int32()),
    ("n_images", pa.int32()),
    ("label_source", pa.string()),
    ("label_names", pa.list_(pa.string())),
    ("body_part", pa.string()),
    ("manufacturer", pa.string()),
    ("slice_thickness_mm", pa.float64()),
    ("kvp", pa.float64()),
    ("contrast", pa.bool_()),
    ("study_date_shifted", pa.string()),
    ("inverted_monochrome1", pa.bool_()),
    ("color_to_luminance", pa.bool_()),
    ("geometry_known", pa.bool_()),
    ("resampled", pa.string()),
    ("projection", pa.bool_()),  # 2D projection image (CR, DX, MG, US, ...): no 3D geometry
    ("spacing_known", pa.bool_()),  # PixelSpacing / ImagerPixelSpacing present
    ("view_position", pa.string()),  # ViewPosition defined term (AP, PA, LL, CC, MLO, ...)
    ("patient_orientation", pa.list_(pa.string())),  # [row dir, column dir], e.g. ["L", "F"]
    ("image_laterality", pa.string()),  # ImageLaterality L / R / B / U (else Laterality L / R)
    ("voi_source", pa.string()),  # header display range: "window", "lut" or null
    ("voi_function", pa.string()),  # VOILUTFunction of the window (LINEAR, LINEAR_EXACT, ...)
    ("voi_min", pa.float64()),  # header display range on the volume's values
    ("voi_max", pa.float64()),
    ("deid_key_id", pa.string()),
])

def _hf_feature(t: pa.DataType) -> dict:
    """Hugging Face `datasets` feature description of an Arrow type (scalars and lists)."""
    if pa.types.is_list(t):
        return {"feature": _hf_feature(t.value_type), "_type": "List"}
    if pa.types.is_struct(t):
        return {f.name: _hf_feature(f.type) for f in t}
    names = {pa.string(): "string", pa.binary(): "binary", pa.bool_(): "bool"}
    return {"dtype": names.get(t, str(t)), "_type": "Value"}


def with_hf_image_metadata(schema: pa.Schema, image_column: str = "image") -> pa.Schema:
    """Schema metadata that makes `datasets` (and the Hub viewer) read ``image_column`` as an
    Image feature: the {bytes, path} struct is exactly datasets.Image's storage."""
    features = {f.name: _hf_feature(f.type) for f in schema}
    features[image_column] = {"_type": "Image"}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return schema.with_metadata(meta)


IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("unit_key", pa.string()),
    ("series_key", pa.string()),
    ("patient_key", pa.string()),
    ("study_key", pa.string()),
    ("split", pa.string()),
    ("modality", pa.string()),
    ("plane", pa.string()),
    ("slice_index", pa.int32()),
    ("window", pa.string()),
    ("window_min", pa.float64()),
    ("window_max", pa.float64()),
    ("bits", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("pixel_to_ras", pa.list_(pa.float64())),
    ("pixel_spacing_mm", pa.list_(pa.float64())),
    ("slice_thickness_mm", pa.float64()),
    ("label_values", pa.list_(pa.int32())),
    ("contrast", pa.bool_()),
    ("body_part", pa.string()),
    ("caption_summary", pa.string()),
    ("caption_report", pa.string()),
    ("caption_version", pa.string()),
    ("caption_report_source", pa.string()),  # report (the study's report) | template
    ("annotation_status", pa.string()),  # findings | no_finding (annotation tables) | null
    ("image", IMAGE_STRUCT),
])
IMAGES_SCHEMA = with_hf_image_metadata(IMAGES_SCHEMA)

RLE_STRUCT = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])  # COCO RLE

ATTRIBUTES_STRUCT = pa.struct([  # the checked facts captions are made from (docs/schema.md)
    ("label", pa.string()),
    ("is_lesion", pa.bool_()),
    ("laterality", pa.string()),
    ("location", pa.string()),
    ("location_relation", pa.string()),
    ("max_diameter_mm", pa.float64()),
    ("size_class", pa.string()),
    ("intensity_class", pa.string()),
    ("intensity_value", pa.float64()),
    ("intensity_unit", pa.string()),
    ("circularity", pa.float64()),
    ("elongation", pa.float64()),
    ("solidity", pa.float64()),
    ("shape_class", pa.string()),
    ("modality", pa.string()),
    ("plane", pa.string()),
    ("image_position", pa.string()),  # projection images: "upper left" ... of the image
])

REGIONS_SCHEMA = pa.schema([
    ("region_id", pa.string()),
    ("image_id", pa.string()),
    ("unit_key", pa.string()),
    ("series_key", pa.string()),
    ("patient_key", pa.string()),
    ("split", pa.string()),
    ("modality", pa.string()),
    ("plane", pa.string()),
    ("label", pa.string()),
    ("label_value", pa.int32()),
    ("source", pa.string()),
    ("bbox", pa.list_(pa.float64())),
    ("mask_rle", RLE_STRUCT),
    ("area_px", pa.int64()),
    ("area_mm2", pa.float64()),
    ("centroid_ras", pa.list_(pa.float64())),
    ("max_diameter_mm", pa.float64()),
    ("laterality", pa.string()),
    ("score", pa.float64()),
    ("segmenter", pa.string()),
    ("model_sha256", pa.string()),
    ("attributes", ATTRIBUTES_STRUCT),
    ("caption_region", pa.string()),
    ("negatives", pa.list_(pa.string())),
    ("negative_kinds", pa.list_(pa.string())),
    ("caption_version", pa.string()),
    ("caption_provenance", pa.string()),  # template | report+template
    ("report_sentence_id", pa.int32()),  # the report sentence in caption_region (else null)
    ("source_label", pa.string()),  # annotation tables: the collection's class name (vocabulary)
    ("reader_key", pa.string()),  # annotation tables: keyed reader id, null when fused / absent
    ("n_readers", pa.int32()),  # annotation tables: readers fused into this box
    ("annotation_box", pa.list_(pa.float64())),  # the annotator's XYXY box in image pixels
])

# The file index (``DIR/_index/files.parquet``, docs/schema.md): what discovery learned about
# each scanned DICOM file, so that a resume reads again only the headers of files that changed.
# No raw identifier: UIDs are keyed (HMAC) as discovery keys them; it is not a corpus table.
FILE_INDEX_VERSION = "2"  # 2: the keyed join keys of annotation tables and reports
FILE_INDEX_SCHEMA = pa.schema([
    ("file_key", pa.string()),
    ("size_bytes", pa.int64()),
    ("mtime_ns", pa.int64()),  # modification time (an object store's LastModified)
    ("status", pa.string()),  # the header scan's verdict when it settled the file, else null
    ("reason", pa.string()),
    ("error", pa.string()),
    ("group_key", pa.string()),  # unit key of its series and geometry
    ("header_kind", pa.string()),  # image | rtstruct | seg | other; null: no header read
    ("sop_class", pa.string()),
    ("series_uid_key", pa.string()),
    ("referenced_series_key", pa.string()),
    ("modality", pa.string()),
    ("rows", pa.int64()),
    ("cols", pa.int64()),
    ("frames", pa.int64()),
    ("samples", pa.int64()),
    ("bits_allocated", pa.int64()),
    ("transfer_syntax", pa.string()),
    ("iop", pa.list_(pa.float64())),
    ("ipp", pa.list_(pa.float64())),
    ("instance_number", pa.int64()),
    ("enhanced", pa.bool_()),
    ("has_pixels", pa.bool_()),
    ("burned_in", pa.bool_()),
    ("sop_uid", pa.string()),  # keyed SOPInstanceUID ("" when absent), as key_header keys it
    ("study_uid", pa.string()),  # keyed StudyInstanceUID
    ("accession", pa.string()),  # keyed AccessionNumber
    ("patient_date", pa.string()),  # keyed "<PatientID>|<StudyDate>"
])

SCHEMAS = {"files": FILES_SCHEMA, "series": SERIES_SCHEMA, "images": IMAGES_SCHEMA,
           "regions": REGIONS_SCHEMA}
ROW_GROUP_ROWS = {"files": 65536, "series": 4096, "images": 256, "regions": 16384,
                  "file_index": 65536}


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (shards, model checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` (local or remote) in one atomic act: :func:`storage.put_bytes`."""
    storage.put_bytes(path, data)


def _write_to(sink, data, schema: pa.Schema | None, kw: dict) -> None:
    """``data`` (a table, or record batches of ``schema``) as Parquet into ``sink``."""
    if isinstance(data, pa.Table):
        pq.write_table(data, sink, **kw)
        return
    rows = kw.pop("row_group_size")
    with pq.ParquetWriter(sink, schema, compression=kw["compression"],
                          write_statistics=kw["write_statistics"]) as writer:
        for batch in data:
            writer.write_batch(batch, row_group_size=rows)


def _write_parquet(path, data, table: str, schema: pa.Schema | None = None) -> str:
    """Write ``data`` (a table, or record batches of ``schema``, written as they come) to
    ``path`` whole → its sha256. Locally a temporary name, fsync, rename; remotely the file is
    encoded in memory (a shard's table: megabytes) and PUT once."""
    kw = {"compression": "zstd", "row_group_size": ROW_GROUP_ROWS[table],
          "write_statistics": True}
    if storage.is_remote(path):
        sink = pa.BufferOutputStream()
        _write_to(sink, data, schema, kw)
        body = sink.getvalue().to_pybytes()
        storage.put_bytes(path, body)
        return hashlib.sha256(body).hexdigest()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_to(str(tmp), data, schema, kw)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return file_sha256(path)


def write_table(path, rows: list[dict], table: str) -> dict:
    """Write ``rows`` as one Parquet file (zstd) against ``SCHEMAS[table]``, atomically →
    {rows, sha256, file}. No rows: no file (``path`` removed if an unfinished attempt left
    one) → {rows: 0}. ``path``: a local path or a URI (``DIR/<table>/<name>``)."""
    if not rows:
        storage.delete(path)
        return {"rows": 0}
    data = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
    sha = _write_parquet(path, data, table)
    parts = str(path).replace(os.sep, "/").rsplit("/", 2)
    return {"rows": data.num_rows, "sha256": sha, "file": f"{parts[-2]}/{parts[-1]}"}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_number(name: str) -> int | None:
    """k of ``shard-XXXXX`` (None for discovery and compact shards)."""
    head, _, digits = name.partition("-")
    return int(digits) if head == "shard" and digits.isdigit() else None


def table_file(out, table: str, name: str, attempt: int = 0):
    """Where attempt ``attempt`` of shard ``name`` writes ``table`` (a Path, or a URI)."""
    return storage.join(out, table, f"{name}.parquet" if attempt == 0
                        else f"{name}.r{attempt}.parquet")


def corpus_file(corpus, rel: str):
    """A file of the corpus from its path relative to it (as markers and the manifest list
    it): a Path for a local corpus, a URI string for a remote one; both open with pyarrow
    (``pq.ParquetFile``, ``pq.read_table``) and Polars as they are."""
    return storage.join(corpus, *rel.split("/"))


def unit_digest(file_keys: Iterable[str]) -> str:
    """Key of a unit's set of files (its file keys, sorted): a changed set changes it."""
    return hashlib.sha256("\n".join(sorted(file_keys)).encode()).hexdigest()[:16]


def commit_shard(out: Path, name: str, tables: dict[str, list[dict]], stats: dict | None = None,
                 units: dict[str, str] | None = None, attempt: int = 0,
                 supersedes: Iterable[str] = ()) -> dict:
    """Write every table of shard ``name`` (attempt ``attempt``), then its commit marker, then
    delete ``supersedes`` (files of the attempt this one replaces, relative to ``out``).
    ``units``: unit key → :func:`unit_digest` of the units it covers. Returns the marker.
    When ``stats`` has ``stage_s``, the seconds spent writing the tables join it as ``commit``."""
    t0 = time.perf_counter()
    files = {t: write_table(table_file(out, t, name, attempt), rows, t)
             for t, rows in tables.items()}
    stats = dict(stats or {})
    if "stage_s" in stats:
        stats["stage_s"] = {**stats["stage_s"], "commit": round(time.perf_counter() - t0, 3)}
    marker = {"shard": name, "attempt": attempt, "tables": files, "stats": stats,
              "units": dict(sorted((units or {}).items()))}
    storage.makedirs(storage.join(out, "_commits"))
    storage.put_bytes(storage.join(out, "_commits", f"{name}.json"),
                      json.dumps(marker, indent=1).encode())  # the commit
    keep = {info.get("file") for info in files.values()}
    for rel in supersedes:
        if rel not in keep:
            storage.delete(corpus_file(out, rel))
    return marker


def marker_files(marker: dict) -> list[str]:
    """Files (relative to the corpus) of a marker or manifest shard entry; empty tables have none."""
    return [info["file"] for info in marker.get("tables", {}).values() if info.get("file")]


def committed_shards(out: Path) -> tuple[dict[str, dict], set[str]]:
    """(markers of shards whose files all exist, names of shards a compaction replaced): the
    writer's view, from ``_commits/`` (readers use :func:`committed_files`).

    A marker is written only after its files. A compact shard's marker (catalogs.jobs) lists
    the shards it ``replaces``: they count as committed and leave the set of markers."""
    markers = [json.loads(storage.read_bytes(storage.uri_of(out, info.path)))
               for info in storage.list_files(storage.join(out, "_commits"))
               if info.base_name.endswith(".json")]
    fs, root = storage.resolve(out)
    listed = [f"{root}/{f}" for m in markers for f in marker_files(m)]
    there = {i.path for i in fs.get_file_info(listed) if i.type == pafs.FileType.File}
    done = {}
    for marker in markers:
        if all(f"{root}/{f}" in there for f in marker_files(marker)):
            done[marker["shard"]] = marker
    replaced = {s for m in done.values() for s in m.get("replaces", ())}
    return {k: m for k, m in done.items() if k not in replaced}, replaced


def marker_units(out: Path, marker: dict) -> dict[str, str]:
    """Unit key → :func:`unit_digest` a committed shard covers: its marker's ``units``, or (a
    marker written before markers listed them) derived from its committed files table."""
    if "units" in marker:
        return marker["units"]
    info = marker.get("tables", {}).get("files", {})
    if not info.get("file"):
        return {}
    rows = pq.read_table(corpus_file(out, info["file"]),
                         columns=["unit_key", "file_key"]).to_pylist()
    keys: dict[str, list[str]] = {}
    for r in rows:
        if r["unit_key"] is not None:
            keys.setdefault(r["unit_key"], []).append(r["file_key"])
    return {k: unit_digest(v) for k, v in sorted(keys.items())}


def read_manifest(corpus) -> dict:
    """``corpus/manifest.json`` (local or remote corpus); ValueError when there is none (not a
    corpus, or no shard committed yet)."""
    try:
        return json.loads(storage.read_bytes(storage.join(corpus, "manifest.json")))
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"{corpus}: no manifest.json (not a corpus written by build-corpus, "
                         "or the build has not committed a shard yet)") from None


def committed_tables(corpus, manifest: dict | None = None) -> dict[str, dict]:
    """Committed shard name → {table: file} (tables with rows only), in shard-name order, from
    the manifest (``manifest``, else ``corpus/manifest.json``). A shard some listed compact
    shard ``replaces`` is left out; a file listed nowhere is never returned. Files are
    :func:`corpus_file` locations: Paths for a local corpus, URI strings (``s3://...``) for a
    remote one; ``pq.ParquetFile(f)`` and ``pl.scan_parquet(str(f))`` open either."""
    if not storage.is_remote(corpus):
        corpus = Path(corpus)
    shards = (read_manifest(corpus) if manifest is None else manifest).get("shards", {})
    replaced = {s for m in shards.values() for s in m.get("replaces", ())}
    return {name: {t: corpus_file(corpus, info["file"])
                   for t, info in shards[name].get("tables", {}).items() if info.get("file")}
            for name in sorted(shards) if name not in replaced}


def committed_files(corpus, table: str, manifest: dict | None = None) -> list:
    """The committed files of ``table``, in shard-name order: the one list every reader of a
    corpus uses (see :func:`committed_tables`)."""
    return [files[table] for files in committed_tables(corpus, manifest).values()
            if table in files]


CARD_TABLES = ("images", "regions", "series", "files")
CARD_SPLIT = "corpus"  # each config's one split: all rows (their ``split`` column: train/val/test)


def dataset_card(manifest: dict) -> str:
    """``README.md`` for Hugging Face ``datasets``: one config per table listing its committed
    files (``load_dataset(DIR, "regions")``); tables without rows are left out."""
    lines = ["---", "configs:"]
    for table in CARD_TABLES:
        files = committed_files(Path("."), table, manifest)
        if files:
            lines += [f"- config_name: {table}", "  data_files:", f"  - split: {CARD_SPLIT}",
                      "    path:", *(f"    - {f.as_posix()}" for f in files)]
    lines += ["---", "", "# Region-level corpus (build-corpus)", "",
              "Written by `build-corpus`; this card is rewritten with `manifest.json` and lists "
              "the same committed files.", "",
              "```python", "import datasets",
              'regions = datasets.load_dataset(CORPUS_DIR, "regions", split="corpus")',
              'images = datasets.load_dataset(CORPUS_DIR, "images", split="corpus")',
              "train = regions.filter(lambda r: r['split'] == 'train')", "```", "",
              f"The one split, `{CARD_SPLIT}`, holds every row; each row's `split` column "
              "(train / val / test, per de-identified patient) is the split to use. Columns: "
              "docs/schema.md.", ""]
    if not any(line.startswith("- config_name") for line in lines):
        lines[1] = "configs: []"
    return "\n".join(lines)


def write_manifest(out, manifest: dict) -> None:
    """``manifest.json`` atomically, then the dataset card ``README.md`` from it."""
    storage.put_bytes(storage.join(out, "manifest.json"),
                      json.dumps(manifest, indent=1, sort_keys=True).encode())
    storage.put_bytes(storage.join(out, "README.md"), dataset_card(manifest).encode())


def remove_stale_temporaries(out) -> int:
    """Delete temporary files a killed run left behind (never a committed file). An object
    store has none: objects are PUT whole under their final names."""
    if storage.is_remote(out):
        return 0
    out, n = Path(out), 0
    for path in out.glob("*/.*.tmp-*"):
        path.unlink(missing_ok=True)
        n += 1
    for path in out.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
        n += 1
    return n


def read_table(corpus, table: str, columns: list[str] | None = None) -> list[dict]:
    """Rows of ``table`` in the committed files of ``corpus`` (:func:`committed_files`)."""
    files = committed_files(corpus, table)
    if not files:
        return []
    tables = [pq.read_table(f) for f in files]
    data = pa.concat_tables(tables, promote_options="default")
    if columns is not None:
        data = data.select([c for c in columns if c in data.column_names])
    return data.to_pylist()


def file_index_path(out):
    """Where the file index of the corpus at ``out`` lives."""
    return storage.join(out, "_index", "files.parquet")


def write_file_index(out, rows, key_id: str) -> None:
    """Replace the file index in one atomic act (local: temporary name, fsync, rename; object
    store: one PUT), tagged with its version and the de-identification key's id. ``rows``:
    row dicts, one list per column, or an iterator of ``FILE_INDEX_SCHEMA`` record batches
    (written as they come)."""
    meta = {b"file_index_version": FILE_INDEX_VERSION.encode(), b"deid_key_id": key_id.encode()}
    schema = FILE_INDEX_SCHEMA.with_metadata(meta)
    if isinstance(rows, dict):
        data = pa.Table.from_pydict(rows, schema=schema)
    elif isinstance(rows, list):
        data = pa.Table.from_pylist(rows, schema=schema)
    else:
        data = (batch.replace_schema_metadata(meta) for batch in rows)
    _write_parquet(file_index_path(out), data, "file_index", schema)


@contextmanager
def open_file_index(out, key_id: str, batch_rows: int = 16384):
    """The file index as an iterator of record batches of ``batch_rows`` rows (the whole
    table is never in memory at once), or None when there is none, it cannot be read, or it
    was written by another index version, under another key or against another schema: not
    trusted, every header is read again."""
    fs, path = storage.resolve(file_index_path(out))
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            yield None
            return
        f = fs.open_input_file(path)  # one file: no dataset machinery to import
    except (OSError, pa.ArrowException):
        yield None
        return
    with f:
        try:
            data = pq.ParquetFile(f)
            schema = data.schema_arrow
        except (OSError, pa.ArrowException):
            yield None
            return
        meta = schema.metadata or {}
        if (meta.get(b"file_index_version") != FILE_INDEX_VERSION.encode()
                or meta.get(b"deid_key_id") != key_id.encode()
                or not schema.remove_metadata().equals(FILE_INDEX_SCHEMA)):
            yield None
            return
        yield data.iter_batches(batch_size=batch_rows)


def read_file_index(out, key_id: str) -> pa.Table | None:
    """:func:`open_file_index` as one table (tests, small indexes), or None."""
    with open_file_index(out, key_id) as batches:
        if batches is None:
            return None
        try:
            return pa.Table.from_batches(list(batches), FILE_INDEX_SCHEMA)
        except (OSError, pa.ArrowException):
            return None
