"""train-model --corpus DIR --out RUN --preset tiny|base [--global-only] [--steps N] [options]

Trains the region-aware CLIP (RegionMed-CLIP ROI branch + MedP-CLIP region prompts) on a corpus
written by build-corpus, in three progressive stages (global pairs; regions + hard negatives;
joint). --global-only trains the ablation without the ROI branch on the same step budget.
Launch with torchrun for DDP, or give --address for Ray Train (--address local: an embedded Ray
on this machine). Rerun with --resume to continue a killed run; an --out that holds a run is
refused unless --resume or --overwrite (delete it and start over) is given.

    train-model --corpus data/corpus --out runs/tiny --preset tiny --device cpu
    train-model --corpus data/corpus --out runs/tiny_global --preset tiny --global-only
    train-model --corpus data/corpus --out runs/ddp --address auto --ray-workers 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workflows.usage import (
    UsageError,
    check_device_here,
    check_torch_device,
    command_parser,
    corpus_has_manifest,
    corpus_location,
    run_command,
)

if TYPE_CHECKING:
    from model.ray_train import RayOptions
    from model.train import TrainOptions

# OpenMP threads that spin while waiting lose whole time slices when other processes share
# the cores (steps 2-10x slower and erratic on a busy 2-core machine); must be set before
# torch loads the OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _parser() -> argparse.ArgumentParser:
    p = command_parser("train-model", __doc__.split("\n\n")[1],
                       'train-model --corpus data/corpus --out runs/tiny --preset tiny --device cpu')
    p.add_argument("--corpus", type=corpus_location, required=True,
                   help="corpus folder or s3:// / gs:// prefix (build-corpus --out)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--preset", default="tiny",
                   help="tiny | base (model/presets/NAME.json) or a preset JSON file path")
    p.add_argument("--global-only", action="store_true", help="ablation: no ROI branch")
    p.add_argument("--steps", type=int, help="optimizer steps (stages rescaled); preset default")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (bf16 autocast on "
                   "CUDA); must exist here, or with --address in the cluster")
    p.add_argument("--batch", type=int, help="images per micro-batch per rank")
    p.add_argument("--accum", type=int, help="gradient accumulation micro-batches")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN (from RUN/ckpt/last.pt when it has one)")
    p.add_argument("--json", action="store_true",
                   help="print the final summary (RUN/summary.json) as JSON on stdout")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run in RUN (checkpoint, log, tokenizer) and start over; "
                   "without --resume or --overwrite a RUN that holds a run is refused")
    p.add_argument("--text-weights", type=Path, help="local pretrained BERT folder (+ tokenizer)")
    p.add_argument("--image-weights", type=Path, help="local ViT state dict: open_clip, timm or "
                   "this project's keys (.pt, .bin, .safetensors); see docs/model.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, help="steps between log rows")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--ckpt-minutes", type=float,
                   help="also checkpoint at the first log row after this many minutes")
    p.add_argument("--keep-checkpoints", type=int,
                   help="checkpoints kept (RUN/ckpt/last.pt and the N - 1 before it; preset: 1)")
    p.add_argument("--val-every", type=int,
                   help="steps between validation passes on the val split (0: none; preset: 0)")
    p.add_argument("--val-batches", type=int, help="batches per validation pass and rank")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds any collective may wait (torch.distributed timeout)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # simulate a kill (tests)
    p.add_argument("--address", help="run on Ray Train: a cluster address (auto, ray://head:10001) "
                   "or local (a fresh embedded Ray on this machine)")
    p.add_argument("--ray-workers", type=int, default=1,
                   help="with --address: training processes (ranks; one GPU each on cuda)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="with --address: CPUs reserved per rank (also its torch threads)")
    p.add_argument("--max-failures", type=int, default=1,
                   help="with --address: restarts of the worker group after a failure")
    return p


@dataclass(frozen=True)
class TrainCommand:
    """A validated train-model run: what to train and where."""

    options: TrainOptions  # corpus, run folder, preset and its overrides
    ray: RayOptions | None = None  # Ray Train launch (--address); None: here or under torchrun
    json: bool = False  # also print the summary document (RUN/summary.json) on stdout


def _check_weights(args: argparse.Namespace) -> None:
    """--text-weights: a pretrained model folder with a readable config.json; --image-weights:
    a readable state-dict file."""
    from pipeline.config import readable_file

    text, image = args.text_weights, args.image_weights
    if text is not None and not (text.is_dir() and readable_file(text / "config.json")):
        what = "not found" if not text.exists() else "not a readable model folder (config.json)"
        raise ValueError(f"--text-weights {text}: {what}")
    if image is not None and not readable_file(image):
        what = "not found" if not image.exists() else "not a readable state-dict file"
        raise ValueError(f"--image-weights {image}: {what}")


def _check_paths_and_device(args: argparse.Namespace) -> None:
    """The checks that need no model code (so a mistyped flag is reported at once)."""
    if not corpus_has_manifest(args.corpus):
        raise ValueError(f"--corpus {args.corpus}: no manifest.json (not a build-corpus output)")
    _check_weights(args)
    check_torch_device(args.device)
    if args.address in (None, "local"):  # a cluster's GPUs are checked once it is joined
        check_device_here(args.device)
    if args.address:
        if "WORLD_SIZE" in os.environ:
            raise ValueError(f"--address {args.address}: launched by torchrun already; use one")
        if args.ray_workers < 1 or args.cpus_per_worker <= 0 or args.max_failures < 0:
            raise ValueError(f"--ray-workers {args.ray_workers} / --cpus-per-worker "
                             f"{args.cpus_per_worker} / --max-failures {args.max_failures}: "
                             "need >= 1 / > 0 / >= 0")


def config_from_args(args: argparse.Namespace) -> TrainCommand:
    """Typed, validated options from the parsed flags (the only place that sees the
    namespace): paths and device first, then the preset and numeric flags (``run_config``)."""
    _check_paths_and_device(args)
    from model.checkpoint import check_run_folder
    from model.train import TrainOptions, run_config

    check_run_folder(args.out, args.resume, args.overwrite)  # deletes nothing
    opts = TrainOptions(
        corpus=args.corpus, out=args.out, preset=args.preset, global_only=args.global_only,
        steps=args.steps, device=args.device, batch=args.batch, accum=args.accum,
        resume=args.resume, overwrite=args.overwrite, text_weights=args.text_weights, image_weights=args.image_weights,
        seed=args.seed, workers=args.workers, log_every=args.log_every,
        ckpt_every=args.ckpt_every, stop_after=args.stop_after, ckpt_minutes=args.ckpt_minutes,
        keep_checkpoints=args.keep_checkpoints, val_every=args.val_every,
        val_batches=args.val_batches, dist_timeout_s=args.dist_timeout)
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout {args.dist_timeout}: must be positive")
    cfg = run_config(opts)  # raises ValueError naming --preset, --steps, --batch, ...
    from model.pretrained import check_weights

    check_weights(cfg.image)  # --image-weights: unreadable, no ViT keys, another architecture
    from model.data import corpus_split_images
    from model.train import NO_TRAIN_IMAGES

    if corpus_split_images(args.corpus, "train") == 0:  # a split column read, no index built
        raise ValueError(NO_TRAIN_IMAGES.format(corpus=args.corpus))
    if not args.address:
        return TrainCommand(opts, json=args.json)
    from model.ray_train import RayOptions

    return TrainCommand(opts, RayOptions(address=args.address, workers=args.ray_workers,
                                         cpus_per_worker=args.cpus_per_worker,
                                         max_failures=args.max_failures), json=args.json)


def train_and_report(cmd: TrainCommand) -> int:
    """Train here (or under torchrun) or on Ray Train; with --json print the summary. An
    --overwrite deletes the earlier run only now, after the whole request was validated."""
    if cmd.ray is not None:
        from model.ray_train import ClusterRequestError, train_on_ray

        try:
            summary = train_on_ray(cmd.options, cmd.ray)
        except ClusterRequestError as e:
            raise UsageError(str(e)) from None
    else:
        from model.train import train

        summary = train(cmd.options)
    if cmd.json:  # RUN/summary.json either way (stderr has the short one); stdout on request
        from model.trainlog import SUMMARY_FILE

        written = Path(cmd.options.out) / SUMMARY_FILE
        print(written.read_text() if written.is_file() else json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), config_from_args, train_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
