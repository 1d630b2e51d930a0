"""python -m workflows.bench_corpus --sizes 1000,10000,100000 [--workers 2] [--executor ray]

Corpus-build scaling on phantom collections of growing size (labels route with captions,
every slice cut): for each size, build-corpus in a subprocess (regions/s, peak RSS of the whole
process tree, time per stage), and in the same run (a) the floor: pydicom decode + window + PNG
encode of the same slices with nothing else, on the same number of processes, and (b) a plain
single-process loop doing the same work as the build (the same stage functions, in-process, no
isolation, one Parquet file), with its CPU time over its wall time (above 1 where OpenCV runs
threads of its own; ``--plain-cv2-threads 1`` makes it one thread). Both sides time the same
unit stages (read, labels, cut, regions, captions): ``unit_work_build_over_plain`` is their
summed seconds in the build's workers over the plain loop's, 1.0 when the machine ran as fast
in both windows (plus the build's few % of preemption by Ray's processes). Prints JSON and
markdown rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import psutil
import pydicom

UNIT_STAGES = ("read", "labels", "cut", "regions", "captions")  # process_unit's own stages
REGIONS_PER_PATIENT = 210  # with --every-k 1 on the default phantoms (measured: 207-213, see docs)


def _floor_file(path: str) -> int:
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = np.clip((hu + 160.0) * (255.0 / 400.0), 0, 255).astype(np.uint8)
    return int(cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])[0])


def floor(src: Path, workers: int) -> tuple[int, float]:
    files = sorted(str(p) for p in src.rglob("*.dcm"))
    t = time.perf_counter()
    with Pool(workers) as pool:
        n = sum(pool.map(_floor_file, files, chunksize=64))
    return n, time.perf_counter() - t


def unit_tasks(src: Path, out: Path):
    """(config, key, units) of a build of ``src`` cutting every slice, discovered in this
    process (walk, header scan, grouping): the plain loop's and bench_units' way in."""
    from pipeline.config import BuildConfig
    from pipeline.images.slicing import SliceConfig
    from pipeline.ingest.deid import Deidentifier
    from pipeline.ingest.discover import scan_headers, walk
    from pipeline.ingest.units import group_units

    cfg = BuildConfig(sources=(src,), out=out, slicing=SliceConfig(every_k=1))
    deid = Deidentifier.from_env()
    return cfg, deid, list(group_units(scan_headers(walk(cfg.sources, deid)), deid))


def plain_loop(src: Path, out: Path, cv2_threads: int | None = None
               ) -> tuple[int, int, float, float, dict]:
    """The same work as build-corpus (discover, units, regions, captions), one process →
    (images, regions, wall s, CPU s of this process: OpenCV's own threads included, seconds
    per unit stage summed as the build's manifest sums them).
    ``cv2_threads``: OpenCV's thread count for the loop (None: OpenCV's default)."""
    import resource

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.run.execute import quiet_libraries
    from pipeline.run.unit import process_unit
    from pipeline.write import IMAGES_SCHEMA, REGIONS_SCHEMA

    quiet_libraries()
    threads = cv2.getNumThreads()
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    t, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    cfg, deid, tasks = unit_tasks(src, out)
    images, regions, stage_s = [], [], Counter()
    for task in tasks:
        res = process_unit(task, cfg, deid)
        images += res.images
        regions += res.regions
        stage_s.update(res.stage_s)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(images, IMAGES_SCHEMA), out / "images.parquet")
    pq.write_table(pa.Table.from_pylist(regions, REGIONS_SCHEMA), out / "regions.parquet")
    wall, end = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    cv2.setNumThreads(threads)
    cpu = end.ru_utime + end.ru_stime - ru.ru_utime - ru.ru_stime
    return len(images), len(regions), wall, cpu, {k: round(v, 3) for k, v in stage_s.items()}


def build(src: Path, out: Path, workers: int, executor: str) -> dict:
    cmd = [sys.executable, "-m", "workflows.build_corpus", str(src), "--out", str(out),
           "--every-k", "1", "--workers", str(workers), "--executor", executor]
    t, peak = time.perf_counter(), 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t
    manifest = json.loads((out / "manifest.json").read_text())
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_mb": peak / 2**20,
            "rows": manifest["rows"], "timings_s": manifest["timings_s"],
            "worker_stage_s": manifest.get("worker_stage_s", {})}


def run_size(target: int, workers: int, executor: str, work: Path, plain: bool = True,
             plain_threads: int | None = None) -> dict:
    from pipeline.phantoms.studies import make_phantoms

    patients = max(1, math.ceil(target / REGIONS_PER_PATIENT))
    src = work / f"ph{patients}"
    if not src.exists():
        make_phantoms(src, patients=patients, seed=0, workers=workers)
    for old in (work / f"corpus{patients}", work / f"plain{patients}"):
        shutil.rmtree(old, ignore_errors=True)  # a kept corpus would only be resumed
    n_floor, t_floor = floor(src, workers)
    b = build(src, work / f"corpus{patients}", workers, executor)
    n_img, n_reg, t_plain, cpu_plain, plain_stage = (
        plain_loop(src, work / f"plain{patients}", plain_threads) if plain
        else (0, 0, 0.0, 0.0, {}))
    images = b["rows"]["images"]
    ratio = lambda a, b: round(a / b, 3) if b else None  # noqa: E731
    # the same stage functions on both sides: their summed seconds compare the machine's speed
    # in the build's window with its speed in the plain loop's (a shared VM drifts)
    unit_s = lambda st: sum(v for k, v in st.items() if k in UNIT_STAGES)  # noqa: E731
    return {
        "target_regions": target, "patients": patients, "regions": b["rows"]["regions"],
        "images": images, "build_wall_s": round(b["wall_s"], 1),
        "build_regions_per_s": round(b["rows"]["regions"] / b["wall_s"], 1),
        "build_images_per_s": round(images / b["wall_s"], 1),
        "peak_rss_mb": round(b["peak_rss_mb"]), "stage_s": b["timings_s"],
        "worker_stage_s": b["worker_stage_s"],
        "floor_slices_per_s": round(n_floor / t_floor, 1),
        "plain_images_per_s": ratio(n_img, t_plain),
        "plain_regions_per_s": ratio(n_reg, t_plain),
        "build_over_floor": ratio(images / b["wall_s"], n_floor / t_floor),
        "build_over_plain": ratio(images / b["wall_s"], ratio(n_img, t_plain)),
        "cpu_s_per_region_plain": ratio(t_plain, n_reg),
        "plain_cpu_over_wall": ratio(cpu_plain, t_plain),  # > 1: OpenCV's threads
        "plain_stage_s": plain_stage,
        "unit_work_build_over_plain": ratio(unit_s(b["worker_stage_s"]), unit_s(plain_stage)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_corpus", description=__doc__.split("\n\n")[1])
    p.add_argument("--sizes", default="1000,10000,100000", help="target region counts")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--executor", default="ray", choices=("ray", "local"))
    p.add_argument("--work", type=Path, help="work folder (kept); default: a temp folder")
    p.add_argument("--skip-plain-above", type=int, default=10**9,
                   help="skip the single-process comparison above this many regions")
    p.add_argument("--plain-cv2-threads", type=int, default=None,
                   help="OpenCV threads in the plain loop (default: OpenCV's own default)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    work.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        r = run_size(size, args.workers, args.executor, work, size <= args.skip_plain_above,
                     args.plain_cv2_threads)
        r["machine"], r["executor"], r["workers"] = machine, args.executor, args.workers
        rows.append(r)
        print(json.dumps(r), flush=True)
    for r in rows:
        print(f"| {r['regions']} | {r['images']} | {r['build_wall_s']} | {r['build_regions_per_s']} | "
              f"{r['peak_rss_mb']} | {r['floor_slices_per_s']} | {r['build_images_per_s']} | "
              f"{r['plain_images_per_s']} | {r['build_over_floor']} | {r['build_over_plain']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
