"""Shard assembly shared by every executor: unit results → table rows → committed shard.

A shard payload (:class:`ShardWork`) carries everything a worker needs to process and commit
shard k on its own: the unit tasks and the discovery entries of their files. ``finish_shard``
turns unit results into rows (files, series, images, regions), runs the model stage and the
optional rewriter where they are given, and commits through ``pipeline.write.commit_shard``.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

from pipeline.captions.describe import describe_all
from pipeline.config import BuildConfig
from pipeline.errors import IngestError
from pipeline.ingest.discover import FileEntry
from pipeline.ingest.units import UnitTask
from pipeline.run.unit import UnitResult
from pipeline.write import commit_shard, shard_name

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


@dataclass
class ShardWork:
    """Shard k: its unit tasks and the entries of the files they account for."""

    k: int
    tasks: list[UnitTask]
    entries: dict[int, FileEntry]

    @property
    def name(self) -> str:
        return shard_name(self.k)


def scrub(text: str | None, e: FileEntry) -> str | None:
    """Remove anything path-like or quoted from an error message before it is written: folder
    and file names may be patient names, and library messages may quote header values."""
    if not text:
        return text
    for part in sorted({str(e.path), str(e.path.resolve()), e.rel, e.path.name},
                       key=len, reverse=True):
        text = text.replace(part, "<path>")
    return _QUOTED.sub("<value>", text)[:500]


def file_row(e: FileEntry, shard, unit_key, status, reason, error) -> dict:
    return {"file_key": e.file_key, "shard": shard, "unit_key": unit_key, "kind": e.kind,
            "status": status, "reason": reason, "error": scrub(error, e), "size_bytes": e.size}


def unit_files(task: UnitTask) -> list[int]:
    """File indexes a unit accounts for: its images, then its label and names files."""
    idx = [i for i, _ in task.image_files]
    if task.label_shared:
        pass
    elif task.mask_files:
        idx += [i for i, _ in task.mask_files]
    elif task.label_file:
        idx.append(task.label_file[0])
    if task.names_file:
        idx.append(task.names_file[0])
    return idx


def failed_unit(task: UnitTask, err: IngestError) -> UnitResult:
    """A unit whose worker died or timed out: every file of it quarantined with the reason."""
    res = UnitResult(task.unit_key)
    for idx in unit_files(task):
        res.files[idx] = ("quarantined", err.reason, err.problem)
    return res


def shard_tables(work: ShardWork, results: dict[str, UnitResult], cfg: BuildConfig,
                 models=None) -> dict[str, list[dict]]:
    """Rows of every table for shard ``work`` (units in shard order, deterministic)."""
    files, series, images, regions = [], [], [], []
    for task in work.tasks:
        res = results[task.unit_key]
        for idx in unit_files(task):
            status, reason, error = res.files.get(
                idx, ("quarantined", "internal", "no outcome recorded for this file"))
            files.append(file_row(work.entries[idx], work.k, task.unit_key, status, reason, error))
        if res.series:
            series.append(res.series)
        images.extend(res.images)
        regions.extend(res.regions)
        if models is not None and res.images:  # regions final: caption them (see run.unit)
            found = models(res.images, res.prompts)
            describe_all(res.images, [*res.regions, *found.regions], cfg.caption_seed,
                         found.pixels, found.bodies)
            regions.extend(found.regions)
    return {"files": files, "series": series, "images": images, "regions": regions}


def rewrite_captions(tables: dict[str, list[dict]], cfg: BuildConfig) -> dict | None:
    """``--captioner``: guarded paraphrases of the shard's region captions (in place), here and
    never in the forked ingest workers; the counts for the commit marker (None without it)."""
    if not cfg.captioner:
        return None
    from pipeline.captions.rewrite import load_rewriter, rewrite_regions

    return rewrite_regions(tables["regions"], tables["images"],
                           load_rewriter(cfg.captioner, cfg.regions.device))


def table_stats(tables: dict[str, list[dict]], stage_s: dict[str, float] | None = None) -> dict:
    """What the manifest sums up: files by status and quarantine reason, and worker seconds
    per stage (``stage_s``, when given)."""
    status = Counter(r["status"] for r in tables.get("files", []))
    reasons = Counter(r["reason"] for r in tables.get("files", []) if r["status"] == "quarantined")
    out = {"status": dict(status), "quarantined_by_reason": dict(reasons)}
    if stage_s is not None:
        out["stage_s"] = {k: round(v, 3) for k, v in sorted(stage_s.items())}
    return out


def finish_shard(work: ShardWork, results: dict[str, UnitResult], cfg: BuildConfig,
                 models=None) -> dict:
    """Build the rows of shard ``work`` and commit them; returns the commit marker (with the
    worker seconds of every stage: the units' read/labels/cut/regions/captions, then the model
    stage and the rows + Parquet commit here)."""
    stage_s: Counter = Counter()
    for res in results.values():
        stage_s.update(res.stage_s)
    t = time.perf_counter()
    tables = shard_tables(work, results, cfg, models)
    rewritten = rewrite_captions(tables, cfg)
    stage_s["models" if models is not None else "rows"] += time.perf_counter() - t
    stats = table_stats(tables, stage_s)
    if rewritten is not None:
        stats["captions_rewritten"] = rewritten
    return commit_shard(cfg.out, work.name, tables, stats)
