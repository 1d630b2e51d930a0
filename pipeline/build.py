"""The build-corpus run: discover → scan headers → group → process units → commit shards.

Shards are committed as soon as all their units are done; a rerun of the same command skips
committed shards (resume). The manifest is rewritten after every commit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

from .config import PIPELINE_VERSION, BuildConfig
from .deid import Deidentifier
from .dicom_io import missing_decoders
from .discover import FileEntry, scan_headers, walk
from .errors import IngestError
from .ingest import UnitResult, UnitTask, process_unit
from .isolate import run_isolated
from .units import group_units
from .write import commit_shard, committed_shards, shard_name, write_manifest

log = logging.getLogger("regioncorpus")


_last_print = [0.0]


def _progress(stage: str, done: int, total: int, t0: float) -> None:
    """One progress line per second at most (and the final one), on stderr."""
    now = time.monotonic()
    if done < total and now - _last_print[0] < 1.0:
        return
    _last_print[0] = now
    rate = done / max(1e-9, now - t0)
    eta = (total - done) / rate if rate > 0 else 0.0
    print(f"[{stage}] {done}/{total} ({rate:.1f}/s, eta {eta:.0f} s)", file=sys.stderr,
          flush=True)


def _scan(entries: list[FileEntry], cfg: BuildConfig) -> None:
    todo = [e for e in entries if e.kind == "dicom" and not e.status]
    batches = [todo[i:i + cfg.execution.header_batch]
               for i in range(0, len(todo), cfg.execution.header_batch)]
    t0, done = time.monotonic(), 0
    for i, status, value in run_isolated(scan_headers, batches, _workers(cfg),
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
        _progress("headers", done, len(todo), t0)


def _workers(cfg: BuildConfig) -> int:
    return cfg.execution.workers or os.cpu_count() or 1


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def scrub(text: str | None, e: FileEntry) -> str | None:
    """Remove anything path-like or quoted from an error message before it is written: folder
    and file names may be patient names, and library messages may quote header values."""
    if not text:
        return text
    for part in sorted({str(e.path), str(e.path.resolve()), e.rel, e.path.name},
                       key=len, reverse=True):
        text = text.replace(part, "<path>")
    return _QUOTED.sub("<value>", text)[:500]


def _file_row(e: FileEntry, shard, unit_key, status, reason, error) -> dict:
    return {"file_key": e.file_key, "shard": shard, "unit_key": unit_key, "kind": e.kind,
            "status": status, "reason": reason, "error": scrub(error, e), "size_bytes": e.size}


def _unit_files(task: UnitTask) -> list[int]:
    idx = [i for i, _ in task.image_files]
    idx += [f[0] for f in (task.label_file, task.names_file) if f]
    return idx


def _shard_tables(k: int, tasks: list[UnitTask], results: dict, entries, models=None,
                  cfg: BuildConfig | None = None) -> dict:
    files, series, images, regions = [], [], [], []
    for task in tasks:
        res: UnitResult = results[task.unit_key]
        for idx in _unit_files(task):
            status, reason, error = res.files.get(
                idx, ("quarantined", "internal", "no outcome recorded for this file"))
            files.append(_file_row(entries[idx], k, task.unit_key, status, reason, error))
        if res.series:
            series.append(res.series)
        images.extend(res.images)
        regions.extend(res.regions)
        if models is not None and res.images:
            regions.extend(models(res.images, res.prompts, res.regions, cfg.caption_seed))
    if cfg is not None and cfg.captioner:  # model work stays out of the forked workers
        from .rewrite import load_rewriter, rewrite_regions

        rewrite_regions(regions, images, load_rewriter(cfg.captioner, cfg.regions.device))
    return {"files": files, "series": series, "images": images, "regions": regions}


def _check_out_dir(out: Path, config_hash: str) -> None:
    manifest = out / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text()).get("config_hash")
        if old != config_hash:
            raise ValueError(f"--out {out}: holds a corpus built with another configuration "
                             f"(config hash {old}, now {config_hash}); choose a new --out")


def _summarize(entries, markers, cfg, deid, timings) -> dict:
    status = Counter()
    reasons = Counter()
    import pyarrow.parquet as pq

    for marker in markers.values():
        t = marker["tables"].get("files")
        if t:
            table = pq.read_table(cfg.out / t["file"], columns=["status", "reason"])
            for s, r in zip(table["status"].to_pylist(), table["reason"].to_pylist(), strict=True):
                status[s] += 1
                if s == "quarantined":
                    reasons[r] += 1
    rows = {tbl: sum(m["tables"][tbl]["rows"] for m in markers.values() if tbl in m["tables"])
            for tbl in ("files", "series", "images", "regions")}
    return {
        "pipeline_version": PIPELINE_VERSION, "config_hash": cfg.config_hash(),
        "deid_key_id": deid.key_id, "found": len(entries), "ingested": status["ingested"],
        "quarantined": status["quarantined"], "skipped": status["skipped"],
        "quarantined_by_reason": dict(sorted(reasons.items())), "rows": rows,
        "shards": {k: markers[k] for k in sorted(markers)}, "timings_s": timings,
        "complete": rows["files"] == len(entries),
    }


def _run_units(pending, cfg, deid, entries, markers, on_commit, models) -> None:
    flat = [(k, t) for k, tasks in pending for t in tasks]
    by_shard = {k: tasks for k, tasks in pending}
    results: dict[int, dict] = {k: {} for k, _ in pending}
    fn = partial(_process, cfg=cfg, deid=deid)
    t0, done = time.monotonic(), 0
    for i, status, value in run_isolated(fn, [t for _, t in flat], _workers(cfg),
                                         cfg.execution.unit_timeout_s,
                                         cfg.execution.unit_memory_mb << 20):
        k, task = flat[i]
        if status != "ok":
            value = _failed_unit(task, value)
        results[k][task.unit_key] = value
        done += 1
        _progress("series", done, len(flat), t0)
        if len(results[k]) == len(by_shard[k]):
            name = shard_name(k)
            markers[name] = commit_shard(cfg.out, name, _shard_tables(
                k, by_shard[k], results.pop(k), entries, models, cfg))
            on_commit()


def _process(task, cfg, deid):
    return process_unit(task, cfg, deid)


def _failed_unit(task: UnitTask, err: IngestError) -> UnitResult:
    res = UnitResult(task.unit_key)
    for idx in _unit_files(task):
        res.files[idx] = ("quarantined", err.reason, err.problem)
    return res


def quiet_libraries() -> None:
    """pydicom's warnings quote header values (which may be PHI): keep them out of the logs."""
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    logging.getLogger("nibabel").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", message=r".*VR .*")


