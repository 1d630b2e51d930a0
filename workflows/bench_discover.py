"""python -m workflows.bench_discover --patients 480 [--matrix 160] [--workers 2] [--src DIR]
       [--executor local|ray]

Discovery at scale: walk, header scan and grouping of a phantom collection
(``workflows/make_phantoms.py``; ~54 files and ~210 regions per patient at ``--matrix 160``, so
2 400 patients ≈ 500k regions ≈ 130k files), each pass in a fresh process as build-corpus runs
it: a full scan into an empty output, then a resume over the same output with nothing changed
(every header taken from the file index), then one with one file in a hundred touched. Reports
per pass: wall seconds (walk, index read, header scan in forked workers, index write,
grouping; imports excluded), headers read, headers taken from the index, and the head process's
peak RSS (its own, not the scan workers'), also per file above its RSS before discovery.
Prints JSON and a markdown row for docs/benchmarks.md. ``--src`` reuses a collection (made
there when it is empty).

Each pass runs what a build's head runs before the series stage (``pipeline.run.build.plan_run``:
walk, file index, header scan, index write, grouping, resume check, shard plan, discovery rows
committed), then makes every pending shard's payload as the Ray executor does (tasks and entries
of one shard, pickled, dropped): ``dispatch_s`` and ``payload_bytes_per_file`` (what the Ray
driver hands the object store), and the peak RSS before (``planned_peak_rss_mb``) and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PASS = r"""
import workflows.build_corpus  # first: the allocator settings build-corpus runs with
import json, pickle, resource, sys, time
from pathlib import Path
import pandas  # loaded by the first Parquet write of any build: its import is not discovery's
from pipeline import storage
from pipeline.config import BuildConfig, ExecConfig
from pipeline.ingest.deid import Deidentifier
from pipeline.run.build import plan_run
from pipeline.run.scan import stop_ray
from pipeline.write import committed_shards
cfg = BuildConfig(sources=(Path(sys.argv[1]),), out=Path(sys.argv[2]),
                  execution=ExecConfig(executor=sys.argv[4], workers=int(sys.argv[3])))
deid = Deidentifier.from_env()
storage.makedirs(cfg.out)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
markers, replaced = committed_shards(cfg.out)
n_files, pending, fields, resume = plan_run(cfg, deid, markers, replaced)
wall = time.perf_counter() - t
planned = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
payload = sum(len(pickle.dumps(w)) for w in pending)  # each shard made, pickled, dropped
dispatch = time.perf_counter() - t
stop_ray()  # a Ray pass: the embedded instance it started (not timed)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({**fields["header_scan"], "units": pending.n_units(), "shards": len(pending),
                  "wall_s": round(wall, 2), "dispatch_s": round(dispatch, 2),
                  "payload_bytes_per_file": round(payload / max(1, n_files)),
                  "rss_before_mb": round(before / 1024, 1),
                  "planned_peak_rss_mb": round(planned / 1024, 1),
                  "peak_rss_mb": round(peak / 1024, 1),
                  "kb_per_file": round((peak - before) / max(1, n_files), 3)}))
"""


# --default-allocators: the allocators' own defaults instead of build-corpus's settings
DEFAULT_ALLOCATORS = {"_RJEM_MALLOC_CONF": "", "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}


def run_pass(src: Path, out: Path, workers: int, executor: str,
             default_allocators: bool = False) -> dict:
    """One discovery pass in a fresh interpreter (its peak RSS is the pass's own)."""
    env = {**os.environ, **(DEFAULT_ALLOCATORS if default_allocators else {})}
    proc = subprocess.run([sys.executable, "-c", PASS, str(src), str(out), str(workers),
                           executor],
                          check=True, capture_output=True, text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def touch_some(src: Path, every: int = 100) -> int:
    """Advance the modification time of one DICOM file in ``every`` → how many."""
    n = 0
    for i, p in enumerate(sorted(src.rglob("*.dcm"))):
        if i % every == 0:
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=480)
    ap.add_argument("--matrix", type=int, default=160)
    ap.add_argument("--workers", type=int, default=2, help="header-scan worker processes")
    ap.add_argument("--src", type=Path, default=None, help="collection folder (kept)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="header scan in forked workers, or as Ray tasks (embedded Ray)")
    ap.add_argument("--default-allocators", action="store_true",
                    help="Polars' and Arrow's own allocator defaults, not build-corpus's")
    args = ap.parse_args(argv)
    from pipeline.phantoms.studies import make_phantoms

    tmp = Path(tempfile.mkdtemp(prefix="bench-discover-"))
    src = args.src or tmp / "src"
    t = time.perf_counter()
    if not src.exists() or not any(src.iterdir()):
        make_phantoms(src, args.patients, matrix=args.matrix, workers=args.workers)
    made_s = time.perf_counter() - t
    out = tmp / "out"
    alloc = args.default_allocators
    full = run_pass(src, out, args.workers, args.executor, alloc)
    resume = run_pass(src, out, args.workers, args.executor, alloc)
    touched = touch_some(src)
    changed = run_pass(src, out, args.workers, args.executor, alloc)
    report = {"patients": args.patients, "matrix": args.matrix, "workers": args.workers,
              "executor": args.executor, "default_allocators": alloc,
              "files": full["files"], "make_s": round(made_s, 1), "full": full,
              "resume_unchanged": resume, "touched": touched, "resume_touched": changed,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs"}
    print(json.dumps(report, indent=1))
    print(f"| {args.patients} | {full['files']} | {full['wall_s']} | {full['peak_rss_mb']} | "
          f"{full['kb_per_file']} | {resume['wall_s']} | {resume['scanned']} | "
          f"{resume['peak_rss_mb']} | {changed['wall_s']} | {changed['scanned']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
