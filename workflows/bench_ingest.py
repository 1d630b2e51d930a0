"""python -m workflows.bench_ingest --patients 16 --workers 2

Ingest throughput, in one run over the same phantom series: build-corpus (discover, header
scan, isolated per-series read + de-identify + canonicalise + window + PNG + Parquet commit)
against a plain single-process loop (pydicom read, rescale, numpy window, PNG encode, nothing
else). Both cut every slice (every_k=1). Prints a JSON record and a markdown row; results go
to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom

from pipeline.phantoms.studies import make_phantoms
from workflows import build_corpus


def plain_loop(root: Path) -> int:
    """The baseline: every DICOM file read, rescaled, windowed (W400/L40), PNG-encoded."""
    n = 0
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        img = np.clip((hu - (40 - 200)) * (255.0 / 400), 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        n += int(ok)
    return n


def run(patients: int, workers: int, keep: Path | None) -> dict:
    work = Path(keep or tempfile.mkdtemp(prefix="bench_ingest_"))
    src, out = work / "phantoms", work / "corpus"
    shutil.rmtree(out, ignore_errors=True)
    if not src.exists():
        make_phantoms(src, patients=patients, seed=0)
    n_files = len(list(src.rglob("*.dcm")))
    plain_loop(src)  # warm the page cache for both contenders
    t = time.perf_counter()
    n_plain = plain_loop(src)
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    rc = build_corpus.main([str(src), "--out", str(out), "--every-k", "1", "--workers",
                            str(workers)])
    t_build = time.perf_counter() - t
    manifest = json.loads((out / "manifest.json").read_text())
    n_images = manifest["rows"]["images"]
    if keep is None:
        shutil.rmtree(work)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "patients": patients,
        "dicom_files": n_files, "workers": workers, "build_rc": rc,
        "plain_slices_per_s": round(n_plain / t_plain, 1),
        "build_slices_per_s": round(n_images / t_build, 1),
        "build_over_plain": round((n_images / t_build) / (n_plain / t_plain), 2),
        "build_wall_s": round(t_build, 2), "plain_wall_s": round(t_plain, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_ingest", description=__doc__.split("\n\n")[1])
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="0 = CPU count")
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    args = p.parse_args(argv)
    r = run(args.patients, args.workers, args.keep)
    print(json.dumps(r, indent=1))
    print(f"| {r['machine']} | {r['dicom_files']} | {r['plain_slices_per_s']} | "
          f"{r['build_slices_per_s']} | {r['build_over_plain']}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