def build(cfg: BuildConfig) -> dict:
    """Run a whole build; returns the manifest (also written to ``cfg.out/manifest.json``)."""
    cfg.validate()
    quiet_libraries()
    deid = Deidentifier.from_env(cfg.key_file)
    cfg.out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(cfg.out, cfg.config_hash())
    timings, t = {}, time.monotonic()
    entries = walk(cfg.sources, deid)
    _scan(entries, cfg)
    missing = missing_decoders(e.header.transfer_syntax for e in entries if e.header)
    if missing:
        log.warning("no installed decoder for: %s (those files will be quarantined)",
                    ", ".join(f"{v} ({k})" for k, v in missing.items()))
    tasks = group_units(entries, deid)
    timings["discover"] = round(time.monotonic() - t, 3)
    markers = committed_shards(cfg.out)
    in_units = {i for task in tasks for i in _unit_files(task)}
    if "discovery" not in markers:
        rows = [_file_row(e, None, None, e.status, e.reason, e.error)
                for e in entries if e.index not in in_units]
        markers["discovery"] = commit_shard(cfg.out, "discovery", {"files": rows})
    n = cfg.execution.units_per_shard
    shards = [(k, tasks[i:i + n]) for k, i in enumerate(range(0, len(tasks), n))]
    pending = [(k, ts) for k, ts in shards if shard_name(k) not in markers]
    print(f"{len(entries)} files, {len(tasks)} series in {len(shards)} shards "
          f"({len(shards) - len(pending)} already committed)", file=sys.stderr)
    t = time.monotonic()

    def write() -> None:
        write_manifest(cfg.out, _summarize(entries, markers, cfg, deid, timings))

    models = None
    if pending and {"boxes", "detector"} & set(cfg.regions.routes):
        from .propose import ModelStage

        models = ModelStage(cfg.regions)  # loaded once, in this process; children never use it
    _run_units(pending, cfg, deid, entries, markers, write, models)
    timings["series"] = round(time.monotonic() - t, 3)
    manifest = _summarize(entries, markers, cfg, deid, timings)
    write_manifest(cfg.out, manifest)
    return manifest
