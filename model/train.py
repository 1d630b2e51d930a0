"""Training loop (reads top to bottom): config → data → model → optimizer → schedule → stages →
loop with accumulation, autocast, DDP, logging and atomic checkpoints.

Progressive stages (RegionMed-CLIP): stage 1 trains global image ↔ report/summary pairs only;
stage 2 adds region ↔ caption + hard negatives through the ROI branch, with the global loss kept
(``model.loss.stage_losses``: the towers are shared, and without it stage 2 undid stage 1);
stage 3 trains all losses jointly. Stage lengths come from the preset (``train.stage_steps``), rescaled when
``--steps`` is given. ``--global-only`` trains the ablation (no ROI branch) with the same step
budget and only ``global_loss``.

DDP: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is
initialised from the environment (NCCL on CUDA, gloo on CPU) with an explicit timeout
(``TrainOptions.dist_timeout_s``), each rank reads its own readers' shards, and the losses gather
features across ranks (see :mod:`model.loss`). The parameters a stage does not use
(:func:`stage_unused`) are frozen for that stage and DDP is rebuilt at each stage change, so DDP
runs without ``find_unused_parameters``. Loss terms and the gradient norm stay on the device and
are synchronised (all-reduced, copied to the host) only when a log row is written.

Tokenizer (:func:`run_tokenizer`): the run's own (resume), the pretrained text folder's, else
the corpus's stored one (``python -m workflows.build_tokenizer``, see :mod:`model.tokenizer`);
without a stored one every rank builds the same vocabulary from the caption columns itself. No
rank waits in a collective while another does file work.

Checkpoints (:class:`model.checkpoint.CheckpointWriter`) are written by a background thread
every ``ckpt_every`` steps and, with ``ckpt_minutes``, at the first log row after that many
minutes; ``keep_checkpoints`` are kept. Validation (:mod:`model.validate`) runs every
``val_every`` steps and is logged with ``"split": "val"``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from model.accum import accumulate, merge_features  # noqa: F401  (merge_features: public here)
from model.checkpoint import (
    CheckpointWriter,
    check_run_folder,
    ckpt_path,
    clear_run,
    data_states,
    load_checkpoint,
    pack_data_state,
    rng_state,
    set_rng_state,
)
from model.clip import build_model
from model.collate import Collate, to_device
from model.config import RunConfig, load_preset, scale_stages
from model.data import CorpusIndex, RegionCorpus, states_from_batch
from model.loss import RegionClipLoss
from model.tokenizer import run_tokenizer
from model.trainlog import TrainLog
from model.validate import Validator

NO_DECAY_KEYS = ("embed", "cls_token", "not_a_point", "no_mask", "logit_", "embeddings")


@dataclass
class TrainOptions:
    corpus: Path
    out: Path
    preset: str = "tiny"
    global_only: bool = False
    steps: int | None = None
    device: str = "cpu"
    batch: int | None = None
    accum: int | None = None
    resume: bool = False  # continue the run in ``out`` (from its checkpoint, if it has one)
    overwrite: bool = False  # delete the run in ``out`` and start over (else: refused)
    text_weights: Path | None = None
    image_weights: Path | None = None
    seed: int = 0
    workers: int | None = None
    log_every: int | None = None
    ckpt_every: int | None = None
    ckpt_minutes: float | None = None  # also checkpoint at the first log row after this long
    keep_checkpoints: int | None = None  # checkpoints kept (last.pt and the N - 1 before it)
    val_every: int | None = None  # steps between validation passes (0: none)
    val_batches: int | None = None  # micro-batches per validation pass and rank
    dist_timeout_s: float = 1800.0  # init_process_group timeout (every collective's limit)
    stop_after: int | None = None  # stop (as if killed) after this step; tests and preemption


def run_config(opts: TrainOptions) -> RunConfig:
    """Preset + command-line overrides."""
    cfg = load_preset(opts.preset)
    cfg.model.global_only = opts.global_only
    if opts.steps is not None:
        base = cfg.train.total_steps
        cfg.train.stage_steps = scale_stages(cfg.train.stage_steps, opts.steps)
        cfg.train.warmup_steps = max(1, round(cfg.train.warmup_steps * opts.steps / base))
    for name, val, target in [("batch", opts.batch, cfg.data), ("workers", opts.workers, cfg.data),
                              ("accum", opts.accum, cfg.train),
                              ("log_every", opts.log_every, cfg.train),
                              ("ckpt_every", opts.ckpt_every, cfg.train),
                              ("keep_checkpoints", opts.keep_checkpoints, cfg.train),
                              ("val_every", opts.val_every, cfg.train),
                              ("val_batches", opts.val_batches, cfg.train),
                              ("ckpt_minutes", opts.ckpt_minutes, cfg.train)]:
        if val is not None:
            if val < (0 if name in ("workers", "val_every", "ckpt_minutes") else 1):
                raise ValueError(f"--{name.replace('_', '-')} {val}: out of range")
            setattr(target, name, val)
    cfg.train.seed = opts.seed
    cfg.text.weights = str(opts.text_weights) if opts.text_weights else None
    cfg.image.weights = str(opts.image_weights) if opts.image_weights else None
    return cfg


def setup_distributed(device: str, timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device.startswith("cuda") and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device)


def stage_of(step: int, cfg: RunConfig) -> int:
    """1, 2 or 3 for optimizer step ``step`` (0-based); always 1 for the global-only ablation."""
    if cfg.model.global_only:
        return 1
    edge = 0
    for i, n in enumerate(cfg.train.stage_steps):
        edge += n
        if step < edge:
            return i + 1
    return len(cfg.train.stage_steps)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Named schedule ``cosine``: linear warm-up, then cosine to ``min_lr_ratio``·lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.total_steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings and the temperature/bias scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def stage_unused(stage: int) -> tuple[str, ...]:
    """Parameter-name prefixes a stage's losses never reach (frozen for that stage, so DDP needs
    no ``find_unused_parameters``): stage 1 (global) leaves the ROI branch, the region
    projections and the region temperature; stages 2 and 3 use every parameter (the global
    loss stays on: :func:`model.loss.stage_losses`)."""
    if stage == 1:
        return ("roi.", "region_proj.", "region_text_proj.", "region_logit_scale")
    return ()


def set_stage(core: torch.nn.Module, stage: int) -> None:
    """requires_grad of every parameter for ``stage`` (see :func:`stage_unused`)."""
    unused = stage_unused(stage)
    for name, p in core.named_parameters():
        p.requires_grad_(not name.startswith(unused))


def wrap_ddp(core: torch.nn.Module, stage: int, device: torch.device, world: int):
    """``core`` with the parameters of ``stage`` trainable, in DDP when ``world`` > 1."""
    set_stage(core, stage)
    if world == 1:
        return core
    gc.collect()  # the previous wrapper's reducer (and its gradient hooks) is gone first
    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=False)


def make_loader(corpus: CorpusIndex, cfg: RunConfig, tok, rank: int, world: int, start, rotate: int,
                pin: bool = False):
    """The training DataLoader; ``pin`` (CUDA) pins batches so host → device copies overlap."""
    ds = RegionCorpus(corpus, "train", cfg.data, cfg.image.image_size,
                      points=cfg.prompt.points_per_region, seed=cfg.train.seed, train=True,
                      rank=rank, world=world, start=start, rotate=rotate)
    collate = Collate(tok, cfg.text.max_len, cfg.data.negatives_per_region,
                      cfg.prompt.points_per_region)
    w = cfg.data.workers
    return DataLoader(ds, batch_size=cfg.data.batch, collate_fn=collate, num_workers=w,
                      persistent_workers=w > 0, prefetch_factor=4 if w else None,
                      pin_memory=pin, worker_init_fn=worker_init if w else None,
                      generator=torch.Generator().manual_seed(cfg.train.seed))


def worker_init(_worker: int) -> None:
    """One OpenCV and one torch thread per DataLoader worker (the workers are the parallelism;
    their own thread pools would oversubscribe the cores)."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _claim_run(opts: TrainOptions, rank: int) -> None:
    """Refuse an earlier run in ``opts.out`` unless it is resumed or overwritten: every rank
    checks before any rank writes (the barrier), then rank 0 deletes it for ``overwrite``."""
    check_run_folder(opts.out, opts.resume, opts.overwrite)
    if dist.is_initialized():
        dist.barrier()
    if opts.overwrite and rank == 0:
        clear_run(opts.out)


