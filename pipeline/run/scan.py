"""The header scan of a build (and, with Ray, the walk's partitions: :func:`ray_walk`):
batches of DICOM files whose headers the file index did not answer for, each batch parsed in a forked child under a timeout and an address-space cap
(:mod:`pipeline.run.isolate`: a crashing parse costs its batch, not the run).

``--executor local``: the batches run in this process's forked children. ``--executor ray``:
each batch is a Ray task (spread over the cluster's nodes, near the sources they read) that
forks its own isolated child; the driver keeps at most two batches per CPU in flight and merges
results as they arrive. Either way the headers come back keyed
(:func:`pipeline.ingest.discover.key_header`): no raw UID crosses a process boundary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from functools import partial

import polars as pl

from pipeline.config import BuildConfig
from pipeline.errors import IngestError
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.discover import FileEntry, scan_headers
from pipeline.ingest.file_index import to_scan
from pipeline.ingest.found import FOUND_SCHEMA, HEADER_SCHEMA, Found, entry_rows, walk_part
from pipeline.run.execute import _ray_init, progress, workers
from pipeline.run.isolate import run_isolated


def ray_running() -> bool:
    """True when this process is connected to Ray (without importing Ray when it is not)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def stop_ray() -> None:
    """Disconnect from Ray (an embedded instance stops) when connected."""
    if ray_running():
        sys.modules["ray"].shutdown()


def scan_batch(batch: list[FileEntry], deid: Deidentifier, timeout_s: float,
               mem_bytes: int) -> tuple[str, object]:
    """One batch in one isolated child → ("ok", entries) or ("err", IngestError)."""
    ((_, status, value),) = run_isolated(partial(scan_headers, deid=deid), [batch], 1,
                                         timeout_s, mem_bytes)
    return status, value


def _local(batches, cfg: BuildConfig, deid) -> Iterator[tuple[int, str, object]]:
    yield from run_isolated(partial(scan_headers, deid=deid), batches, workers(cfg),
                            cfg.execution.unit_timeout_s, cfg.execution.unit_memory_mb << 20)


def _ray(batches, cfg: BuildConfig, deid) -> Iterator[tuple[int, str, object]]:
    """Batches as Ray tasks, at most two per cluster CPU in flight; a task Ray itself lost
    (its worker died twice) is a ``decode_crash`` batch. Ray is joined or started here when it
    is not yet (the build shuts down what it started, :func:`pipeline.run.build.build`)."""
    import ray

    _ray_init(cfg)  # the series stage's own start: joins --address or starts embedded Ray
    n_workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_retries=cfg.execution.max_retries)(scan_batch)
    ex = cfg.execution
    pending, todo = {}, iter(enumerate(batches))
    while True:
        while len(pending) < 2 * n_workers and (nxt := next(todo, None)) is not None:
            i, batch = nxt
            ref = task.remote(batch, deid, ex.unit_timeout_s, ex.unit_memory_mb << 20)
            pending[ref] = i
        if not pending:
            return
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ref)
        try:
            status, value = ray.get(ref)
        except ray.exceptions.RayError:
            status, value = "err", IngestError("decode_crash", "the worker process exited "
                                               "without a result")
        yield i, status, value


def ray_walk(cfg: BuildConfig, deid: Deidentifier):
    """The walk's partitions as Ray tasks (``Found.walk``'s ``map_parts``): one task per
    :func:`~pipeline.ingest.found.partitions` part (up to 64 subfolders of a root, walked where
    Ray places it: a cluster's nodes list a shared file system in parallel), the rows back in
    walk order. Ray is joined or started here, as for the header scan."""
    import ray

    def run(parts: list[tuple]) -> list:
        if not parts:
            return []
        _ray_init(cfg)
        task = ray.remote(num_cpus=1, max_retries=cfg.execution.max_retries)(walk_part)
        refs = [task.remote(root, label, number, tops, deid, max_bytes)
                for root, label, number, tops, max_bytes in parts]
        return ray.get(refs)

    return run


_RESULT = ("index", "status", "reason", "error", "group_key", *HEADER_SCHEMA)


def scan(found: Found, cfg: BuildConfig, deid: Deidentifier) -> int:
    """Scan the DICOM rows of ``found`` that have no header and no verdict yet, in
    ``cfg.execution.header_batch`` batches (on the build's executor; Ray is started only when
    there is something to scan), into ``found`` → how many were scanned. A batch's
    ``FileEntry`` objects are made as it is handed out and dropped once its rows are back."""
    todo = to_scan(found).to_numpy()
    size = cfg.execution.header_batch
    starts = range(0, len(todo), size)
    batches = (found.entries(todo[i:i + size]) for i in starts)
    t0, done, parts = time.monotonic(), 0, []
    run = _ray if cfg.execution.executor == "ray" and len(todo) else _local
    for i, status, value in run(batches, cfg, deid):
        mine = todo[starts[i]:starts[i] + size]
        if status == "ok":
            parts.append(entry_rows(value).select(_RESULT))
        else:
            parts.append(pl.DataFrame(
                {"index": mine, "status": "quarantined", "reason": value.reason,
                 "error": value.problem},
                schema={k: FOUND_SCHEMA[k] for k in ("index", "status", "reason", "error")}))
        done += len(mine)
        progress("headers", done, len(todo), t0)
    if parts:
        found.update(pl.concat(parts, how="diagonal"))
    return len(todo)
