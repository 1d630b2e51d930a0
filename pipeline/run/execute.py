"""Executors: the same stage functions run in-process (local) or on Ray Data (embedded or a
cluster). Both hand each committed shard's marker to ``on_marker`` as soon as it exists.

local: units of all pending shards stream through forked, isolated workers (``--workers`` at
    once); a shard is committed by this process when its last unit is back; the model stage
    (SAM/YOLO) runs here, once loaded.
ray:  a Ray Data pipeline over shards. CPU stage: an actor pool of 1-CPU actors (one per CPU
    Ray offers at the start, less the model actors, at most one per shard), restarts and task
    retries set explicitly (Ray Data's default for actors is to retry forever); Ray Data
    queues the next shard at each actor, so a CPU never idles between shards (as 1-CPU tasks
    each shard cost ~0.2 s of scheduling gap: 5 % on this machine's 100k build). Inside, units
    run in the actor's forked children under timeout and memory cap (``pipeline.run.isolate``),
    kept warm from shard to shard, so a decoder crash is a row, not a lost actor. Model stage
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

from pipeline.config import BuildConfig
from pipeline.ingest.deid import Deidentifier
from pipeline.run.isolate import Isolator
from pipeline.run.shards import ShardWork, failed_unit, finish_shard
from pipeline.run.unit import process_unit

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


def one_thread_per_worker() -> None:
    """Parallelism comes from the workers: OpenCV's own thread pool would add a second busy
    thread per worker (measured: +20 % CPU, no faster), so each worker process uses one."""
    import cv2

    cv2.setNumThreads(1)


def unit_isolator(cfg: BuildConfig, deid: Deidentifier, n_workers: int) -> Isolator:
    """Forked children that run ``process_unit`` under the unit timeout and memory cap."""
    return Isolator(partial(process_unit, cfg=cfg, deid=deid), n_workers,
                    cfg.execution.unit_timeout_s, cfg.execution.unit_memory_mb << 20)


def _unit_result(task, status: str, value):
    """The unit's result, or its files as failure rows when its isolated child failed."""
    return value if status == "ok" else failed_unit(task, value)


def run_local(works: list[ShardWork], cfg: BuildConfig, deid: Deidentifier, on_marker) -> None:
    """Stream every pending unit through isolated workers; commit shards as they complete."""
    models = None
    if works and cfg.regions.uses_models:
        from pipeline.roi.propose import ModelStage

        models = ModelStage(cfg.regions)  # lives in this process; forked children never use it
    one_thread_per_worker()  # inherited by the forked workers
    flat = [(w, t) for w in works for t in w.tasks]
    results: dict[int, dict] = {w.k: {} for w in works}
    t0 = time.monotonic()
    with unit_isolator(cfg, deid, workers(cfg)) as iso:
        for n, (i, status, value) in enumerate(iso.map([t for _, t in flat]), 1):
            work, task = flat[i]
            results[work.k][task.unit_key] = _unit_result(task, status, value)
            progress("series", n, len(flat), t0)
            if len(results[work.k]) == len(work.tasks):
                on_marker(finish_shard(work, results.pop(work.k), cfg, models))


class _CpuShard:
    """Ray Data CPU stage: an actor that runs one shard's units at a time in its forked,
    isolated children (kept warm across shards); it commits the shard unless the model stage
    follows."""

    def __init__(self, cfg: BuildConfig, deid: Deidentifier):
        one_thread_per_worker()  # inherited by the forked children
        self.cfg, self.isolator = cfg, unit_isolator(cfg, deid, 1)

    def __call__(self, row: dict) -> dict:
        work: ShardWork = pickle.loads(row["work"])
        results = {}
        for i, status, value in self.isolator.map(work.tasks):
            results[work.tasks[i].unit_key] = _unit_result(work.tasks[i], status, value)
        if self.cfg.regions.uses_models:
            return {"k": row["k"], "work": row["work"], "results": pickle.dumps(results),
                    "marker": ""}
        return {"k": row["k"], "marker": json.dumps(finish_shard(work, results, self.cfg))}


class _ModelShard:
    """Ray Data model stage: an actor holding YOLO + SAM; finishes and commits shards."""

    def __init__(self, cfg: BuildConfig):
        from pipeline.roi.propose import ModelStage

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
    """The Ray Data pipeline over shards (see module doc). Empties ``works`` once pickled, so
    the driver does not hold every file's entry for the whole run."""
    import ray

    started = _ray_init(cfg)
    try:
        items = [{"k": w.k, "work": pickle.dumps(w)} for w in works]
        works.clear()  # the shards' file entries now live only in ``items`` (smaller, pickled)
        n = len(items)
        if not items:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver prints its own progress lines (below)
        ds = ray.data.from_items(items, override_num_blocks=n)
        del items  # in the object store now
        ex = cfg.execution
        retries = ex.max_retries  # explicit: Ray's default for crashed workers is to retry
        model_cpus = ex.model_actors if cfg.regions.uses_models else 0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        cpu_actors = max(1, min(n, cpus - model_cpus))
        # one shard running and one queued per actor: no idle gap, and at the end no actor
        # holds a backlog while another has none
        ds = ds.map(_CpuShard, fn_constructor_kwargs={"cfg": cfg, "deid": deid},
                    compute=ray.data.ActorPoolStrategy(size=cpu_actors,
                                                       max_tasks_in_flight_per_actor=2),
                    num_cpus=1, max_restarts=retries, max_task_retries=retries)
        if cfg.regions.uses_models:
            gpus = ex.gpus_per_actor if ex.gpus_per_actor >= 0 else (
                1.0 if cfg.regions.device.startswith("cuda") else 0.0)
            ds = ds.map(_ModelShard, fn_constructor_kwargs={"cfg": cfg},
                        compute=ray.data.ActorPoolStrategy(size=ex.model_actors),
                        num_gpus=gpus, num_cpus=1,
                        max_restarts=retries, max_task_retries=retries)
        t0 = time.monotonic()
        for done, row in enumerate(ds.iter_rows(), 1):
            on_marker(json.loads(row["marker"]))
            progress("shards", done, n, t0)
    finally:
        if started:
            ray.shutdown()
