"""Executors: the same stage functions run in-process (local) or on Ray Data (embedded or a
cluster). Both hand each committed shard's marker to ``on_marker`` as soon as it exists.

local: units of all pending shards stream through forked, isolated workers (``--workers`` at
    once); a shard is committed by this process when its last unit is back; the model stage
    (SAM/YOLO) runs here, once loaded.
ray:  a Ray Data pipeline over shards. CPU stage: ``map`` with 1 CPU per task, ``max_retries``
    set explicitly; inside, units still run in a forked child under timeout and memory cap
    (``pipeline.isolate``), so a decoder crash is a row, not a lost task. Model stage
    (boxes/detector routes): an actor pool (``--model-actors``, ``--gpus-per-actor``) where
    YOLO and SAM share one actor per GPU: both models stay resident, an image is decoded once
    for both, and the GPU is never split between two processes. The stage that finishes a
    shard writes it (temp → rename → marker), so the driver only ever sees small markers.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from functools import partial

from .config import BuildConfig
from .deid import Deidentifier
from .ingest import process_unit
from .isolate import run_isolated
from .shards import ShardWork, failed_unit, finish_shard

_last = [0.0]


def progress(stage: str, done: int, total: int, t0: float) -> None:
    """One progress line per second at most (and the final one), on stderr."""
    now = time.monotonic()
    if done < total and now - _last[0] < 1.0:
        return
    _last[0] = now
    rate = done / max(1e-9, now - t0)
    eta = (total - done) / rate if rate > 0 else 0.0
    print(f"[{stage}] {done}/{total} ({rate:.1f}/s, eta {eta:.0f} s)", file=sys.stderr,
          flush=True)


def workers(cfg: BuildConfig) -> int:
    return cfg.execution.workers or os.cpu_count() or 1


def needs_models(cfg: BuildConfig) -> bool:
    return bool({"boxes", "detector"} & set(cfg.regions.routes))


def _unit(task, cfg, deid):
    return process_unit(task, cfg, deid)


def one_thread_per_worker() -> None:
    """Parallelism comes from the workers: OpenCV's own thread pool would add a second busy
    thread per worker (measured: +20 % CPU, no faster), so each worker process uses one."""
    import cv2

    cv2.setNumThreads(1)


def process_shard_units(work: ShardWork, cfg: BuildConfig, deid: Deidentifier, n_workers: int):
    """All unit results of one shard, the units isolated in forked children."""
    results = {}
    fn = partial(_unit, cfg=cfg, deid=deid)
    for i, status, value in run_isolated(fn, work.tasks, n_workers, cfg.execution.unit_timeout_s,
                                         cfg.execution.unit_memory_mb << 20):
        task = work.tasks[i]
        results[task.unit_key] = value if status == "ok" else failed_unit(task, value)
    return results


def run_local(works: list[ShardWork], cfg: BuildConfig, deid: Deidentifier, on_marker) -> None:
    """Stream every pending unit through isolated workers; commit shards as they complete."""
    models = None
    if works and needs_models(cfg):
        from .propose import ModelStage

        models = ModelStage(cfg.regions)  # lives in this process; forked children never use it
    one_thread_per_worker()  # inherited by the forked workers
    flat = [(w, t) for w in works for t in w.tasks]
    results: dict[int, dict] = {w.k: {} for w in works}
    fn = partial(_unit, cfg=cfg, deid=deid)
    t0 = time.monotonic()
    for n, (i, status, value) in enumerate(run_isolated(
            fn, [t for _, t in flat], workers(cfg), cfg.execution.unit_timeout_s,
            cfg.execution.unit_memory_mb << 20), 1):
        work, task = flat[i]
        results[work.k][task.unit_key] = value if status == "ok" else failed_unit(task, value)
        progress("series", n, len(flat), t0)
        if len(results[work.k]) == len(work.tasks):
            on_marker(finish_shard(work, results.pop(work.k), cfg, models))


def cpu_shard(row: dict, cfg: BuildConfig, deid: Deidentifier) -> dict:
    """Ray Data CPU stage (a task): one shard's units, isolated in a forked child;
    the shard is committed here unless the model stage follows."""
    work: ShardWork = pickle.loads(row["work"])
    one_thread_per_worker()
    results = process_shard_units(work, cfg, deid, 1)
    if needs_models(cfg):
        return {"k": row["k"], "work": row["work"], "results": pickle.dumps(results),
                "marker": ""}
    return {"k": row["k"], "marker": json.dumps(finish_shard(work, results, cfg))}


class _ModelShard:
    """Ray Data model stage: an actor holding YOLO + SAM; finishes and commits shards."""

    def __init__(self, cfg: BuildConfig):
        from .propose import ModelStage

        self.cfg, self.models = cfg, ModelStage(cfg.regions)

    def __call__(self, row: dict) -> dict:
        work, results = pickle.loads(row["work"]), pickle.loads(row["results"])
        return {"k": row["k"], "marker": json.dumps(finish_shard(work, results, self.cfg,
                                                                 self.models))}


def _ray_init(cfg: BuildConfig) -> bool:
    """Join ``--address`` or start an embedded local Ray; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    # Workers need no key from the environment: the Deidentifier travels with the tasks.
    if cfg.execution.address:
        ray.init(address=cfg.execution.address, log_to_driver=False)
    else:
        # address="local": always a fresh embedded instance, never a cluster that happens to
        # run on this machine (ray.init() alone would join it)
        ray.init(address="local", num_cpus=workers(cfg), include_dashboard=False,
                 log_to_driver=False)
    return True


def run_ray(works: list[ShardWork], cfg: BuildConfig, deid: Deidentifier, on_marker) -> None:
    """The Ray Data pipeline over shards (see module doc)."""
    import ray

    started = _ray_init(cfg)
    try:
        items = [{"k": w.k, "work": pickle.dumps(w)} for w in works]
        if not items:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver prints its own progress lines (below)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ex = cfg.execution
        retries = ex.max_retries  # explicit: Ray's default for crashed workers is to retry
        ds = ds.map(cpu_shard, fn_kwargs={"cfg": cfg, "deid": deid}, num_cpus=1,
                    max_retries=retries)
        if needs_models(cfg):
            gpus = ex.gpus_per_actor if ex.gpus_per_actor >= 0 else (
                1.0 if cfg.regions.device.startswith("cuda") else 0.0)
            ds = ds.map(_ModelShard, fn_constructor_kwargs={"cfg": cfg},
                        concurrency=ex.model_actors, num_gpus=gpus, num_cpus=1,
                        max_restarts=retries, max_task_retries=retries)
        t0 = time.monotonic()
        for n, row in enumerate(ds.iter_rows(), 1):
            on_marker(json.loads(row["marker"]))
            progress("shards", n, len(items), t0)
    finally:
        if started:
            ray.shutdown()
