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
It ends by naming what each step produced, its headline number (corpus counts, zero-shot and
retrieval of both models, the detector's test mAP50 and recall, said plainly when the short
detector run finds too little to be of use) and where each result is. Rerunning it into the
same --out is refused unless --overwrite (then the phantoms and the two model runs are
replaced; the corpus build resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
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


# A trained detector's numbers (docs/benchmarks.md, "Detector: YOLO trained on the phantom
# collection"): 48 phantom patients, 40 minutes of CPU training.
TRAINED_DETECTOR = ("docs/benchmarks.md, section 'Detector: YOLO trained on the phantom "
                    "collection' (48 patients, 40 min on CPU: test mAP50 0.925, recall of "
                    "lesions >= 10 mm 1.000)")
DETECTOR_USABLE_RECALL = 0.5  # recall of lesions >= 10 mm on the test patients


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _num(v, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "n/a"


def detector_lines(metrics: dict) -> list[str]:
    """The detector's headline (test mAP50, recall, recall of lesions >= 10 mm) and, when it
    finds fewer than half of those lesions, the plain statement that the step only exercises
    the route, and where a trained detector's numbers are."""
    big = metrics.get("box_recall", {}).get("by_size", {}).get("ge_10mm", {})
    lines = [train_detector.headline(metrics)]
    if not (big.get("recall") or 0) >= DETECTOR_USABLE_RECALL:
        lines += ["NOTE: this short run only exercises the detector route (train, export, "
                  "--roi detector);", "it is not a usable detector. A trained one: "
                  + TRAINED_DETECTOR]
    return lines


def corpus_lines(corpus: Path) -> list[str]:
    """Files, series, images and regions of the corpus, regions by route."""
    from pipeline.write import read_table

    s = _json(corpus / "build_summary.json") or _json(corpus / "manifest.json")
    rows = s.get("rows", {})
    try:
        by_source = Counter(r["source"] for r in read_table(corpus, "regions", ["source"]))
    except (OSError, ValueError):  # no corpus (a step failed): counts only
        by_source = Counter()
    routes = ", ".join(f"{n} {k}" for k, n in sorted(by_source.items()))
    return [f"{s.get('found', '?')} files ({s.get('ingested', '?')} ingested, "
            f"{s.get('quarantined', '?')} quarantined) -> {rows.get('series', '?')} series, "
            f"{rows.get('images', '?')} images, {rows.get('regions', '?')} regions "
            f"({routes})"]


def model_line(res: dict) -> str:
    """Region zero-shot accuracy, image zero-shot AUC, image -> report R@5 of one run."""
    ret = res.get("retrieval", {})
    i2r = next((v for k, v in sorted(ret.items()) if k.startswith("image_to_")), {})
    return (f"region zero-shot accuracy {_num(res.get('region_zero_shot', {}).get('accuracy'))}"
            f", image zero-shot AUC {_num(res.get('image_zero_shot', {}).get('auc'))}"
            f", image->report R@5 {_num(i2r.get('r5'))}")


def closing_report(o: Path, patients: int, timings: dict) -> str:
    """What each step produced, its headline number and where it is."""
    ev = _json(o / "reports" / "evaluation.json")
    det, corpus = o / "runs" / "detector", o / "corpus"
    report = o / "reports" / "evaluation.html"
    gallery = o / "gallery" / "index.html"
    items = [
        ("make-phantoms", [f"{patients} synthetic CT studies (DICOM + label maps, fake PHI)"],
         o / "phantoms"),
        ("train-detector", detector_lines(_json(det / "metrics.json")), det / "metrics.json"),
        ("build-corpus", corpus_lines(corpus), corpus / "manifest.json"),
        ("train-model", [model_line(ev.get("region_aware", {}))], o / "runs" / "model"),
        ("--global-only", [model_line(ev.get("global_only", {}))], o / "runs" / "global_only"),
        ("evaluate-model", ["held-out test patients; tables, confusion, ROC, R@K plots"],
         report if report.is_file() else o / "reports" / "evaluation.md"),
        ("browse-catalog", ["caption check and the HTML gallery"], gallery),
    ]
    out = [f"\nDemo results in {o}:"]
    for name, lines, path in items:
        out.append(f"  {name:<15} {lines[0]}")
        out += [f"  {'':<15} {line}" for line in lines[1:]]
        out.append(f"  {'':<15} -> {path}")
    out.append("  time per step (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return "\n".join(out)


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
    print(closing_report(o, args.patients, t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
