"""The build-corpus run: discover → scan headers → group → process units → commit shards.

Shards are committed as soon as all their units are done; a rerun of the same command skips
committed shards (resume). The manifest is rewritten atomically (every few seconds while shards
commit, and at the end) and lists committed shards only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

from pipeline.config import PIPELINE_VERSION, BuildConfig
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.dicom_io import missing_decoders
from pipeline.ingest.discover import FileEntry, scan_headers, walk
from pipeline.ingest.units import group_units
from pipeline.run.execute import progress, run_local, run_ray, workers
from pipeline.run.isolate import run_isolated
from pipeline.run.shards import ShardWork, file_row, table_stats, unit_files
from pipeline.write import (
    commit_shard,
    committed_shards,
    remove_stale_temporaries,
    shard_name,
    write_manifest,
)

log = logging.getLogger("regioncorpus")


def _scan(entries: list[FileEntry], cfg: BuildConfig) -> None:
    """Header scan in isolated batches (a crashing header parse costs its batch, not the run)."""
    todo = [e for e in entries if e.kind == "dicom" and not e.status]
    size = cfg.execution.header_batch
    batches = [todo[i:i + size] for i in range(0, len(todo), size)]
    t0, done = time.monotonic(), 0
    for i, status, value in run_isolated(scan_headers, batches, workers(cfg),
                                         cfg.execution.unit_timeout_s,
                                         cfg.execution.unit_memory_mb << 20):
        if status == "ok":
            for e in value:
                entries[e.index] = e
        else:
            for e in batches[i]:
                entries[e.index].status, entries[e.index].reason = "quarantined", value.reason
                entries[e.index].error = value.problem
        done += len(batches[i])
        progress("headers", done, len(todo), t0)


def _check_out_dir(out: Path, config_hash: str) -> None:
    manifest = out / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text()).get("config_hash")
        if old != config_hash:
            raise ValueError(f"--out {out}: holds a corpus built with another configuration "
                             f"(config hash {old}, now {config_hash}); choose a new --out")


def summarize(n_found: int, markers: dict, cfg: BuildConfig, deid, timings, extra) -> dict:
    """The manifest: counts summed from the commit markers (no table is re-read)."""
    status, reasons, stage_s, rewritten = Counter(), Counter(), Counter(), Counter()
    for m in markers.values():
        status.update(m.get("stats", {}).get("status", {}))
        reasons.update(m.get("stats", {}).get("quarantined_by_reason", {}))
        stage_s.update(m.get("stats", {}).get("stage_s", {}))
        rewritten.update(m.get("stats", {}).get("captions_rewritten", {}))
    if cfg.captioner:
        extra = {**extra, "captions_rewritten": {"tried": rewritten["tried"],
                                                 "accepted": rewritten["accepted"]}}
    rows = {t: sum(m["tables"][t]["rows"] for m in markers.values() if t in m["tables"])
            for t in ("files", "series", "images", "regions")}
    return {
        "pipeline_version": PIPELINE_VERSION, "config_hash": cfg.config_hash(),
        "deid_key_id": deid.key_id, "found": n_found, "ingested": status["ingested"],
        "quarantined": status["quarantined"], "skipped": status["skipped"],
        "quarantined_by_reason": dict(sorted(reasons.items())), "rows": rows,
        "shards": {k: markers[k] for k in sorted(markers)}, "timings_s": timings,
        "worker_stage_s": {k: round(v, 3) for k, v in sorted(stage_s.items())},
        "complete": rows["files"] == n_found, **extra,
    }


def quiet_libraries() -> None:
    """pydicom's warnings quote header values (which may be PHI): keep them out of the logs."""
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    logging.getLogger("nibabel").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", message=r".*VR .*")


