"""Shard assembly shared by every executor: unit results → table rows → committed shard, and
which units go into which shard.

A shard payload (:class:`ShardWork`) carries everything a worker needs to process and commit
shard k on its own: the unit tasks and the discovery entries of their files. ``finish_shard``
turns unit results into rows (files, series, images, regions), runs the model stage and the
optional rewriter where they are given, and commits through ``pipeline.write.commit_shard``
(the marker lists the shard's unit keys, each with the digest of its file keys).

Membership follows keys, not positions (:func:`plan_shards`): a committed shard keeps the units
its marker lists; units no marker lists are new and go, in key order, N at a time, into new
shards numbered from the lowest free number (so a killed build resumes into the very shards a
clean build makes, and a grown collection only adds shards). A committed shard is redone only
when a unit of it was killed for lack of memory or gained files.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.captions.describe import describe_all
from pipeline.captions.grounded import ground_captions
from pipeline.config import BuildConfig
from pipeline.errors import IngestError
from pipeline.ingest.discover import FileEntry
from pipeline.ingest.found import Found
from pipeline.ingest.units import Unit, UnitTask, unit_entries, unit_tasks
from pipeline.run.unit import UnitResult
from pipeline.write import (
    commit_shard,
    corpus_file,
    marker_files,
    marker_units,
    shard_name,
    shard_number,
    unit_digest,
)

OUT_OF_MEMORY = "out_of_memory"  # pipeline.errors reason: the unit is not done, not refused


@dataclass
class ShardWork:
    """Shard k: its unit tasks and the entries of the files they account for; ``attempt`` > 0
    redoes a committed shard, whose files (``supersedes``) go once the new marker is written."""

    k: int
    tasks: list[UnitTask]
    entries: dict[int, FileEntry]
    attempt: int = 0
    supersedes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return shard_name(self.k)


def file_row(e: FileEntry, shard, unit_key, status, reason, error) -> dict:
    return {"file_key": e.file_key, "shard": shard, "unit_key": unit_key, "kind": e.kind,
            "status": status, "reason": reason, "error": error, "size_bytes": e.size}


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


def task_digest(task: UnitTask, entries) -> str:
    """:func:`pipeline.write.unit_digest` of a unit's files (``entries``: index → FileEntry)."""
    return unit_digest(entries[i].file_key for i in unit_files(task))


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
            ground_captions(res.images, [*res.regions, *found.regions], res.report)
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
    oom = sorted({r["unit_key"] for r in tables.get("files", [])
                  if r["reason"] == OUT_OF_MEMORY and r["unit_key"]})
    if oom:  # not done: the shard is redone by the next run (see plan_shards)
        out["out_of_memory_units"] = oom
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
    units = {t.unit_key: task_digest(t, work.entries) for t in work.tasks}
    return commit_shard(cfg.out, work.name, tables, stats, units, work.attempt, work.supersedes)


# -- which units go where ------------------------------------------------------------------------


@dataclass
class Resume:
    """A run's view of the committed shards (unit keys and counts only, never paths)."""

    digests: dict[str, str]  # unit key → digest of its files, for every unit found now
    claims: dict[str, tuple[str, str]]  # unit key → (shard, digest) of the committed shards
    missing: list[str] = field(default_factory=list)  # claimed at the start, not found now
    rebuild: list[str] = field(default_factory=list)  # committed shards this run redoes
    missing_files: int = 0  # discovery-level files committed earlier and not found now

    def commit(self, marker: dict) -> None:
        """Record a newly committed marker's units (a redone shard's replace its old ones)."""
        name = marker["shard"]
        self.claims = {k: v for k, v in self.claims.items() if v[0] != name}
        self.claims.update((k, (name, d)) for k, d in marker.get("units", {}).items())

    def changed(self) -> list[str]:
        """Units found now that a committed shard holds with another set of files."""
        return sorted(k for k, (_, d) in self.claims.items() if self.digests.get(k, d) != d)

    def uncovered(self) -> int:
        """Units found now whose current files no committed shard holds."""
        return sum(self.claims.get(k, ("", ""))[1] != d for k, d in self.digests.items())


