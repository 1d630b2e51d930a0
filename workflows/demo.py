"""python -m workflows.demo --out data/demo

The quick start's main job, the whole chain on the embedded default (local Ray), offline:
  1. make-phantoms: a phantom CT collection (real DICOM + NIfTI label maps, fake PHI)
  2. train-detector (short): YOLO trained from the phantoms' label-map lesions
  3. build-corpus: phantoms + the real files pydicom, nibabel and nilearn ship; regions from
     label maps, LiteMedSAM masks from lung-nodule boxes (a subset: ~1.5 s per image on a
     2-core CPU) and from the detector's boxes, captions and hard negatives
  4. train-model (tiny, short) and a global-only baseline with the same budget
  5. evaluate-model on held-out patients (region-aware vs global-only)
  6. browse-catalog: summary, caption check and the HTML gallery
It ends by printing where each result is. Rerunning it into the same --out is refused unless
--overwrite (then the phantoms and the two model runs are replaced; the corpus build resumes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from workflows import (
    browse_catalog,
    build_corpus,
    evaluate_model,
    make_phantoms,
    train_detector,
    train_model,
)
from workflows.sample_sources import package_sources
from workflows.usage import usage_error

# The demo's studies are synthetic, so they are keyed with this fixed demo key rather than your
# project key: the per-patient split then comes out the same on every machine (8 patients:
# 5 train, 1 val, 2 test), and evaluate-model always has held-out patients.
DEMO_KEY = "regioncorpus-demo-key-14"


def _step(title: str, fn, argv: list[str], timings: dict) -> None:
    print(f"\n== {title}: {' '.join(argv)}", file=sys.stderr, flush=True)
    t = time.monotonic()
    rc = fn(argv)
    timings[title] = round(time.monotonic() - t, 1)
    if rc not in (0, None):
        raise SystemExit(f"demo: step '{title}' failed with exit code {rc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", type=Path, default=Path("data/demo"), help="results folder")
    p.add_argument("--patients", type=int, default=8, help="phantom studies")
    p.add_argument("--detector-epochs", type=int, default=4, help="YOLO epochs (short)")
    p.add_argument("--model-steps", type=int, default=320, help="train-model steps (short)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo an earlier demo in --out (replaces its phantoms and model runs)")
    args = p.parse_args(argv)
    o, t = args.out, {}
    ph, det, corpus = o / "phantoms", o / "runs" / "detector", o / "corpus"
    model, base, report, gallery = (o / "runs" / "model", o / "runs" / "global_only",
                                    o / "reports" / "evaluation.json", o / "gallery")
    if not args.overwrite and any(d.is_dir() and any(d.iterdir()) for d in (ph, model, base)):
        return usage_error(p.prog, ValueError(f"--out {o}: holds an earlier demo; pass "
                                              "--overwrite to redo it, or choose a new folder"))
    again = ["--overwrite"] if args.overwrite else []
    os.environ["REGIONCORPUS_KEY"] = DEMO_KEY  # every step, and the processes they start
    _step("make-phantoms", make_phantoms.main,
          ["--out", str(ph), "--patients", str(args.patients), *again], t)
    _step("train-detector", train_detector.main,
          [str(ph), "--out", str(det), "--epochs", str(args.detector_epochs), "--imgsz", "160"], t)
    _step("build-corpus", build_corpus.main,
          [str(ph), *map(str, package_sources()), "--out", str(corpus),
           "--roi", "labels,boxes,detector", "--box-labels", "nodule",
           "--detector", str(det / "weights" / "detector.pt"), "--det-conf", "0.4",
           "--segmenter", "lite-medsam"], t)
    steps = ["--steps", str(args.model_steps)]
    _step("train-model", train_model.main,
          ["--corpus", str(corpus), "--out", str(model), "--preset", "tiny", *steps, *again], t)
    _step("train-model --global-only", train_model.main,
          ["--corpus", str(corpus), "--out", str(base), "--preset", "tiny", "--global-only",
           *steps, *again], t)
    _step("evaluate-model", evaluate_model.main,
          ["--corpus", str(corpus), "--run", str(model), "--baseline", str(base),
           "--out", str(report)], t)
    _step("browse-catalog", browse_catalog.main,
          [str(corpus), "--verify-captions", "--html", str(gallery), "--limit", "240"], t)
    print("\nResults:")
    for name, path in [("phantom collection", ph), ("detector run", det),
                       ("corpus (files, series, images, regions)", corpus),
                       ("manifest", corpus / "manifest.json"), ("region-aware model", model),
                       ("global-only baseline", base), ("evaluation", report),
                       ("evaluation table", report.with_suffix(".md")),
                       ("HTML gallery", gallery / "index.html")]:
        print(f"  {name:<42} {path}")
    print("  time per step (s): " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