def _discover(cfg: BuildConfig, deid: Deidentifier):
    entries = walk([*cfg.sources, *(root for _, root in cfg.collections)], deid)
    _scan(entries, cfg)
    missing = missing_decoders(e.header.transfer_syntax for e in entries if e.header)
    if missing:
        log.warning("no installed decoder for: %s (those files will be quarantined)",
                    ", ".join(f"{v} ({k})" for k, v in missing.items()))
    return entries, group_units(entries, deid, cfg.collections), missing


def _works(entries, tasks, cfg) -> list[ShardWork]:
    n = cfg.execution.units_per_shard
    out = []
    for k, i in enumerate(range(0, len(tasks), n)):
        chunk = tasks[i:i + n]
        out.append(ShardWork(k, chunk, {j: entries[j] for t in chunk for j in unit_files(t)}))
    return out


def _plan(cfg: BuildConfig, deid: Deidentifier, markers: dict, replaced: set
          ) -> tuple[int, list[ShardWork], dict]:
    """Discover, commit the discovery shard (files outside every unit) if not yet committed,
    and cut the units into shards → (files found, pending shards, missing decoders).

    The per-file entries are the one part of the driver's memory that grows with the
    collection: past this call only the pending shards' own entries stay referenced, and the
    Ray executor drops those once it has pickled them."""
    entries, tasks, missing = _discover(cfg, deid)
    in_units = {i for task in tasks for i in unit_files(task)}
    if "discovery" not in markers:
        rows = {"files": [file_row(e, None, None, e.status, e.reason, e.error)
                          for e in entries if e.index not in in_units]}
        markers["discovery"] = commit_shard(cfg.out, "discovery", rows, table_stats(rows))
    works = _works(entries, tasks, cfg)
    pending = [w for w in works if shard_name(w.k) not in markers.keys() | replaced]
    print(f"{len(entries)} files, {len(tasks)} series in {len(works)} shards "
          f"({len(works) - len(pending)} already committed)", file=sys.stderr)
    return len(entries), pending, missing


MANIFEST_EVERY_S = 5.0  # manifest refresh interval while shards commit


def _provenance(cfg: BuildConfig) -> dict:
    from pipeline.captions.attributes import load_vocab
    from pipeline.config import file_sha256

    return {"caption_version": load_vocab()["version"], "caption_seed": cfg.caption_seed,
            "executor": cfg.execution.executor,
            "routes": list(cfg.regions.routes), "segmenter": cfg.regions.segmenter,
            "detector_sha256": file_sha256(cfg.regions.detector) if cfg.regions.detector else None}


def build(cfg: BuildConfig) -> dict:
    """Run a whole build; returns the manifest (also written to ``cfg.out/manifest.json``)."""
    cfg.validate()
    quiet_libraries()
    deid = Deidentifier.from_env(cfg.key_file)
    cfg.out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(cfg.out, cfg.config_hash())
    remove_stale_temporaries(cfg.out)
    timings, t = {}, time.monotonic()
    markers, replaced = committed_shards(cfg.out)
    n_found, pending, missing = _plan(cfg, deid, markers, replaced)
    timings["discover"] = round(time.monotonic() - t, 3)
    extra = {"missing_decoders": missing, **_provenance(cfg)}

    last = [0.0]

    def on_marker(marker: dict) -> None:
        """Record a committed shard; refresh manifest.json at most every MANIFEST_EVERY_S (the
        markers are the truth, the manifest their summary: rewriting it per shard would cost
        O(shards²) on big runs). The final manifest is written below."""
        markers[marker["shard"]] = marker
        if time.monotonic() - last[0] >= MANIFEST_EVERY_S:
            write_manifest(cfg.out, summarize(n_found, markers, cfg, deid, timings, extra))
            last[0] = time.monotonic()

    t = time.monotonic()
    run = run_ray if cfg.execution.executor == "ray" else run_local
    run(pending, cfg, deid, on_marker)
    timings["series"] = round(time.monotonic() - t, 3)
    manifest = summarize(n_found, markers, cfg, deid, timings, extra)
    write_manifest(cfg.out, manifest)
    return manifest