def _run_setup(opts: TrainOptions, rank: int) -> tuple[RunConfig, dict | None, bool]:
    """(config, checkpoint or None, resuming?) of the run; seeds set, config.json written."""
    resume = opts.resume and ckpt_path(opts.out).exists()
    ckpt = load_checkpoint(opts.out) if resume else None
    cfg = RunConfig.from_dict(ckpt["config"]) if ckpt else run_config(opts)
    if ckpt and opts.steps is not None and opts.steps != cfg.train.total_steps:
        cfg.train.stage_steps = scale_stages(cfg.train.stage_steps, opts.steps)
    seed = cfg.train.seed + rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (opts.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return cfg, ckpt, resume


def _model_and_optimizer(cfg: RunConfig, vocab: int, device: torch.device,
                         ckpt: dict | None) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """(model, AdamW, first step), restored from ``ckpt`` (with the RNG state) when given."""
    model = build_model(cfg, vocab).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=cfg.train.betas, fused=device.type == "cuda")
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
    return model, opt, step


NO_TRAIN_IMAGES = ("--corpus {corpus}: no images in the train split (build-corpus assigns whole "
                   "patients to train/val/test; a corpus of very few patients may have none)")


def train(opts: TrainOptions) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank, world, device = setup_distributed(opts.device, opts.dist_timeout_s)
    _claim_run(opts, rank)
    cfg, ckpt, resume = _run_setup(opts, rank)
    corpus = CorpusIndex.open(opts.corpus)
    if corpus.split_images("train") == 0:  # the loader would wait forever for a first batch
        raise ValueError(NO_TRAIN_IMAGES.format(corpus=opts.corpus))
    tok = run_tokenizer(corpus, cfg, opts.out, rank, opts.resume)
    states, rotate = data_states(ckpt, rank) if ckpt else ({}, 0)
    core, opt, step = _model_and_optimizer(cfg, len(tok), device, ckpt)
    loss_fn = RegionClipLoss(cfg.loss)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    batches = iter(make_loader(corpus, cfg, tok, rank, world, states, rotate,
                               pin=device.type == "cuda"))
    log = TrainLog(opts.out, rank, resume_step=step if resume else None)
    writer = CheckpointWriter(opts.out, cfg.train.keep_checkpoints)
    val = Validator(corpus, cfg, tok, rank, world, device, amp) if cfg.train.val_every else None
    total, t = cfg.train.total_steps, cfg.train
    consumed, stage, model, win = 0, 0, core, _Window()
    last_save = time.monotonic()
    while step < total and (opts.stop_after is None or step < opts.stop_after):
        if stage_of(step, cfg) != stage:
            stage = stage_of(step, cfg)
            model = None  # the previous stage's DDP wrapper goes before the next is built
            model = wrap_ddp(core, stage, device, world)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        terms, gnorm, n, wait = train_step(model, core, opt, loss_fn, batches, states, cfg, stage,
                                           device, amp, world)
        win.add(terms, gnorm, n, wait)
        consumed += t.accum
        step += 1
        log.tick(step, total)  # the steps bar (rank 0)
        due = False
        if step % t.log_every == 0 or step == total:
            overdue = t.ckpt_minutes > 0 and time.monotonic() - last_save >= t.ckpt_minutes * 60
            due = win.flush(log, step, stage, lr_at(step - 1, cfg), core, world, overdue)
        if val is not None and step % t.val_every == 0:
            val.run(core, step, stage, log)
        if step % t.ckpt_every == 0 or step == total or due:
            rot = (rotate + consumed) % max(cfg.data.workers, 1)
            _checkpoint(writer, core, opt, cfg, step, stage, states, rot, len(tok), rank, world)
            last_save = time.monotonic()
    writer.close()
    log.close()
    if world > 1:
        dist.barrier()
    return {"steps": step, "stages": list(cfg.train.stage_steps), "run": str(opts.out),
            "checkpoint": str(ckpt_path(opts.out))}


