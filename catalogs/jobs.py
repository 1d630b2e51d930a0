"""Catalog-wide jobs on dask: statistics, near-duplicates across all shards, compaction.

Why dask and not Polars (see docs/catalogs.md): these jobs touch every shard of a corpus that
may be far larger than one machine's memory. dask partitions the work per Parquet file / shard,
runs it out-of-core, and the same code runs on a ``dask.distributed`` cluster placed next to the
data (create a ``distributed.Client`` first and every ``compute`` here uses it; the workers must
see the corpus directory at the same path). Polars (:mod:`catalogs.corpus`) serves interactive
single-node queries.

Every function takes a corpus directory (or an open :class:`~catalogs.corpus.Corpus`) and an
optional dask ``scheduler`` (``"threads"``, ``"processes"``, ``"synchronous"``; None: dask's
default, or the active distributed client).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import dask
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.write import (
    ROW_GROUP_ROWS,
    atomic_write_bytes,
    marker_files,
    marker_units,
    write_manifest,
)
from pipeline.write import file_sha256 as _sha256

from .corpus import KEY_COLUMNS, TABLES, Corpus, CorpusError, iter_image_file
from .verify import (
    DEFAULT_MAX_DISTANCE,
    HASH_COLUMNS,
    PAIR_SCHEMA,
    band_keys,
    bucket_pairs,
    hash_rows,
)

REGION_STAT_COLUMNS = ("n_regions", "n_images", "n_patients", "area_mm2_sum", "area_mm2_mean",
                       "max_diameter_mm_max")


def _corpus(corpus: Corpus | str | Path) -> Corpus:
    return corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)


def read_table(corpus: Corpus | str | Path, table: str,
               columns: Sequence[str] | None = None) -> dd.DataFrame:
    """dask DataFrame over the committed files of ``table`` (one partition per file or row
    group). ``images`` never includes the PNG column unless it is named in ``columns``."""
    c = _corpus(corpus)
    paths = [str(p) for p in c.files(table)]
    names = c.columns(table)
    if columns is None:
        columns = [n for n in names if not (table == "images" and n == "image")]
    missing = [n for n in columns if n not in names]
    if missing:
        raise CorpusError(f"{table}: unknown column(s) {missing}")
    if not paths:
        empty = c.arrow_schema(table).empty_table().select(list(columns)).to_pandas()
        return dd.from_pandas(empty, npartitions=1)
    if storage.is_remote(paths[0]):  # an s3:// / gs:// corpus: pipeline.storage's client
        fs, _ = storage.resolve(paths[0])
        return dd.read_parquet([storage.resolve(p)[1] for p in paths], columns=list(columns),
                               filesystem=fs)
    return dd.read_parquet(paths, columns=list(columns))


# -- statistics ----------------------------------------------------------------------------------

def region_stats(corpus: Corpus | str | Path, by: Sequence[str] = ("label", "modality", "split"),
                 scheduler=None) -> pd.DataFrame:
    """Per-group region statistics over every shard (regions columns only in ``by``).
    Columns: ``by``..., n_regions, n_images, n_patients, area_mm2_sum, area_mm2_mean,
    max_diameter_mm_max — the same numbers as ``Corpus.region_stats`` (Polars) computes.
    Sorted by ``by``; null group keys are kept."""
    by = list(by)
    df = read_table(corpus, "regions",
                    list(dict.fromkeys([*by, "image_id", "patient_key", "area_mm2",
                                        "max_diameter_mm"])))
    g = df.groupby(by, dropna=False)
    parts = {
        "n_regions": g.size(),
        "n_images": g["image_id"].nunique(),
        "n_patients": g["patient_key"].nunique(),
        "area_mm2_sum": g["area_mm2"].sum(),
        "area_mm2_mean": g["area_mm2"].mean(),
        "max_diameter_mm_max": g["max_diameter_mm"].max(),
    }
    computed = dask.compute(*parts.values(), scheduler=scheduler)
    out = pd.concat(dict(zip(parts, computed, strict=True)), axis=1).reset_index()
    return out.sort_values(by, na_position="last").reset_index(drop=True)


def global_stats(corpus: Corpus | str | Path, scheduler=None) -> dict:
    """Counts over every shard, computed with dask in one pass per table:
    ``rows`` per table; files per ``status`` and ``reason``; images per ``split`` and
    ``modality``; regions per ``split``, ``label``, ``modality``; ``patients`` (distinct
    patient_key in series) and patients per split. Same keys and numbers as the matching parts
    of ``Corpus.summary()``."""
    c = _corpus(corpus)
    files = read_table(c, "files", ["status", "reason"])
    series = read_table(c, "series", ["patient_key", "split"])
    images = read_table(c, "images", ["split", "modality"])
    regions = read_table(c, "regions", ["split", "label", "modality"])
    jobs = {
        "rows.files": files.shape[0], "rows.series": series.shape[0],
        "rows.images": images.shape[0], "rows.regions": regions.shape[0],
        "files.by_status": files["status"].value_counts(dropna=False),
        "files.by_reason": files["reason"].value_counts(dropna=False),
        "images.by_split": images["split"].value_counts(dropna=False),
        "images.by_modality": images["modality"].value_counts(dropna=False),
        "regions.by_split": regions["split"].value_counts(dropna=False),
        "regions.by_label": regions["label"].value_counts(dropna=False),
        "regions.by_modality": regions["modality"].value_counts(dropna=False),
        "patients.total": series["patient_key"].nunique(),
        "patients.pairs": series.drop_duplicates(),
    }
    results = dict(zip(jobs, dask.compute(*jobs.values(), scheduler=scheduler), strict=True))
    out: dict = {"rows": {}, "files": {}, "images": {}, "regions": {}, "patients": {}}
    for key, value in results.items():
        group, name = key.split(".")
        if name == "pairs":
            per = value.dropna(subset=["patient_key"])["split"].value_counts(dropna=False)
            out[group]["by_split"] = _counts(per)
        elif isinstance(value, pd.Series):
            out[group][name] = _counts(value)
        else:
            out[group][name] = int(value)
    return out


def _counts(series: pd.Series) -> dict:
    items = [("null" if pd.isna(k) else str(k), int(v)) for k, v in series.items()]
    return dict(sorted(items, key=lambda kv: (kv[0] == "null", kv[0])))


# -- near-duplicates -----------------------------------------------------------------------------

def _hash_file(path: str, method: str) -> list[dict]:
    return hash_rows(iter_image_file(path, HASH_COLUMNS), method)


def _keyed(rec: dict, max_distance: int) -> list[tuple]:
    entry = (rec["image_id"], rec["split"], rec["series_key"], rec["patient_key"], rec["hash"])
    return [(key, entry) for key in band_keys(rec["hash"], max_distance)]


def _bucket_rows(item: tuple, max_distance: int, include_same_series: bool) -> list[tuple]:
    _, entries = item
    if len(entries) < 2:
        return []
    entries = sorted(set(entries))
    hashes = np.array([e[4] for e in entries], np.uint64)
    rows = []
    for i, j, d in bucket_pairs(range(len(entries)), hashes, max_distance):
        a, b = entries[i], entries[j]  # sorted, so a's image_id < b's
        if a[2] == b[2] and not include_same_series:
            continue
        rows.append((a[0], b[0], int(d), a[1], b[1], a[1] != b[1], a[3] == b[3], a[2], b[2],
                     a[3], b[3]))
    return rows


def near_duplicates(corpus: Corpus | str | Path, max_distance: int = DEFAULT_MAX_DISTANCE,
                    method: str = "phash", include_same_series: bool = False,
                    scheduler=None) -> pl.DataFrame:
    """Near-duplicate image pairs across every shard, on dask.bag: each images file is hashed
    in its own task (PNG decode + 64-bit perceptual hash), every hash is keyed by its
    ``max_distance + 1`` bit bands (two hashes within ``max_distance`` share a band), buckets
    are folded per key, and pairs are checked by Hamming distance inside each bucket.
    Same result and columns as :func:`catalogs.verify.near_duplicates`."""
    c = _corpus(corpus)
    paths = [str(p) for p in c.files("images")]
    if not paths:
        return pl.DataFrame(schema=PAIR_SCHEMA)
    recs = (db.from_sequence(paths, npartitions=len(paths))
            .map(_hash_file, method=method).flatten()
            .filter(lambda r: not r["blank"]))
    buckets = (recs.map(_keyed, max_distance=max_distance).flatten()
               .foldby(lambda kv: kv[0], lambda acc, kv: acc + [kv[1]], [],
                       lambda a, b: a + b, []))
    pairs = (buckets.map(_bucket_rows, max_distance=max_distance,
                         include_same_series=include_same_series).flatten().distinct())
    rows = pairs.compute(scheduler=scheduler)
    return (pl.DataFrame(rows, schema=PAIR_SCHEMA, orient="row")
            .sort("distance", "image_id_a", "image_id_b"))


# -- compaction ----------------------------------------------------------------------------------

def plan_compaction(corpus: Corpus | str | Path, target_bytes: int = 256 << 20,
                    min_group: int = 2) -> list[list[str]]:
    """Groups of consecutive (by name) shards to merge: shards smaller than ``target_bytes``
    (all their files together) are gathered until a group reaches ``target_bytes``; a large
    shard ends a group; groups of fewer than ``min_group`` shards are left alone. The
    ``discovery`` shards (files only) are never compacted."""
    c = _corpus(corpus)
    if storage.is_remote(c.root):
        raise CorpusError(f"{c.root}: compaction runs on local corpora only (for now)")
    groups, current, size = [], [], 0
    for name in c.shard_names():
        if name.startswith("discovery"):
            continue
        nbytes = sum((c.root / f).stat().st_size for f in marker_files(c.manifest["shards"][name]))
        if nbytes >= target_bytes:
            groups.append(current)
            current, size = [], 0
            continue
        current.append(name)
        size += nbytes
        if size >= target_bytes:
            groups.append(current)
            current, size = [], 0
    groups.append(current)
    return [g for g in groups if len(g) >= min_group]


def _next_compact_index(c: Corpus) -> int:
    used = [-1]
    names = set(c.shard_names())
    for table in TABLES:
        names |= {p.name.split(".")[0] for p in (c.root / table).glob("compact-*.parquet")}
    for n in names:
        if n.startswith("compact-") and n[8:].isdigit():
            used.append(int(n[8:]))
    return max(used) + 1


def _key_counts(paths: Sequence[Path], key: str) -> Counter:
    out: Counter = Counter()
    for p in paths:
        out.update(pq.read_table(p, columns=[key]).column(key).to_pylist())
    return out


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    cols = []
    for f in schema:
        if f.name in batch.schema.names:
            col = batch.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(batch.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _write_merged(root: str, table: str, new_name: str, sources: list[str],
                  expected_rows: int) -> dict:
    """Merge ``sources`` (paths relative to root) of one table into ``new_name``: write to a
    temporary name, fsync, check rows and the key multiset against the sources, then rename.
    Returns the manifest entry {file, rows, sha256}."""
    rootp = Path(root)
    src = [rootp / s for s in sources]
    schemas = [pq.read_schema(p) for p in src]
    schema = (schemas[0] if all(s.equals(schemas[0]) for s in schemas[1:])
              else pa.unify_schemas(schemas, promote_options="permissive"))
    final = rootp / table / f"{new_name}.parquet"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    rows_per_group = ROW_GROUP_ROWS.get(table, 65536)
    with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=True) as writer:
        for p in src:
            for batch in pq.ParquetFile(p).iter_batches(batch_size=rows_per_group):
                writer.write_table(_conform(batch, schema), row_group_size=rows_per_group)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    rows = pq.ParquetFile(tmp).metadata.num_rows
    source_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in src)
    key = KEY_COLUMNS[table]
    if rows != expected_rows or rows != source_rows or \
            _key_counts([tmp], key) != _key_counts(src, key):
        tmp.unlink(missing_ok=True)
        raise CorpusError(f"compaction of {table} into {new_name}: wrote {rows} rows, sources "
                          f"hold {source_rows}, manifest says {expected_rows} (or keys differ);"
                          " nothing was changed")
    os.replace(tmp, final)
    return {"file": f"{table}/{final.name}", "rows": rows, "sha256": _sha256(final)}


def compact_marker(root: Path, name: str, group: list[str], tables: dict) -> dict:
    """Commit marker of compact shard ``name``: its tables, every shard it ``replaces`` (through
    earlier compactions too), their summed status counts and the units it covers (read from
    its own files table). A later build-corpus run into the corpus treats the replaced shards
    as committed (not redone), their units as this shard's, and keeps this shard in the
    manifest it writes."""
    status, reasons, replaces = Counter(), Counter(), list(group)
    for s in group:
        for path in (root / "_commits" / f"{s}.json", root / "_commits" / "replaced" / f"{s}.json"):
            if path.exists():
                marker = json.loads(path.read_text())
                status.update(marker.get("stats", {}).get("status", {}))
                reasons.update(marker.get("stats", {}).get("quarantined_by_reason", {}))
                replaces += marker.get("replaces", [])  # a compact shard compacted again
                break
    return {"shard": name, "tables": tables, "replaces": sorted(set(replaces)),
            "stats": {"status": dict(status), "quarantined_by_reason": dict(reasons)},
            "units": marker_units(root, {"tables": tables})}


def compact(corpus: Corpus | str | Path, target_bytes: int = 256 << 20, min_group: int = 2,
            remove_replaced: bool = True, dry_run: bool = False, scheduler=None) -> dict:
    """Merge small shards into ``compact-XXXXX`` shards (see :func:`plan_compaction`), one dask
    task per (group, table), never losing or duplicating a row:

    1. each merged file is written under a temporary name, fsynced, checked (row count equal
       to the sources' and the manifest's, identical multiset of key column values) and only
       then renamed to ``DIR/<table>/compact-XXXXX.parquet`` — not yet in the manifest, so
       readers do not see it;
    2. the new manifest (replaced shards removed, compact shards added with ``replaces``;
       ``rows`` unchanged) is checked for equal per-table totals and written atomically
       (temporary file + rename): readers see either the old or the new set of files;
    3. a commit marker per compact shard (:func:`compact_marker`, naming the shards it
       replaces) is written to ``DIR/_commits/``;
    4. the replaced files are deleted (``remove_replaced``), and their commit markers move to
       ``DIR/_commits/replaced/``.

    A crash before step 2 leaves unreferenced ``compact-*`` files (ignored, and a later
    compaction picks fresh names); after step 2, unreferenced old files. Run it on a finished
    corpus only (``complete`` in the manifest), never while build-corpus writes to it. A later
    build-corpus run into the same directory (same command) finds the compact markers, skips
    the replaced shards and writes a manifest with the compact shards: nothing is redone.
    Returns {"groups": {new: [replaced...]}, "rows": {...}, "files_before", "files_after",
    "dry_run"}."""
    c = _corpus(corpus)
    if not c.manifest.get("complete", False):
        raise CorpusError(f"{c.root}: manifest is not complete (build unfinished?); "
                          "compaction runs on finished corpora only")
    groups = plan_compaction(c, target_bytes, min_group)
    start = _next_compact_index(c)
    names = {f"compact-{start + i:05d}": g for i, g in enumerate(groups)}
    n_files = sum(len(c.files(t)) for t in TABLES)
    report = {"groups": names, "rows": {t: c.manifest_rows(t) for t in TABLES},
              "files_before": n_files, "files_after": n_files, "dry_run": dry_run}
    if dry_run or not groups:
        return report

    merged = _merge_groups(c, names, scheduler)
    manifest = _compacted_manifest(c, names, merged, report["rows"])
    write_manifest(c.root, manifest)
    check = _reopen_checked(c, report["rows"])
    for new, group in names.items():  # markers for build-corpus: see compact_marker
        atomic_write_bytes(c.root / "_commits" / f"{new}.json", json.dumps(
            compact_marker(c.root, new, group, manifest["shards"][new]["tables"]),
            indent=1, sort_keys=True).encode())
    if remove_replaced:
        _remove_replaced(c, names)
    report["files_after"] = sum(len(check.files(t)) for t in TABLES)
    return report


def _merge_groups(c: Corpus, names: dict[str, list[str]],
                  scheduler) -> list[tuple[tuple[str, str], dict]]:
    """((compact shard, table), manifest entry) per merged file, written by one dask task each."""
    shards = c.manifest["shards"]
    tasks, keys = [], []
    for new, group in names.items():
        for table in TABLES:
            infos = [shards[s]["tables"][table] for s in group
                     if shards[s]["tables"].get(table, {}).get("file")]
            if infos:
                tasks.append(dask.delayed(_write_merged)(
                    str(c.root), table, new, [i["file"] for i in infos],
                    sum(i["rows"] for i in infos)))
                keys.append((new, table))
    written = dask.compute(*tasks, scheduler=scheduler)
    return list(zip(keys, written, strict=True))


def _compacted_manifest(c: Corpus, names: dict[str, list[str]],
                        merged: list[tuple[tuple[str, str], dict]], rows: dict) -> dict:
    """The new manifest (replaced shards out, compact shards in), checked to keep ``rows``."""
    manifest = json.loads(json.dumps(c.manifest))
    for group in names.values():
        for s in group:
            del manifest["shards"][s]
    for (new, table), info in merged:
        entry = manifest["shards"].setdefault(new, {"shard": new, "tables": {},
                                                    "replaces": names[new]})
        entry["tables"][table] = info
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    new_rows = {t: sum(s.get("tables", {}).get(t, {}).get("rows", 0)
                       for s in manifest["shards"].values()) for t in TABLES}
    if new_rows != rows:
        raise CorpusError(f"compaction: row totals would change {rows} → {new_rows}; "
                          "manifest left as it was")
    manifest.setdefault("compactions", []).append(names)
    return manifest


def _reopen_checked(c: Corpus, rows: dict) -> Corpus:
    """The corpus re-opened on its new manifest; restores ``c``'s manifest if counts differ."""
    check = Corpus.open(c.root)
    counts = {t: check.count(t) for t in TABLES}
    if counts != rows:  # should be impossible after the per-file checks
        write_manifest(c.root, c.manifest)
        raise CorpusError(f"compaction: re-read counts {counts} != {rows}; "
                          "old manifest restored")
    return check


def _remove_replaced(c: Corpus, names: dict[str, list[str]]) -> None:
    """None; deletes the replaced shards' files, moves their markers to ``_commits/replaced/``."""
    shards = c.manifest["shards"]
    replaced_dir = c.root / "_commits" / "replaced"
    for group in names.values():
        for s in group:
            for rel in marker_files(shards[s]):
                (c.root / rel).unlink(missing_ok=True)
            marker = c.root / "_commits" / f"{s}.json"
            if marker.exists():
                replaced_dir.mkdir(parents=True, exist_ok=True)
                shutil.move(str(marker), replaced_dir / marker.name)
