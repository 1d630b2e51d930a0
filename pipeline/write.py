"""The corpus format: table schemas, exactly-once shard commits, the manifest, committed rows.

Every table is written against one schema constant below (tests import them). A shard k is
committed by writing each table file to a temporary name, fsync, rename to
``DIR/<table>/shard-XXXXX.parquet``, and writing ``DIR/_commits/shard-XXXXX.json`` last (row
counts and sha256 of every file). ``manifest.json`` is rewritten atomically by the build (at
most every few seconds while shards commit, and once at the end; see
``pipeline.run.build``) and lists only committed shards. A shard with no marker is not
committed and is redone. :func:`read_table` reads the committed rows of one table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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
])

SCHEMAS = {"files": FILES_SCHEMA, "series": SERIES_SCHEMA, "images": IMAGES_SCHEMA,
           "regions": REGIONS_SCHEMA}
ROW_GROUP_ROWS = {"files": 65536, "series": 4096, "images": 256, "regions": 16384}


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (shards, model checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_table(path: Path, rows: list[dict], table: str) -> dict:
    """Write ``rows`` as one Parquet file (zstd) against ``SCHEMAS[table]``, atomically."""
    schema = SCHEMAS[table]
    data = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(data, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS[table],
                   write_statistics=True)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"rows": data.num_rows, "sha256": file_sha256(path), "file": str(path.relative_to(
        path.parent.parent))}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def commit_shard(out: Path, name: str, tables: dict[str, list[dict]],
                 stats: dict | None = None) -> dict:
    """Write every table of shard ``name`` and then its commit marker. Returns the marker.
    When ``stats`` has ``stage_s``, the seconds spent writing the tables join it as ``commit``."""
    t0 = time.perf_counter()
    files = {t: write_table(out / t / f"{name}.parquet", rows, t) for t, rows in tables.items()}
    stats = dict(stats or {})
    if "stage_s" in stats:
        stats["stage_s"] = {**stats["stage_s"], "commit": round(time.perf_counter() - t0, 3)}
    marker = {"shard": name, "tables": files, "stats": stats}
    (out / "_commits").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "_commits" / f"{name}.json", json.dumps(marker, indent=1).encode())
    return marker


def committed_shards(out: Path) -> tuple[dict[str, dict], set[str]]:
    """(markers of shards whose files all exist, names of shards a compaction replaced).

    A marker is written only after its files. A compact shard's marker (catalogs.jobs) lists
    the shards it ``replaces``: they count as committed and leave the set of markers."""
    done = {}
    for marker_path in sorted((out / "_commits").glob("*.json")):
        marker = json.loads(marker_path.read_text())
        ok = all((out / info["file"]).exists() for info in marker["tables"].values())
        if ok:
            done[marker["shard"]] = marker
    replaced = {s for m in done.values() for s in m.get("replaces", ())}
    return {k: m for k, m in done.items() if k not in replaced}, replaced


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())


def remove_stale_temporaries(out: Path) -> int:
    """Delete temporary files a killed run left behind (never a committed file)."""
    n = 0
    for path in out.glob("*/.*.tmp-*"):
        path.unlink(missing_ok=True)
        n += 1
    for path in out.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
        n += 1
    return n


def read_table(corpus: Path, table: str, columns: list[str] | None = None) -> list[dict]:
    """Rows of ``corpus/<table>`` (committed shards only when the corpus has commit markers)."""
    if (corpus / "_commits").is_dir():
        files = sorted(corpus / info["tables"][table]["file"]
                       for info in committed_shards(corpus)[0].values() if table in info["tables"])
    else:
        files = sorted((corpus / table).glob("*.parquet"))
    if not files:
        return []
    tables = [pq.read_table(f) for f in files]
    data = pa.concat_tables(tables, promote_options="default")
    if columns is not None:
        data = data.select([c for c in columns if c in data.column_names])
    return data.to_pylist()
