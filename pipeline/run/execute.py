"""Executors: the same stage functions run in-process (local) or on Ray Data (embedded or a
cluster). Both hand each committed shard's marker to ``on_marker`` as soon as it exists.

local: units of all pending shards stream through forked, isolated workers (``--workers`` at
    once); a shard is committed by this process when its last unit is back; the model stage
    (SAM/YOLO) runs here, once loaded, on each finished shard's images (:func:`shard_regions`).
ray:  a Ray Data pipeline over shards. CPU stage: an actor pool of 1-CPU actors (one per CPU
    Ray offers at the start, less the model actors, at most one per shard), restarts and task
    retries set explicitly (Ray Data's default for actors is to retry forever); Ray Data
    queues the next shard at each actor, so a CPU never idles between shards (as 1-CPU tasks
    each shard cost ~0.2 s of scheduling gap: 5 % on this machine's 100k build). Inside, units
    run in the actor's forked children under timeout and memory cap (``pipeline.run.isolate``),
    kept warm from shard to shard, so a decoder crash is a row, not a lost actor. Model stage
    (boxes/detector routes): ``--model-actors`` Ray actors (:class:`_ModelServer`, by default
    one per GPU, resolved with the cluster's GPUs; ``--gpus-per-actor``) where YOLO and SAM
    share one process and do model work only. The CPU actor that ran a shard's units decodes
    its images to uint8 with their prompt boxes, calls a model actor (round robin) with the
    whole shard (``--encoder-batch`` images per encoder call across its units), turns the
    packed masks it gets back into regions, captions them and commits: the same three steps
    as the local executor (:func:`shard_regions`). A GPU is shared by two model actors only
    with a fractional --gpus-per-actor (docs/cluster.md). The CPU actor writes the shard (temp
    → rename → marker), so the driver only ever sees small markers.

Memory, per node (Ray): each CPU actor reserves Ray's ``memory`` resource for what its unit
workers may allocate (``--unit-memory-mb``, the address-space cap above what a forked child
inherits, × the children it runs at once), each model actor :data:`MODEL_ACTOR_BYTES`. Ray places
an actor on a node only while the reservations there stay within the node's ``memory``
resource (by default its available memory at start less the object store), so the units running
at once on a node cannot add up past it; the CPU pool is sized to what the nodes hold
(:func:`ray_pool_plan`).

Library loggers: pydicom's warnings quote header values (PHI). :func:`quiet_libraries` runs in
the driver, in each Ray actor's ``__init__`` and before the local executor forks; forked unit
workers inherit it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time
import warnings
from collections.abc import Iterable
from functools import partial
from itertools import count

from pipeline.config import BuildConfig, check_cluster_gpus, model_actor_gpus
from pipeline.ingest.deid import Deidentifier
from pipeline.run.isolate import Isolator
from pipeline.run.shards import ShardWork, failed_unit, finish_shard
from pipeline.run.unit import process_unit

log = logging.getLogger("regioncorpus")

CPU_ACTOR_CHILDREN = 1  # unit workers a Ray CPU actor runs at once (its Isolator's width)
# Host memory a model actor reserves: an estimate for SAM ViT-B (0.4 GB of fp32 weights, a
# 1024² encoder pass on CPU ~1.5 GB of activations) + YOLO (< 0.1 GB) + torch's runtime and,
# on a GPU, its CUDA context (~1 GB) + one shard's unpickled unit results: 4 GiB.
MODEL_ACTOR_BYTES = 4 << 30

def quiet_libraries() -> None:
    """pydicom's and nibabel's warnings and log records quote header values (which may be PHI):
    keep them out of every log. Forked children inherit the levels and filters."""
    import nibabel  # noqa: F401  (imported first: importing pydicom sets its logger's level)
    import pydicom  # noqa: F401

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", module=r"nibabel(\..*)?")
    warnings.filterwarnings("ignore", message=r".*VR .*")


def progress(stage: str, done: int, total: int, t0: float) -> None:
    """On stderr: a live bar per stage on a terminal, else a plain line every few seconds
    and the final one (:mod:`pipeline.run.progress`)."""
    from pipeline.run.progress import report

    report(stage, done, total, t0, stream=sys.stderr)


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


def shard_regions(models, work: ShardWork, results: dict, cfg: BuildConfig):
    """The model stage for one shard, as ``finish_shard`` takes it (None without one): the
    shard's model inputs (CPU side), ``models`` over them (a ``ModelStage``, or a Ray actor
    handle's ``run``), and the CPU-side regions step over its answer. The model's seconds are
    added to the ``models`` stage of the shard's first unit."""
    if models is None:
        return None
    from pipeline.roi.propose import Regions, unit_inputs

    inputs = unit_inputs([results[t.unit_key] for t in work.tasks], cfg.regions)
    t = time.perf_counter()
    outputs = models(inputs)
    if work.tasks:
        spent = results[work.tasks[0].unit_key].stage_s
        spent["models"] = spent.get("models", 0.0) + time.perf_counter() - t
    return Regions(outputs, cfg.regions)


