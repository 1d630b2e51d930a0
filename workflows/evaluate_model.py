"""evaluate-model --corpus DIR --run RUN [--baseline RUN2] --out REPORT.json

Zero-shot classification (region label, region laterality, image labels) and retrieval
(image↔report, region↔caption) of trained runs on the corpus's TEST split. Writes REPORT.json
(top-level keys ``region_aware`` and ``global_only``) and REPORT.md (a table) beside it.

    evaluate-model --corpus data/corpus --run runs/tiny --baseline runs/tiny_global --out runs/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# OpenMP threads that spin while waiting lose whole time slices when other processes share
# the cores (steps 2-10x slower and erratic on a busy 2-core machine); must be set before
# torch loads the OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate-model", description=__doc__.split("\n\n")[1])
    p.add_argument("--corpus", type=Path, required=True, help="corpus folder")
    p.add_argument("--run", type=Path, required=True, help="run folder (train-model --out)")
    p.add_argument("--baseline", type=Path, help="second run (e.g. the --global-only ablation)")
    p.add_argument("--out", type=Path, required=True, help="report JSON path")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for flag in ("run", "baseline"):
        path = getattr(args, flag)
        if path is not None and not (path / "ckpt" / "last.pt").exists():
            print(f"evaluate-model: error: --{flag} {path}: no ckpt/last.pt", file=sys.stderr)
            return 2
    if not (args.corpus / "images").is_dir():
        print(f"evaluate-model: error: --corpus {args.corpus}: no images/ folder", file=sys.stderr)
        return 2
    if args.split not in ("train", "val", "test"):
        print(f"evaluate-model: error: --split {args.split}: train, val or test", file=sys.stderr)
        return 2
    from model.data import Corpus
    from model.evaluate import evaluate_run, markdown

    corpus = Corpus.open(args.corpus)
    report: dict = {"split": args.split, "corpus": str(args.corpus)}
    for run in [args.run, args.baseline]:
        if run is None:
            continue
        kind, res = evaluate_run(run, corpus, args.device, args.split)
        if kind in report:
            kind = f"{kind}_2"
        report[kind] = res
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    md = markdown(report)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