class _Window:
    """Loss terms (device tensors), images and seconds since the last log row: nothing is
    copied to the host until :meth:`flush`."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.gnorm: torch.Tensor | None = None
        self.seen = self.steps = 0
        self.data_s = 0.0  # seconds waiting for the loader
        self.t0 = time.perf_counter()

    def add(self, terms: dict, gnorm: torch.Tensor, n: int, data_s: float):
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.gnorm, self.seen, self.steps = gnorm, self.seen + n, self.steps + 1
        self.data_s += data_s

    def flush(self, log: TrainLog, step: int, stage: int, lr: float, core, world: int,
              overdue: bool) -> bool:
        """Write the log row (one all-reduce and one host copy); return whether any rank asks
        for a time-based checkpoint (``overdue``)."""
        names = sorted(self.sums)
        dev = self.gnorm.device
        vec = torch.stack([self.sums[k].float() for k in names]
                          + [self.gnorm.float(), torch.tensor(float(overdue), device=dev)])
        if world > 1:
            dist.all_reduce(vec)
        vals = vec.tolist()
        sums = {k: vals[i] / world for i, k in enumerate(names)}
        sc = {k: float(v.detach()) for k, v in core.scales().items()}
        elapsed = time.perf_counter() - self.t0  # after the sync: the device's work included
        log.write(step, stage, sums, self.counts, lr=lr, grad_norm=vals[-2] / world,
                  samples_per_s=self.seen * world / elapsed, data_s=self.data_s / self.steps,
                  step_s=max(elapsed - self.data_s, 0.0) / self.steps, **sc)
        self.__init__()
        return vals[-1] > 0


def train_step(model, core, opt, loss_fn, batches, states, cfg: RunConfig, stage: int,
               device: torch.device, amp, world: int):
    """One optimizer step over ``accum`` micro-batches → (mean loss terms as device tensors,
    grad norm (device tensor), images, seconds spent waiting for the loader). Nothing here
    waits for the device (no host copy)."""
    micro, data_s = [], 0.0
    for _ in range(cfg.train.accum):
        t = time.perf_counter()
        batch = next(batches)
        data_s += time.perf_counter() - t
        states_from_batch(states, batch["pos"])
        micro.append(to_device(batch, device))
    out = accumulate(model, loss_fn, micro, stage, amp, world)
    gnorm = torch.nn.utils.clip_grad_norm_(
        [p for p in core.parameters() if p.grad is not None], cfg.train.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out, gnorm, sum(len(b["images"]) for b in micro), data_s


def _checkpoint(writer: CheckpointWriter, model, opt, cfg: RunConfig, step: int, stage: int,
                states, rotate: int, vocab: int, rank: int, world: int) -> None:
    """Gather every rank's data position; rank 0 hands the state to the background writer."""
    mine = pack_data_state(states, rotate)
    data = {0: mine}
    if world > 1:
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        data = dict(enumerate(every))
    if rank == 0:
        writer.submit({"model": model.state_dict(), "optimizer": opt.state_dict(),
                       "config": cfg.to_dict(), "step": step, "stage": stage,
                       "data": data, "rng": rng_state(), "vocab_size": vocab})
