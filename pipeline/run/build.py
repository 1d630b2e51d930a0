"""The build-corpus run: discover → scan headers → group → process units → commit shards.

Shards are committed as soon as all their units are done. A rerun into the same ``--out``
resumes (membership follows unit keys, see ``pipeline.run.shards``): committed shards are kept
as they are, units no marker lists go into new shards, a unit a marker lists that is no longer
found is reported (``missing_units``: its rows stay), and a shard holding units killed for
lack of memory, or units that only gained files, is redone (new files, new marker, then the
old files go). The manifest is rewritten atomically (every few seconds while shards commit,
and at the end), lists committed shards only and records the resolved configuration; a rerun
with another configuration is refused by :func:`check_out_dir`, naming the fields that differ.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import PIPELINE_VERSION, BuildConfig, RequestError
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.dicom_io import missing_decoders
from pipeline.ingest.file_index import index_batches, reuse_found
from pipeline.ingest.found import Found
from pipeline.ingest.units import Unit, plan_units, unit_entries, unit_tasks
from pipeline.run.attach import Join, JoinCounts, Tables, beside_candidates, load_tables
from pipeline.run.execute import quiet_libraries, run_local, run_ray
from pipeline.run.scan import ray_running, ray_walk, scan, stop_ray
from pipeline.run.shards import (
    Pending,
    Resume,
    ShardPlan,
    discovery_name,
    needs_rebuild,
    only_grew,
    plan_discovery,
    plan_shards,
    table_stats,
    unit_claims,
    unit_keys_digests,
)
from pipeline.write import (
    commit_shard,
    committed_shards,
    corpus_file,
    file_sha256,
    marker_files,
    open_file_index,
    remove_stale_temporaries,
    shard_number,
    write_file_index,
    write_manifest,
)

log = logging.getLogger("regioncorpus")


# A stored file holds its decoded pixels (compressed: fewer bytes) plus its header: one larger than
# the series budget by more than this cannot pass the reader's budget checks, and is refused by
# its size before anything reads it (or, from object storage, fetches it).
FILE_SLACK_BYTES = 64 << 20

# Fields that say how a build runs, not what it makes: they may change between runs.
RUN_FIELDS = ("execution", "collections", "regions.device")


def resolved_config(cfg: BuildConfig) -> dict:
    """The build configuration as JSON, for the manifest: every field, except the source and
    output paths and the key file (left out) and the detector weights (their sha256)."""
    d = asdict(cfg)
    for k in ("sources", "out", "key_file"):
        d.pop(k)
    d["collections"] = sorted({name for name, _ in cfg.collections})
    d.update(cfg.tables_digest())  # the tables' content, not their paths
    if cfg.regions.detector:
        d["regions"]["detector"] = "sha256:" + file_sha256(cfg.regions.detector)
    d["pipeline_version"] = PIPELINE_VERSION
    return json.loads(json.dumps(d, default=str))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted names of the output-changing fields that differ (``slicing.every_k``)."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)
                  and not any(k == f or k.startswith(f + ".") for f in RUN_FIELDS))


def check_out_dir(cfg: BuildConfig, key_id: str | None = None) -> None:
    """Raise :class:`~pipeline.config.RequestError` (a ValueError: one line naming ``--out``
    and the fields that differ; build-corpus exits 2 with it) when ``cfg.out`` holds a corpus
    built with another configuration or another de-identification key."""
    path = storage.join(cfg.out, "manifest.json")
    if not storage.is_file(path):
        return
    try:
        old = json.loads(storage.read_bytes(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError(f"--out {cfg.out}: its manifest.json is unreadable; "
                         "choose a new --out") from None
    if key_id is None:
        key_id = Deidentifier.from_env(cfg.key_file).key_id
    if "config" in old:
        fields = config_diff(old["config"], resolved_config(cfg))
    elif old.get("config_hash") != cfg.config_hash():
        raise RequestError(f"--out {cfg.out}: built with another configuration (by a version "
                         "that did not record which fields); choose a new --out")
    else:
        fields = []
    if old.get("deid_key_id") not in (None, key_id):
        fields.append("de-identification key (--key-file / $REGIONCORPUS_KEY)")
    if fields:
        verb = "differs" if len(fields) == 1 else "differ"
        raise RequestError(f"--out {cfg.out}: built with another configuration: "
                         f"{', '.join(fields)} {verb}; choose a new --out")


def _keys(keys: list[str]) -> dict:
    return {"count": len(keys), "keys": keys}


def summarize(n_found: int, markers: dict, cfg: BuildConfig, deid, timings, extra,
              resume: Resume) -> dict:
    """The manifest: counts summed from the commit markers (no table is re-read); ``extra``
    holds what is fixed for the run (configuration, provenance)."""
    status, reasons, stage_s, rewritten = Counter(), Counter(), Counter(), Counter()
    oom = []
    for m in markers.values():
        status.update(m.get("stats", {}).get("status", {}))
        reasons.update(m.get("stats", {}).get("quarantined_by_reason", {}))
        stage_s.update(m.get("stats", {}).get("stage_s", {}))
        rewritten.update(m.get("stats", {}).get("captions_rewritten", {}))
        oom += m.get("stats", {}).get("out_of_memory_units", [])
    if cfg.captioner:
        extra = {**extra, "captions_rewritten": {"tried": rewritten["tried"],
                                                 "accepted": rewritten["accepted"]}}
    rows = {t: sum(m["tables"][t]["rows"] for m in markers.values() if t in m["tables"])
            for t in ("files", "series", "images", "regions")}
    changed = resume.changed()
    return {
        "pipeline_version": PIPELINE_VERSION, "deid_key_id": deid.key_id, "found": n_found, "ingested": status["ingested"],
        "quarantined": status["quarantined"], "skipped": status["skipped"],
        "quarantined_by_reason": dict(sorted(reasons.items())), "rows": rows,
        "shards": {k: _entry(markers[k]) for k in sorted(markers)}, "timings_s": timings,
        "worker_stage_s": {k: round(v, 3) for k, v in sorted(stage_s.items())},
        "missing_units": _keys(resume.missing), "changed_units": _keys(changed),
        "out_of_memory_units": _keys(sorted(oom)), "missing_files": resume.missing_files,
        "rebuilt_shards": resume.rebuild,
        "complete": not resume.uncovered() and not oom and "discovery" in markers, **extra,
    }


def _entry(marker: dict) -> dict:
    """A marker as the manifest lists it: its unit keys counted, not listed."""
    out = {k: v for k, v in marker.items() if k != "units"}
    if "units" in marker:
        out["n_units"] = len(marker["units"])
    return out


def discover(cfg: BuildConfig, deid: Deidentifier) -> tuple[Found, dict]:
    """Walk the sources into one table and scan the headers of the DICOM files that are new or
    changed since the file index in ``cfg.out`` was written (all of them when it is missing or
    not trusted); then replace the index → (found, counts: files, from_index, scanned)."""
    parts = ray_walk(cfg, deid) if cfg.execution.executor == "ray" else None
    found = Found.walk([*cfg.sources, *(root for _, root in cfg.collections)], deid,
                       max_bytes=cfg.read.series_budget_bytes + FILE_SLACK_BYTES,
                       map_parts=parts)
    with open_file_index(cfg.out, deid.key_id) as index:
        reused = reuse_found(found, index)
    scanned = scan(found, cfg, deid)
    write_file_index(cfg.out, index_batches(found), deid.key_id)
    return found, {"files": len(found), "from_index": reused, "scanned": scanned}


def _discover(cfg: BuildConfig, deid: Deidentifier):
    found, counts = discover(cfg, deid)
    missing = missing_decoders(found.frame["transfer_syntax"].drop_nulls().unique().to_list())
    if missing:  # which ones: the manifest's missing_decoders (UIDs only, vetted)
        log.warning("no installed decoder for %d transfer syntaxes (their files will be "
                    "quarantined; manifest.json: missing_decoders)", len(missing))
    return found, plan_units(found, deid, cfg.collections), missing, counts


def _join(units: list[Unit], found: Found, tables: Tables | None, deid: Deidentifier,
          batch: int = 256) -> tuple[JoinCounts, dict]:
    """The tables joined to every unit, ``batch`` units' tasks at a time → (counts, unit key →
    (annotations, report, report_file) of the units that got any)."""
    if tables is None:
        return JoinCounts(), {}
    join, joined = Join(tables, deid), {}
    txt_rows = None
    if tables.beside:  # the files a --reports beside text can be: once, not per batch
        txt_rows = (found.frame.lazy().filter(pl.col("reason") == "not_medical")
                    .select("index", *found.path_columns()).collect())
    for start in range(0, len(units), batch):
        part = units[start:start + batch]
        entries = unit_entries(part, found)
        tasks = unit_tasks(part, found, entries)
        texts = {}
        if txt_rows is not None:
            wanted = {str(c) for t in tasks if t.kind == "dicom"
                      for c in beside_candidates(t.image_files[0][1])}
            texts = {Path(p): i for i, p, _ in found.match_paths(txt_rows, wanted)
                     if p in wanted}
        join(tasks, entries, texts)
        joined.update((t.unit_key, (t.annotations, t.report, t.report_file)) for t in tasks
                      if t.annotations or t.report is not None or t.report_file is not None)
    return join.counts(), joined


def _verify(out, found: Found, units: list[Unit], live: dict[str, dict]) -> Resume:
    """Check the committed shards against the units found now: which are missing, which shards
    are redone (units killed for lack of memory; units that gained files and lost none)."""
    digests = unit_keys_digests(units, found)
    resume = Resume(digests, unit_claims(out, live))
    resume.missing = sorted(k for k in resume.claims if k not in digests)
    redo = {s for s, m in live.items() if needs_rebuild(m)}
    by_key = {u.unit_key: u for u in units}
    for key in resume.changed():
        shard = resume.claims[key][0]
        now = set(found.file_keys(by_key[key].files()))
        if shard_number(shard) is not None and shard not in redo \
                and only_grew(out, live[shard], key, now):
            redo.add(shard)
    resume.rebuild = sorted(s for s in redo if shard_number(s) is not None)
    return resume


def _commit_discovery(out, found: Found, in_units: np.ndarray, plans: list[ShardPlan],
                      markers: dict, resume: Resume) -> None:
    """Commit the rows of files outside every unit: committed discovery shards keep theirs
    (a shard whose rows another row now replaces is redone without them, before the pending
    shards write that row); rows no discovery shard holds go into a new one."""
    rows = found.frame.lazy().filter(~pl.col("index").is_in(in_units)).select("file_key", pl.lit(None, pl.Int64).alias("shard"),
                          pl.lit(None, pl.String).alias("unit_key"), "kind", "status",
                          "reason", "error", pl.col("size").alias("size_bytes")).collect()
    now = {r["file_key"]: r for r in rows.to_dicts()}
    committed = {}
    for name, m in markers.items():
        info = m["tables"].get("files", {})
        if name.startswith("discovery"):
            committed[name] = (pq.read_table(corpus_file(out, info["file"])).to_pylist()
                               if info.get("file") else [])
    held = list({r["file_key"] for rows in committed.values() for r in rows})
    found_keys, written = set(), set()
    if held:  # of the committed discovery rows' files: which are found now, which rewritten
        found_keys = set(found.frame.lazy().filter(pl.col("file_key").is_in(held))
                         .select("file_key").collect()["file_key"])
        pending = [u.files() for p in plans for u in p.units]
        if pending:
            written = set(found.file_keys(np.concatenate(pending))) & found_keys
    rewrite, new, resume.missing_files = plan_discovery(now, committed, found_keys, written)
    for name, rows in rewrite.items():
        m = markers[name]
        tables = {"files": rows}
        markers[name] = commit_shard(out, name, tables, table_stats(tables), {},
                                     m.get("attempt", 0) + 1, marker_files(m))
    if new or "discovery" not in markers:
        tables = {"files": new}
        name = discovery_name(markers)
        markers[name] = commit_shard(out, name, tables, table_stats(tables), {})


def plan_run(cfg: BuildConfig, deid: Deidentifier, markers: dict, replaced: set,
          tables: Tables | None = None) -> tuple[int, Pending, dict, Resume]:
    """Discover, check the committed shards (:func:`_verify`), cut the pending units into
    shards, commit the discovery rows → (files found, pending shards, manifest fields of the
    discovery: missing decoders and header-scan counts, resume report).

    What the driver holds grows with the collection only as one table (:class:`Found`: a few
    hundred bytes per file, no Python object per file) and one :class:`Unit` per unit; the
    ``FileEntry`` objects of a shard are made when it is dispatched (:class:`Pending`)."""
    found, units, missing, counts = _discover(cfg, deid)
    joined, attached = _join(units, found, tables, deid)
    resume = _verify(cfg.out, found, units, markers)
    plans = plan_shards(units, markers, replaced, resume, cfg.execution.units_per_shard)
    in_units = np.concatenate([u.files() for u in units]) if units else np.zeros(0, np.int64)
    _commit_discovery(cfg.out, found, in_units, plans, markers, resume)
    n_new = sum(len(p.units) for p in plans if p.attempt == 0)
    print(f"{len(found)} files, {len(units)} series: {n_new} new in "
          f"{len(plans) - len(resume.rebuild)} new shards, {len(resume.rebuild)} shards redone, "
          f"{len(resume.missing)} committed series not found", file=sys.stderr)
    found_fields = {"missing_decoders": missing, "header_scan": counts}
    if cfg.annotations or cfg.reports:
        found_fields.update(joined.manifest())
    return len(found), Pending(plans, found, attached), found_fields, resume


MANIFEST_EVERY_S = 5.0  # manifest refresh interval while shards commit


def _provenance(cfg: BuildConfig) -> dict:
    from pipeline.captions.attributes import load_vocab

    return {"caption_version": load_vocab()["version"], "caption_seed": cfg.caption_seed,
            "executor": cfg.execution.executor,
            "routes": list(cfg.regions.routes), "segmenter": cfg.regions.segmenter,
            "detector_sha256": file_sha256(cfg.regions.detector) if cfg.regions.detector else None}


def build(cfg: BuildConfig) -> dict:
    """Run a whole build; returns the manifest (also written to ``cfg.out/manifest.json``).
    Raises RequestError (:func:`check_out_dir`) when ``cfg.out`` holds another build's corpus,
    before any work."""
    cfg.validate()
    quiet_libraries()
    deid = Deidentifier.from_env(cfg.key_file)
    check_out_dir(cfg, deid.key_id)
    tables = None
    if cfg.annotations or cfg.reports:
        try:
            tables = load_tables(cfg, deid)
        except ValueError as e:  # fixed messages: a table that does not fit its format
            raise RequestError(f"--annotations / --reports: {e}") from None
    storage.makedirs(cfg.out)
    remove_stale_temporaries(cfg.out)
    ray_before = ray_running()
    try:
        return _build(cfg, deid, tables)
    finally:
        if not ray_before:  # started by this build (the header scan or the series stage)
            stop_ray()


def _build(cfg: BuildConfig, deid: Deidentifier, tables: Tables | None = None) -> dict:
    """:func:`build` once the request is checked."""
    timings, t = {}, time.monotonic()
    markers, replaced = committed_shards(cfg.out)
    n_found, pending, found, resume = plan_run(cfg, deid, markers, replaced, tables)
    timings["discover"] = round(time.monotonic() - t, 3)
    extra = {**found, "config_hash": cfg.config_hash(),
             "config": resolved_config(cfg), **_provenance(cfg)}

    last = [0.0]

    def on_marker(marker: dict) -> None:
        """Record a committed shard; refresh manifest.json at most every MANIFEST_EVERY_S (the
        markers are the truth, the manifest their summary: rewriting it per shard would cost
        O(shards²) on big runs). The final manifest is written below."""
        markers[marker["shard"]] = marker
        resume.commit(marker)
        if time.monotonic() - last[0] >= MANIFEST_EVERY_S:
            write_manifest(cfg.out, summarize(n_found, markers, cfg, deid, timings, extra,
                                              resume))
            last[0] = time.monotonic()

    t = time.monotonic()
    run = run_ray if cfg.execution.executor == "ray" else run_local
    run(pending, cfg, deid, on_marker, pending.n_units())
    timings["series"] = round(time.monotonic() - t, 3)
    manifest = summarize(n_found, markers, cfg, deid, timings, extra, resume)
    write_manifest(cfg.out, manifest)
    return manifest
