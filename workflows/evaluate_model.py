"""evaluate-model --corpus DIR --run RUN [--baseline RUN2] --out REPORT.json

Zero-shot classification (region label, region laterality, image labels) and retrieval
(image↔report, region↔caption) of trained runs on the corpus's TEST split. Writes REPORT.json
(top-level keys ``region_aware`` and ``global_only``), REPORT.md (tables) and REPORT.html (tables
and plots in REPORT_files/: per-class accuracy with support, confusion matrices, ROC per class,
retrieval R@K curves, the runs side by side) beside it. A split without regions (a corpus
without test patients) is a usage error: nothing is written.

    evaluate-model --corpus data/corpus --run runs/tiny --baseline runs/tiny_global --out runs/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from workflows.usage import (
    UsageError,
    check_device_here,
    command_parser,
    corpus_has_manifest,
    corpus_location,
    run_command,
)

SPLITS = ("train", "val", "test")

# OpenMP threads that spin while waiting lose whole time slices when other processes share
# the cores (steps 2-10x slower and erratic on a busy 2-core machine); must be set before
# torch loads the OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _parser() -> argparse.ArgumentParser:
    p = command_parser("evaluate-model", __doc__.split("\n\n")[1],
                       'evaluate-model --corpus data/corpus --run runs/tiny --baseline runs/tiny_global --out runs/eval.json')
    p.add_argument("--corpus", type=corpus_location, required=True,
                   help="corpus folder or s3:// / gs:// prefix")
    p.add_argument("--run", type=Path, required=True, help="run folder (train-model --out)")
    p.add_argument("--baseline", type=Path, help="second run (e.g. the --global-only ablation)")
    p.add_argument("--out", type=Path, required=True, help="report JSON path")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (must exist here)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    return p


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation (validated by :meth:`validate`)."""

    corpus: Path  # corpus folder (build-corpus --out)
    run: Path  # run folder (train-model --out)
    out: Path  # report JSON path; REPORT.md, REPORT.html and REPORT_files/ go beside it
    baseline: Path | None = None  # a second run folder (e.g. the --global-only ablation)
    device: str = "cpu"  # torch device: cpu, cuda, cuda:N, mps
    split: str = "test"  # split to evaluate: train, val or test

    def validate(self) -> None:
        """Raise ValueError naming the first bad flag and its value."""
        for flag, run in (("--run", self.run), ("--baseline", self.baseline)):
            if run is not None and not (run / "ckpt" / "last.pt").is_file():
                raise ValueError(f"{flag} {run}: no ckpt/last.pt (not a train-model run)")
        if not corpus_has_manifest(self.corpus):
            raise ValueError(f"--corpus {self.corpus}: no manifest.json (not a build-corpus "
                             "output)")
        if self.out.is_dir():
            raise ValueError(f"--out {self.out}: is a folder; give the report's .json path")
        if self.split not in SPLITS:
            raise ValueError(f"--split {self.split}: expected {', '.join(SPLITS)}")
        check_device_here(self.device)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Map parsed flags to the typed config (the only place that sees the namespace)."""
    return EvalConfig(corpus=args.corpus, run=args.run, out=args.out, baseline=args.baseline,
                      device=args.device, split=args.split)


def evaluate(cfg: EvalConfig) -> int:
    """Evaluate each run, write REPORT.json, REPORT.md and REPORT.html, print the table."""
    from model.data import CorpusIndex
    from model.evaluate import NothingToEvaluate, evaluate_run
    from model.report import markdown, write_html

    try:
        corpus = CorpusIndex.open(cfg.corpus)
    except ValueError:
        raise UsageError(f"--corpus {cfg.corpus}: no readable images/regions tables") from None
    report: dict = {"split": cfg.split, "corpus": str(cfg.corpus)}
    for run in (cfg.run, cfg.baseline):
        if run is None:
            continue
        try:
            kind, res = evaluate_run(run, corpus, cfg.device, cfg.split)
        except NothingToEvaluate:
            raise UsageError(f"--split {cfg.split}: --corpus {cfg.corpus} has no regions in "
                             f"the {cfg.split} split (no patients drawn into it); nothing to "
                             "evaluate: pick another --split, or rebuild with build-corpus "
                             "--split ratios that give it patients") from None
        if kind in report:
            kind = f"{kind}_2"
        report[kind] = res
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=1))
    md = markdown(report)
    cfg.out.with_suffix(".md").write_text(md)
    html = write_html(report, cfg.out.with_suffix(".html"))
    print(md)
    print(f"report: {html}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), config_from_args, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