def unit_claims(out: Path, live: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """Unit key → (shard, digest) over the committed unit shards (discovery holds no unit)."""
    claims = {}
    for name, marker in sorted(live.items()):
        for key, digest in marker_units(out, marker).items():
            claims[key] = (name, digest)
    return claims


def needs_rebuild(marker: dict) -> bool:
    """A committed shard with units killed for lack of memory: redone by the next run."""
    stats = marker.get("stats", {})
    return bool(stats.get("out_of_memory_units")
                or stats.get("quarantined_by_reason", {}).get(OUT_OF_MEMORY))


def only_grew(out: Path, marker: dict, key: str, now: set[str]) -> bool:
    """True when every committed file of unit ``key`` (the shard's files table) is in ``now``,
    the unit's file keys found by this run: files were added (a label arrived), none lost."""
    info = marker.get("tables", {}).get("files", {})
    if not info.get("file"):
        return False
    t = pq.read_table(corpus_file(out, info["file"]), columns=["file_key"],
                      filters=[("unit_key", "==", key)])
    return set(t.column("file_key").to_pylist()) <= now


@dataclass
class ShardPlan:
    """Shard k as planned: its units (file indexes only); :class:`Pending` makes its
    :class:`ShardWork` when it is dispatched."""

    k: int
    units: list[Unit]
    attempt: int = 0
    supersedes: tuple[str, ...] = ()


def plan_shards(units: list[Unit], live: dict[str, dict], replaced: set[str],
                resume: Resume, n: int) -> list[ShardPlan]:
    """Pending shards: the committed ones to redo (``resume.rebuild``: same number, next
    attempt, the units of theirs found now), then the new units (``units`` not claimed, in key
    order) N per shard, numbered from the lowest number no committed or replaced shard has."""
    by_key = {u.unit_key: u for u in units}
    plans = []
    for name in resume.rebuild:
        mine = sorted(k for k, (s, _) in resume.claims.items() if s == name and k in by_key)
        plans.append(ShardPlan(shard_number(name), [by_key[k] for k in mine],
                               live[name].get("attempt", 0) + 1,
                               tuple(marker_files(live[name]))))
    fresh = [u for u in units if u.unit_key not in resume.claims]
    taken = {shard_number(s) for s in [*live, *replaced]}
    numbers = (k for k in count() if k not in taken)
    for i in range(0, len(fresh), n):
        plans.append(ShardPlan(next(numbers), fresh[i:i + n]))
    return plans


class Pending:
    """The pending shards of a run, made into :class:`ShardWork` one at a time as they are
    iterated (entries and tasks of one shard exist at once, not of every shard): the tasks
    from ``found``, with what the table join gave each unit (``joined``: unit key →
    (annotations, report, report_file))."""

    def __init__(self, plans: list[ShardPlan], found: Found, joined: dict | None = None):
        self.plans, self.found, self.joined = plans, found, joined or {}

    def __len__(self) -> int:
        return len(self.plans)

    def n_units(self) -> int:
        return sum(len(p.units) for p in self.plans)

    def work(self, plan: ShardPlan) -> ShardWork:
        by_index = unit_entries(plan.units, self.found)
        tasks = unit_tasks(plan.units, self.found, by_index)
        for t in tasks:
            if t.unit_key in self.joined:
                t.annotations, t.report, t.report_file = self.joined[t.unit_key]
        entries = {j: by_index[j] for t in tasks for j in unit_files(t)}
        return ShardWork(plan.k, tasks, entries, plan.attempt, plan.supersedes)

    def __iter__(self) -> Iterator[ShardWork]:
        return (self.work(p) for p in self.plans)


def unit_keys_digests(units: list[Unit], found: Found, chunk: int = 4096) -> dict[str, str]:
    """Unit key → :func:`pipeline.write.unit_digest` of its files' keys, ``chunk`` units at a
    time (their file keys are Python strings only while their chunk is digested)."""
    out = {}
    for i in range(0, len(units), chunk):
        part = units[i:i + chunk]
        files = [u.files() for u in part]
        keys = found.file_keys(np.concatenate(files)) if part else []
        at = 0
        for u, f in zip(part, files, strict=True):
            out[u.unit_key] = unit_digest(keys[at:at + len(f)])
            at += len(f)
    return out


def plan_discovery(now: dict[str, dict], committed: dict[str, list[dict]], found: set[str],
                   written: set[str]) -> tuple[dict[str, list[dict]], list[dict], int]:
    """Files rows of the discovery shards (files outside every unit), keyed by file key.

    ``now``: this run's discovery rows; ``committed``: each committed discovery shard's rows;
    ``found``: every file key found now; ``written``: file keys the pending unit shards write.
    A committed row is kept unless its file now gets another row (a pending unit writes it,
    or its discovery row changed); a row whose file is gone is kept and counted. Returns
    (discovery shards that lose rows → the rows they keep, rows no shard holds, gone)."""
    rewrite, kept, gone = {}, set(), 0
    for name, rows in sorted(committed.items()):
        keep = [r for r in rows if r["file_key"] not in written
                and now.get(r["file_key"], r) == r]
        if len(keep) < len(rows):
            rewrite[name] = keep
        kept.update(r["file_key"] for r in keep)
        gone += sum(r["file_key"] not in found for r in keep)
    return rewrite, [row for key, row in now.items() if key not in kept], gone


def discovery_name(live: dict[str, dict]) -> str:
    """Name of a new discovery shard: ``discovery``, then ``discovery-00001``, ..."""
    if "discovery" not in live:
        return "discovery"
    used = [int(s[10:]) for s in live if s.startswith("discovery-") and s[10:].isdigit()]
    return f"discovery-{max(used, default=0) + 1:05d}"