def run_local(works: Iterable[ShardWork], cfg: BuildConfig, deid: Deidentifier, on_marker,
              n_units: int | None = None) -> None:
    """Stream every pending unit through isolated workers; commit shards as they complete.
    ``works`` is iterated as workers free up (a :class:`~pipeline.run.shards.Pending` makes
    each shard's tasks then); ``n_units``: how many units in all (progress)."""
    if n_units is None:
        works = list(works)
        n_units = sum(len(w.tasks) for w in works)
    models = None
    if n_units and cfg.regions.uses_models:
        from pipeline.roi.propose import ModelStage

        models = ModelStage(cfg.regions)  # lives in this process; forked children never use it
    one_thread_per_worker()  # inherited by the forked workers
    quiet_libraries()  # likewise
    held: dict[int, tuple[ShardWork, object]] = {}  # item number → (shard, task) until done
    results: dict[int, dict] = {}
    numbers = count()

    def items():
        for work in works:
            results[work.k] = {}
            for task in work.tasks:
                held[next(numbers)] = (work, task)
                yield task

    t0 = time.monotonic()
    with unit_isolator(cfg, deid, workers(cfg)) as iso:
        for n, (i, status, value) in enumerate(iso.map(items()), 1):
            work, task = held.pop(i)
            results[work.k][task.unit_key] = _unit_result(task, status, value)
            progress("series", n, n_units, t0)
            if len(results[work.k]) == len(work.tasks):
                done = results.pop(work.k)
                on_marker(finish_shard(work, done, cfg, shard_regions(models, work, done, cfg)))


class _CpuShard:
    """Ray Data CPU stage: an actor that runs one shard's units at a time in its forked,
    isolated children (kept warm across shards), hands the shard's images to a model actor
    when there is a model stage, and commits the shard."""

    def __init__(self, cfg: BuildConfig, deid: Deidentifier, model_actors: list | None = None):
        one_thread_per_worker()  # inherited by the forked children
        quiet_libraries()  # a Ray worker process: nothing of the driver's setup reaches it
        # round robin from a per-process offset, so the CPU actors do not all start at actor 0
        self.cfg, self.model_actors, self.calls = cfg, model_actors or [], os.getpid()
        self.isolator = unit_isolator(cfg, deid, CPU_ACTOR_CHILDREN)

    def _models(self, inputs):
        """One model actor's answer for ``inputs`` (round robin over the pool)."""
        import ray

        actor = self.model_actors[self.calls % len(self.model_actors)]
        self.calls += 1
        return ray.get(actor.run.remote(inputs))

    def __call__(self, row: dict) -> dict:
        work: ShardWork = pickle.loads(row["work"])
        results = {}
        for i, status, value in self.isolator.map(work.tasks):
            results[work.tasks[i].unit_key] = _unit_result(work.tasks[i], status, value)
        models = self._models if self.model_actors else None
        regions = shard_regions(models, work, results, self.cfg)
        return {"k": row["k"], "marker": json.dumps(finish_shard(work, results, self.cfg,
                                                                 regions))}


