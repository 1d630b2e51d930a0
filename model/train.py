"""Training loop (reads top to bottom): config → data → model → optimizer → schedule → stages →
loop with accumulation, autocast, DDP, logging and atomic checkpoints.

Progressive stages (RegionMed-CLIP): stage 1 trains global image ↔ report/summary pairs only;
stage 2 trains region ↔ caption + hard negatives through the ROI branch; stage 3 trains all
losses jointly. Stage lengths come from the preset (``train.stage_steps``), rescaled when
``--steps`` is given. ``--global-only`` trains the ablation (no ROI branch) with the same step
budget and only ``global_loss``.

DDP: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is
initialised from the environment (NCCL on CUDA, gloo on CPU), each rank reads its own readers'
shards, and the losses gather features across ranks (see :mod:`model.loss`).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from model import captions as cap
from model.checkpoint import (
    check_run_folder,
    ckpt_path,
    clear_run,
    data_states,
    load_checkpoint,
    pack_data_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from model.clip import build_model
from model.collate import Collate, to_device
from model.config import RunConfig, load_preset, scale_stages
from model.data import CorpusIndex, RegionCorpus, states_from_batch
from model.loss import RegionClipLoss
from model.text_tower import load_tokenizer, train_tokenizer
from model.trainlog import TrainLog

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
                              ("ckpt_every", opts.ckpt_every, cfg.train)]:
        if val is not None:
            if val < (0 if name == "workers" else 1):
                raise ValueError(f"--{name.replace('_', '-')} {val}: out of range")
            setattr(target, name, val)
    cfg.train.seed = opts.seed
    cfg.text.weights = str(opts.text_weights) if opts.text_weights else None
    cfg.image.weights = str(opts.image_weights) if opts.image_weights else None
    return cfg


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
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


def build_tokenizer(corpus: CorpusIndex, cfg: RunConfig, run: Path, rank: int):
    """Run tokenizer: pretrained text folder's own, else WordPiece trained on train captions."""
    folder = run / "tokenizer"
    if rank == 0 and not (folder / "tokenizer.json").exists():
        if cfg.text.weights:
            load_tokenizer(Path(cfg.text.weights)).save_pretrained(str(folder))
        else:
            ds = RegionCorpus(corpus, "train", cfg.data, cfg.image.image_size, train=False)
            train_tokenizer(caption_texts(ds), folder, cfg.text.vocab_size)
    if dist.is_initialized():
        dist.barrier()
    return load_tokenizer(folder)


def caption_texts(ds: RegionCorpus):
    """Every caption of the split (undecoded rows), plus the label-vocabulary prompts."""
    c = ds.corpus
    for lab, sides in c.sides.items():
        yield from cap.label_prompts(lab, sides, c.prompt)
        yield from (c.prompt(lab, s) for s in ("left", "right"))
    for row in ds._epoch_rows(0, 1, 0):
        caps = [ds._caption(r) for r in row["regions"]]
        yield row.get("caption_summary") or cap.image_summary(
            [r["label"] for r in row["regions"]], row["modality"], row["plane"])
        yield row.get("caption_report") or cap.image_report(caps, row["modality"], row["plane"])
        yield from caps
        for r in row["regions"]:
            yield from (r.get("negatives") or [])


def make_loader(corpus: CorpusIndex, cfg: RunConfig, tok, rank: int, world: int, start, rotate: int):
    ds = RegionCorpus(corpus, "train", cfg.data, cfg.image.image_size,
                      points=cfg.prompt.points_per_region, seed=cfg.train.seed, train=True,
                      rank=rank, world=world, start=start, rotate=rotate)
    collate = Collate(tok, cfg.text.max_len, cfg.data.negatives_per_region,
                      cfg.prompt.points_per_region)
    w = cfg.data.workers
    return DataLoader(ds, batch_size=cfg.data.batch, collate_fn=collate, num_workers=w,
                      persistent_workers=w > 0, prefetch_factor=4 if w else None,
                      generator=torch.Generator().manual_seed(cfg.train.seed))


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


