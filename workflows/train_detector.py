"""train-detector [--source] SOURCE... --out RUN [options]  |  train-detector --corpus DIR --out RUN

Trains a YOLO lesion detector on the label-map regions of a corpus and evaluates it on the
held-out test patients. Steps: (1) build-corpus SOURCE... into RUN/corpus (labelled slices
only; skipped with --corpus), (2) read the images and regions tables, keep regions of --classes,
(3) export a YOLO dataset to RUN/dataset, (4) train (ultralytics, offline, from a model yaml or
a local .pt; an epochs bar on stderr; ultralytics' plots in RUN/train/: PR curve, confusion
matrix, loss curves), (5) test split: mAP50 and box recall at IoU 0.5 (overall, per class,
lesions >= 10 mm vs < 10 mm), (6) write RUN/weights/detector.pt and RUN/metrics.json.

    train-detector data/phantoms --out runs/det --epochs 30 --imgsz 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.roi.detect import (
    add_thread_callbacks,
    evaluate_test,
    resolve_device,
    ultralytics_offline,
)
from pipeline.roi.detector_data import export_dataset
from pipeline.run.progress import Bar
from pipeline.write import read_table
from workflows.usage import UsageError, command_parser, run_command

LESION = re.compile(r"nodule|mass|lesion|tumou?r", re.IGNORECASE)
SIZE_SPLIT_MM = 10.0


@dataclass(frozen=True)
class TrainConfig:
    """A whole train-detector run (validated by :meth:`validate`)."""

    out: Path  # run folder: corpus/, dataset/, train/, weights/detector.pt, metrics.json
    sources: tuple[Path, ...] = ()  # build a corpus of these (step 1) ...
    corpus: Path | None = None  # ... or use this existing corpus directory
    classes: tuple[str, ...] | None = None  # region labels to detect; None = lesion-like labels
    epochs: int = 30  # training epochs
    imgsz: int = 256  # square training / inference size, a multiple of 32
    batch: int = 16  # images per training step
    model: str = "yolov8n.yaml"  # architecture yaml (random init) or a local .pt checkpoint
    device: str = "auto"  # "auto" (first GPU if any, else cpu), "cpu", "cuda:0", ...
    seed: int = 0  # training seed (deterministic=True) and dataset subsampling seed
    patience: int = 100  # early stop after this many epochs without val improvement
    conf: float = 0.25  # detector confidence threshold for the box-recall evaluation
    background_ratio: float = 1.0  # background train/val images per positive image
    time_limit_min: float | None = None  # train for this long instead (epochs recomputed)

    def validate(self) -> None:
        if bool(self.sources) == (self.corpus is not None):
            raise ValueError("SOURCE/--corpus: give source folders or --corpus DIR, not both")
        for s in self.sources:
            if not Path(s).exists():
                raise ValueError(f"SOURCE {s}: no such file or directory")
        if self.corpus is not None and not (Path(self.corpus) / "images").is_dir():
            raise ValueError(f"--corpus {self.corpus}: no images/ table there")
        if self.corpus is not None and not (Path(self.corpus) / "manifest.json").is_file():
            raise ValueError(f"--corpus {self.corpus}: no manifest.json (not a build-corpus "
                             "output, or nothing committed yet)")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: exists and is not a folder")
        if self.classes is not None and not all(self.classes):
            raise ValueError(f"--classes {','.join(self.classes)}: empty class name")
        if self.epochs < 1:
            raise ValueError(f"--epochs {self.epochs}: must be >= 1")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError(f"--imgsz {self.imgsz}: must be a multiple of 32, >= 32")
        if self.batch < 1:
            raise ValueError(f"--batch {self.batch}: must be >= 1")
        if not (self.model.endswith((".yaml", ".yml")) or Path(self.model).is_file()):
            raise ValueError(f"--model {self.model}: expected a model .yaml or an existing .pt")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|\d+", self.device):
            raise ValueError(f"--device {self.device}: expected auto, cpu, cuda or cuda:N")
        if self.device not in ("auto", "cpu"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: CUDA is not available here")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed}: must be >= 0")
        if self.patience < 0:
            raise ValueError(f"--patience {self.patience}: must be >= 0")
        if not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"--conf {self.conf}: must be in [0, 1]")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            raise ValueError(f"--time-limit {self.time_limit_min}: must be > 0 minutes")
        if self.background_ratio < 0:
            raise ValueError(f"--background-ratio {self.background_ratio}: must be >= 0")


def _parser() -> argparse.ArgumentParser:
    p = command_parser("train-detector", __doc__.split("\n\n")[1],
                       'train-detector data/phantoms --out runs/det --epochs 30 --imgsz 256')
    p.add_argument("sources", nargs="*", type=Path, metavar="SOURCE", help="source folders")
    p.add_argument("--source", dest="more_sources", nargs="+", type=Path, action="extend",
                   default=[], metavar="SOURCE", help="source folders (same as positional)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--corpus", type=Path, help="use this existing corpus (skips build-corpus)")
    p.add_argument("--classes", help="comma list of region labels (default: labels containing "
                   "nodule, mass, lesion or tumo(u)r)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--imgsz", type=int, default=256, help="train/inference size (multiple of 32)")
    p.add_argument("--batch", type=int, default=16, help="batch size")
    p.add_argument("--model", default="yolov8n.yaml", help="model yaml or local .pt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--patience", type=int, default=100, help="early-stopping patience (epochs)")
    p.add_argument("--conf", type=float, default=0.25, help="confidence for box recall")
    p.add_argument("--background-ratio", type=float, default=1.0,
                   help="background train/val images kept per positive image")
    p.add_argument("--time-limit", type=float, help="training budget in minutes; overrides "
                   "--epochs (ultralytics refits the epoch count and LR schedule to it)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
    return TrainConfig(out=args.out, sources=(*args.sources, *args.more_sources), corpus=args.corpus,
                       classes=classes, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                       model=args.model, device=args.device, seed=args.seed,
                       patience=args.patience, conf=args.conf,
                       background_ratio=args.background_ratio,
                       time_limit_min=args.time_limit)


def select_regions(corpus: Path, wanted: tuple[str, ...] | None
                   ) -> tuple[list[dict], list[dict], list[str]]:
    """(images, regions of the classes, classes) of ``corpus`` (step 2). Raises
    :class:`UsageError` when no region has one of the classes (the corpus's own label names
    stay out of the message: they are file contents)."""
    images = read_table(corpus, "images", ["image_id", "patient_key", "split", "height", "width",
                                          "pixel_spacing_mm", "image"])
    regions = read_table(corpus, "regions")
    if regions and "source" in regions[0] and any(r["source"] == "labels" for r in regions):
        regions = [r for r in regions if r["source"] == "labels"]  # label-map truth only
    labels = sorted({r["label"] for r in regions})
    classes = list(wanted or [n for n in labels if LESION.search(n)])
    if not classes:
        raise UsageError(f"--classes: none given and no lesion-like region label in the corpus "
                         f"({len(labels)} labels; browse-catalog lists them)")
    if not set(classes) & set(labels):
        raise UsageError(f"--classes {','.join(classes)}: no region of these labels in the "
                         f"corpus ({len(labels)} labels; browse-catalog lists them)")
    return images, [r for r in regions if r["label"] in classes], classes


def run(cfg: TrainConfig) -> dict:
    out = cfg.out.resolve()
    if cfg.corpus is not None:  # --classes is checked against it before anything is written
        images, regions, classes = select_regions(cfg.corpus, cfg.classes)
    out.mkdir(parents=True, exist_ok=True)
    ultralytics = ultralytics_offline()  # first: it sets OpenMP's wait policy before torch loads
    corpus = cfg.corpus
    if corpus is None:  # step 1
        from workflows.build_corpus import main as build_corpus

        corpus = out / "corpus"
        rc = build_corpus([*map(str, cfg.sources), "--out", str(corpus), "--every-k", "0"])
        if rc != 0:
            raise RuntimeError(f"build-corpus failed (exit {rc})")
        images, regions, classes = select_regions(corpus, cfg.classes)
    data_yaml = export_dataset(images, regions, out / "dataset", classes,  # step 3
                               background_ratio=cfg.background_ratio, seed=cfg.seed)
    device = resolve_device(cfg.device)  # step 4
    model = ultralytics.YOLO(cfg.model, task="detect")
    add_thread_callbacks(model)
    epochs = EpochBar()
    model.add_callback("on_train_start", epochs.start)
    model.add_callback("on_train_epoch_end", _mark_epoch)
    model.add_callback("on_fit_epoch_end", epochs.update)
    model.add_callback("on_train_end", epochs.close)
    t0 = time.perf_counter()
    model.train(data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch,
                device=device, workers=2, plots=True, amp=device != "cpu", seed=cfg.seed,
                deterministic=True, patience=cfg.patience, project=str(out), name="train",
                exist_ok=True, verbose=False, val=True,
                time=cfg.time_limit_min / 60 if cfg.time_limit_min else None)
    train_s = time.perf_counter() - t0
    trainer = model.trainer
    best = Path(trainer.best if Path(trainer.best).is_file() else trainer.last)
    weights = out / "weights" / "detector.pt"  # step 6 (written before evaluating it)
    weights.parent.mkdir(exist_ok=True)
    shutil.copyfile(best, weights)
    t1 = time.perf_counter()
    test = evaluate_test(weights, data_yaml, images, regions, imgsz=cfg.imgsz,  # step 5
                         batch=cfg.batch, device=device, conf=cfg.conf, out=out / "test",
                         size_split_mm=SIZE_SPLIT_MM)
    export = json.loads((out / "dataset" / "export.json").read_text())
    metrics = {
        **test, "classes": classes, "counts": export["splits"],
        "train_boxes_per_class": export["train_boxes_per_class"], "epochs": int(trainer.epochs),
        "epochs_run": int(trainer.epoch) + 1, "imgsz": cfg.imgsz, "batch": cfg.batch,
        "model": cfg.model, "seed": cfg.seed, "train_time_s": round(train_s, 1),
        "eval_time_s": round(time.perf_counter() - t1, 1), "corpus": str(corpus),
        "weights": str(weights), "plots": _plots(out / "train"),
        "machine": _machine(device, ultralytics.__version__),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return metrics


def _mark_epoch(trainer) -> None:
    trainer._epoch_to_log = True


class EpochBar:
    """The epochs bar on stderr (:mod:`pipeline.run.progress`), with the validation mAP50
    after each epoch: ultralytics' ``on_train_start``, ``on_fit_epoch_end`` and
    ``on_train_end`` callbacks."""

    def __init__(self):
        self.bar: Bar | None = None

    def start(self, trainer) -> None:
        self.bar = Bar("detector", int(trainer.epochs), "epoch",
                       initial=int(getattr(trainer, "start_epoch", 0)))

    def update(self, trainer) -> None:
        if not getattr(trainer, "_epoch_to_log", False) or self.bar is None:
            return  # final_eval fires on_fit_epoch_end once more, with no training epoch
        trainer._epoch_to_log = False
        m = trainer.metrics or {}
        self.bar.update(int(trainer.epoch) + 1, total=int(trainer.epochs),
                        val_mAP50=float(m.get("metrics/mAP50(B)", float("nan"))))

    def close(self, trainer=None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ultralytics' plots of the final validation (val split), by what they show; file names
# changed between versions (PR_curve.png → BoxPR_curve.png)
PLOTS = {"pr_curve": ("BoxPR_curve.png", "PR_curve.png"),
         "confusion_matrix": ("confusion_matrix.png",),
         "confusion_matrix_normalized": ("confusion_matrix_normalized.png",),
         "results": ("results.png",)}


def _plots(folder: Path) -> dict[str, str]:
    """The plots ultralytics drew in ``folder`` (matplotlib, offline), by :data:`PLOTS` name."""
    found = {}
    for name, files in PLOTS.items():
        path = next((folder / f for f in files if (folder / f).is_file()), None)
        if path is not None:
            found[name] = str(path)
    return found


def _machine(device: str, ul_version: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "ultralytics": ul_version, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _num(v, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "n/a"


def headline(metrics: dict) -> str:
    """One line: epochs, test mAP50, box recall and the recall of lesions >= 10 mm."""
    rec = metrics.get("box_recall", {})
    big = rec.get("by_size", {}).get(f"ge_{SIZE_SPLIT_MM:g}mm", {})
    return (f"{metrics.get('epochs_run', '?')} epochs; test patients: mAP50 "
            f"{_num(metrics.get('map50'))}, box recall {_num(rec.get('recall'), '.2f')} "
            f"({rec.get('tp', 0)}/{rec.get('n_true', 0)}), lesions >= {SIZE_SPLIT_MM:g} mm "
            f"{_num(big.get('recall'), '.2f')} of {big.get('n_true', 0)}")


def train_and_report(cfg: TrainConfig) -> int:
    """Run all steps and print a short summary (test mAP50, box recall, time) and where the
    weights, RUN/metrics.json (every number) and the plots went."""
    metrics = run(cfg)
    print(f"train-detector: {headline(metrics)} ({metrics['train_time_s']:.0f} s of training)")
    print(f"  weights: {metrics['weights']}")
    print(f"  metrics: {cfg.out / 'metrics.json'}; plots: {cfg.out / 'train'} (PR curve, "
          "confusion matrix)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), config_from_args, train_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