class _ModelServer:
    """A model actor: YOLO + SAM resident, model work only (``run``: [ModelInput] →
    ModelOutputs, see ``pipeline.roi.propose``)."""

    def __init__(self, cfg: BuildConfig):
        from pipeline.roi.propose import ModelStage

        quiet_libraries()
        self.models = ModelStage(cfg.regions)

    def run(self, inputs: list):
        return self.models(inputs)


def ray_pool_plan(nodes: list[dict], cfg: BuildConfig, shards: int) -> tuple[int, int, int]:
    """(CPU actors, bytes each CPU actor reserves, bytes each model actor reserves) for the
    alive nodes' resources (``ray.nodes()[i]["Resources"]``: "CPU", "memory" in bytes).

    A CPU actor reserves its unit cap × :data:`CPU_ACTOR_CHILDREN`; where no node holds one CPU
    actor and one model actor, both reservations shrink to fit the largest (said in the log).
    The pool is at most the CPU actors the nodes hold by CPU and by memory, less the slots the
    model actors take, at least 1 and at most one per shard."""
    uses_models = cfg.regions.uses_models
    cpu_mem = (cfg.execution.unit_memory_mb << 20) * CPU_ACTOR_CHILDREN
    model_mem = MODEL_ACTOR_BYTES if uses_models else 0
    largest = int(max((r.get("memory", 0) for r in nodes), default=0))
    if 0 < largest < cpu_mem + model_mem:
        log.warning("--unit-memory-mb %d: no node holds it (largest: %d MiB); reserving "
                    "what fits", cfg.execution.unit_memory_mb, largest >> 20)
        scale = largest / (cpu_mem + model_mem)
        cpu_mem, model_mem = int(cpu_mem * scale), int(model_mem * scale)
    fits = sum(min(int(r.get("CPU", 0)), int(r.get("memory", 0) // cpu_mem)) for r in nodes)
    model_actors = cfg.execution.model_actors if uses_models else 0
    displaced = model_actors * max(1, -(-model_mem // cpu_mem))  # a CPU and model_mem each
    return max(1, min(shards, fits - displaced)), cpu_mem, model_mem


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


def run_ray(works: Iterable[ShardWork], cfg: BuildConfig, deid: Deidentifier, on_marker,
            n_units: int | None = None) -> None:
    """The Ray Data pipeline over shards (see module doc). Each shard is pickled as it is
    made (:class:`~pipeline.run.shards.Pending`), so the driver holds one shard's entries as
    objects at a time; ``n_units`` is not used (progress counts shards)."""
    import ray

    started = _ray_init(cfg)
    try:
        # before any work reaches the cluster: --device auto resolved against its GPUs, and a
        # model stage that would wait forever for GPUs the cluster lacks refused
        cfg = check_cluster_gpus(cfg, ray.cluster_resources())
        items = [{"k": w.k, "work": pickle.dumps(w)} for w in works]
        n = len(items)
        if not items:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver prints its own progress lines (below)
        ds = ray.data.from_items(items, override_num_blocks=n)
        del items  # in the object store now
        ex = cfg.execution
        retries = ex.max_retries  # explicit: Ray's default for crashed workers is to retry
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        cpu_actors, cpu_mem, model_mem = ray_pool_plan(nodes, cfg, n)
        # one shard running and one queued per actor: no idle gap, and at the end no actor
        # holds a backlog while another has none
        model_actors = []
        if cfg.regions.uses_models:
            server = ray.remote(num_gpus=model_actor_gpus(cfg), num_cpus=1, memory=model_mem,
                                max_restarts=retries, max_task_retries=retries)(_ModelServer)
            model_actors = [server.remote(cfg) for _ in range(ex.model_actors)]
        ds = ds.map(_CpuShard, fn_constructor_kwargs={"cfg": cfg, "deid": deid,
                                                      "model_actors": model_actors},
                    compute=ray.data.ActorPoolStrategy(size=cpu_actors,
                                                       max_tasks_in_flight_per_actor=2),
                    num_cpus=1, memory=cpu_mem, max_restarts=retries,
                    max_task_retries=retries)
        t0 = time.monotonic()
        for done, row in enumerate(ds.iter_rows(), 1):
            on_marker(json.loads(row["marker"]))
            progress("shards", done, n, t0)
    finally:
        if started:
            ray.shutdown()
