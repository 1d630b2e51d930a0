"""python -m workflows.bench_units [--patients 4] [--matrix 512] [--units 8] [--rounds 3]

Worker cost of one series, stage by stage: ``process_unit`` (read, labels, cut, regions,
captions: the work every build-corpus worker does per series) run in this one process, with
one OpenCV thread as in the build's workers, over the first ``--units`` series of a phantom
collection made at ``--matrix`` pixels in-plane (160 is the scale benchmark's size; 512 is a
clinical CT matrix). Reports milliseconds per image per stage (best of ``--rounds`` passes
over the same series, after one warm-up unit) and a sha256 of the produced image and region
rows, so two checkouts can be compared for speed and for identical output. Results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2


def run(patients: int, matrix: int, units: int, rounds: int, work: Path) -> dict:
    from pipeline.phantoms.studies import make_phantoms
    from pipeline.run.execute import quiet_libraries
    from pipeline.run.unit import process_unit
    from workflows.bench_corpus import unit_tasks

    quiet_libraries()
    cv2.setNumThreads(1)  # as in the build's workers (pipeline.run.execute.one_thread_per_worker)
    src = work / f"phantoms_{patients}_{matrix}"
    if not src.exists():
        make_phantoms(src, patients=patients, seed=0, matrix=matrix)
    cfg, deid, tasks = unit_tasks(src, work / "unused")
    tasks = tasks[:units]
    process_unit(tasks[0], cfg, deid)  # imports and first-use work
    digest, best = hashlib.sha256(), None
    for k in range(rounds):
        stages, n_img, n_reg, t = Counter(), 0, 0, time.perf_counter()
        for task in tasks:
            res = process_unit(task, cfg, deid)
            stages.update(res.stage_s)
            n_img, n_reg = n_img + len(res.images), n_reg + len(res.regions)
            if k == 0:
                digest.update(json.dumps([res.images, res.regions], sort_keys=True,
                                         default=repr).encode())
        wall = time.perf_counter() - t
        if best is None or wall < best[0]:
            best = (wall, stages)
    wall, stages = best
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "matrix": matrix,
            "series": len(tasks), "images": n_img, "regions": n_reg,
            "ms_per_image": {k: round(v / n_img * 1e3, 3) for k, v in sorted(stages.items())},
            "total_ms_per_image": round(wall / n_img * 1e3, 3),
            "rows_sha256": digest.hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_units", description=__doc__.split("\n\n")[1])
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--matrix", type=int, default=512, help="in-plane pixels of the phantoms")
    p.add_argument("--units", type=int, default=8, help="series timed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, help="folder for the phantoms (default: a temp folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_units_") as tmp:
        r = run(args.patients, args.matrix, args.units, args.rounds, args.work or Path(tmp))
    print(json.dumps(r, indent=1))
    s = r["ms_per_image"]
    print(f"| {r['matrix']} | {r['images']} | {r['regions']} | "
          + " | ".join(str(s.get(k, 0.0)) for k in ("read", "labels", "cut", "regions", "captions"))
          + f" | {r['total_ms_per_image']} | {r['rows_sha256']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