def train(opts: TrainOptions) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank, world, device = setup_distributed(opts.device)
    _claim_run(opts, rank)
    cfg, ckpt, resume = _run_setup(opts, rank)
    corpus = CorpusIndex.open(opts.corpus)
    tok = build_tokenizer(corpus, cfg, opts.out, rank)
    states, rotate = data_states(ckpt, rank) if ckpt else ({}, 0)
    core, opt, step = _model_and_optimizer(cfg, len(tok), device, ckpt)
    model = core
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=True)
    loss_fn = RegionClipLoss(cfg.loss)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    loader = make_loader(corpus, cfg, tok, rank, world, states, rotate)
    batches = iter(loader)
    log = TrainLog(opts.out, rank, resume_step=step if resume else None)

    total = cfg.train.total_steps
    consumed, t0 = 0, time.perf_counter()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    win = dict.fromkeys(("seen", "steps", "data_s", "step_s"), 0.0)  # since the last log row
    while step < total and (opts.stop_after is None or step < opts.stop_after):
        stage = stage_of(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        t = time.perf_counter()
        terms, gnorm, n, wait = train_step(model, core, opt, loss_fn, batches, states, cfg, stage,
                                           device, amp, world)
        _add(win, seen=n, steps=1, data_s=wait, step_s=time.perf_counter() - t - wait)
        consumed += cfg.train.accum
        for k, v in terms.items():
            sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
        step += 1
        if step % cfg.train.log_every == 0 or step == total:
            sc = {k: float(v.detach()) for k, v in core.scales().items()}
            log.write(step, stage, sums, counts, lr=lr_at(step - 1, cfg), grad_norm=gnorm,
                      samples_per_s=win["seen"] * world / (time.perf_counter() - t0),
                      data_s=win["data_s"] / win["steps"], step_s=win["step_s"] / win["steps"],
                      **sc)
            sums, counts, t0 = {}, {}, time.perf_counter()
            win = dict.fromkeys(win, 0.0)
        if step % cfg.train.ckpt_every == 0 or step == total:
            rot = (rotate + consumed) % max(cfg.data.workers, 1)
            _checkpoint(opts.out, core, opt, cfg, step, stage, states, rot, len(tok), rank, world)
    log.close()
    if world > 1:
        dist.barrier()
    return {"steps": step, "stages": list(cfg.train.stage_steps), "run": str(opts.out),
            "checkpoint": str(ckpt_path(opts.out))}


def _add(acc: dict[str, float], **vals: float) -> None:
    for k, v in vals.items():
        acc[k] += v


def train_step(model, core, opt, loss_fn, batches, states, cfg: RunConfig, stage: int,
               device: torch.device, amp, world: int) -> tuple[dict[str, float], float, int, float]:
    """One optimizer step over ``accum`` micro-batches → (mean loss terms, grad norm, images,
    seconds spent waiting for the loader)."""
    micro, data_s = [], 0.0
    for _ in range(cfg.train.accum):
        t = time.perf_counter()
        batch = next(batches)
        data_s += time.perf_counter() - t
        states_from_batch(states, batch["pos"])
        micro.append(to_device(batch, device))
    out = accumulate(model, loss_fn, micro, stage, amp, world)
    if world > 1 and out:  # each rank's terms are (its rows' sum / global rows) · world
        vec = torch.tensor(list(out.values()), device=device)
        dist.all_reduce(vec)
        out = dict(zip(out, (vec / world).tolist(), strict=True))
    gnorm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out, float(gnorm), sum(len(b["images"]) for b in micro), data_s


def accumulate(model, loss_fn, micro: list[dict], stage: int, amp, world: int = 1) -> dict[str, float]:
    """Forward and backward of one optimizer step (gradients add up in ``.grad``) → mean terms.

    The contrastive batch is ALL the micro-batches (open_clip's ``accum_freq``): their features
    are first computed without grad and cached; then each micro-batch is recomputed with grad and
    its loss is taken over the cached set with its own rows live, so the summed gradient equals
    the gradient of one batch of all of them. The RNG state (prompt dropout) is replayed, so the
    recomputed features equal the cached ones. One micro-batch: a plain forward and backward."""
    want_global, want_region = stage in (1, 3), stage in (2, 3)
    dev = micro[0]["images"].device
    accum = len(micro)
    model.train()
    rngs, cached = [], []
    if accum > 1:
        with torch.no_grad(), amp:
            for b in micro:
                rngs.append(_rng_state(dev))
                cached.append(model(b, want_global, want_region))
    out: dict[str, float] = {}
    for k, b in enumerate(micro):
        if rngs:
            _set_rng_state(rngs[k], dev)
        sync = nullcontext() if (world == 1 or k == accum - 1) else model.no_sync()
        with sync:
            with amp:
                feats = merge_features(cached, k, model(b, want_global, want_region))
                terms = loss_fn(feats)
                loss = loss_fn.total(terms)
            loss.backward()
        for name, v in terms.items():
            out[name] = out.get(name, 0.0) + float(v.detach()) / accum
    return out


def merge_features(cached: list[dict], k: int, live: dict) -> dict:
    """The features of all micro-batches (rows concatenated in micro-batch order) with those of
    micro-batch ``k`` replaced by ``live`` (with grad). Scalars (temperatures, SigLIP bias) come
    from ``live`` carrying 1/accum of their gradient, so that over the accum backward passes
    every parameter receives the full-batch gradient exactly once."""
    if not cached:
        return live
    n = len(cached)
    out = {}
    for name, v in live.items():
        if v.ndim == 0:
            out[name] = v / n + v.detach() * (1 - 1 / n)
        else:
            out[name] = torch.cat([v if i == k else c[name] for i, c in enumerate(cached)])
    return out


def _rng_state(dev: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None


def _set_rng_state(state: tuple, dev: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], dev)


def _checkpoint(run: Path, model, opt, cfg: RunConfig, step: int, stage: int, states, rotate: int,
                vocab: int, rank: int, world: int) -> None:
    mine = pack_data_state(states, rotate)
    data = {0: mine}
    if world > 1:
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        data = dict(enumerate(every))
    if rank == 0:
        save_checkpoint(run, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "config": cfg.to_dict(), "step": step, "stage": stage,
                              "data": data, "rng": rng_state(), "vocab_size": vocab})
