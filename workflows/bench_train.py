"""python -m workflows.bench_train --corpus DIR [--preset tiny] [--steps 6] [--rounds 3] [--out FILE.md]
python -m workflows.bench_train --corpus DIR --preset base --loader-only --workers 0,1 --rounds 3

Training samples/s of this project's model against open_clip's ``open_clip.CLIP`` built with the
same tower sizes (ViT width/depth/heads/patch/input, text width/layers/heads, embedding size) on
the same images and captions, in global mode (image ↔ summary/report, CLIP loss, AdamW step);
then the cost of a region-mode step (stage 3: global + region + negatives through the ROI branch)
relative to a global-mode step. Contenders are timed in alternating rounds on the same
pre-collated batches (data loading excluded) and the median step time is reported.
open_clip takes the grey images repeated to 3 channels and fixed-length token ids (the same
WordPiece ids); ours encodes each distinct caption of a batch once (as in training).
Then the DataLoader alone (no model; in-process and with the preset's workers), in samples/s:
the loader must outpace the training step. Goals: ours ≥ open_clip samples/s; region step
≤ 1.6× global step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see workflows/train_model.py

import torch  # noqa: E402


def _batches(corpus_dir: Path, cfg, n: int, tmp: Path):
    from model.collate import Collate
    from model.data import CorpusIndex, RegionCorpus
    corpus = CorpusIndex.open(corpus_dir)
    ds = RegionCorpus(corpus, "train", cfg.data, cfg.image.image_size,
                      points=cfg.prompt.points_per_region, train=True)
    tok = _tokenizer(corpus, cfg, tmp)
    col = Collate(tok, cfg.text.max_len, cfg.data.negatives_per_region,
                  cfg.prompt.points_per_region)
    it = iter(ds)
    return tok, [col([next(it) for _ in range(cfg.data.batch)]) for _ in range(n)]


def _tokenizer(corpus, cfg, tmp: Path):
    from model.tokenizer import build_in_memory

    return build_in_memory(corpus, cfg.text.vocab_size, tmp)


def loader_only(args) -> dict:
    """``--loader-only``: DataLoader samples/s (no model) per worker count, ``--rounds`` times,
    and in-process samples per CPU second."""
    from model.config import load_preset
    from model.data import CorpusIndex

    cfg = load_preset(args.preset)
    tok = _tokenizer(CorpusIndex.open(args.corpus), cfg, args.tmp)
    rates = {f"workers_{w}": [round(loader_rate(args.corpus, cfg, tok, w, args.batches), 1)
                              for _ in range(args.rounds)] for w in args.workers}
    per = {k: round(statistics.median(v) / max(1, int(k.split("_")[1])), 1)
           for k, v in rates.items()}
    # in-process samples per CPU second: what one worker delivers on a core of its own (steady
    # on a shared machine, where wall-clock rates follow the other processes' load)
    cpu = [round(loader_rate(args.corpus, cfg, tok, 0, args.batches, time.process_time), 1)
           for _ in range(args.rounds)]
    return {"preset": args.preset, "batch": cfg.data.batch, "samples_per_s": rates,
            "median_per_worker": per, "samples_per_cpu_s": cpu,
            "median_samples_per_cpu_s": statistics.median(cpu)}


def _open_clip_model(cfg, vocab: int):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=cfg.image.depth, width=cfg.image.width,
                           head_width=cfg.image.width // cfg.image.heads,
                           patch_size=cfg.image.patch_size, image_size=cfg.image.image_size,
                           mlp_ratio=cfg.image.mlp_ratio)
    text = CLIPTextCfg(context_length=cfg.text.max_len, vocab_size=vocab, width=cfg.text.hidden,
                       heads=cfg.text.heads, layers=cfg.text.layers,
                       mlp_ratio=cfg.text.intermediate / cfg.text.hidden)
    return open_clip.CLIP(embed_dim=cfg.model.embed_dim, vision_cfg=vision, text_cfg=text), \
        open_clip.ClipLoss()


def _fixed_ids(batch: dict, length: int) -> torch.Tensor:
    ids = batch["text_ids"][batch["global_text"]]  # (B, L) per-image captions
    out = torch.zeros(len(ids), length, dtype=torch.long)
    out[:, : min(length, ids.shape[1])] = ids[:, :length]
    return out


def _timed(fn, batches, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        t = time.perf_counter()
        fn(batches[i % len(batches)])
        times.append(time.perf_counter() - t)
    return times


def loader_rate(corpus_dir: Path, cfg, tok, workers: int, batches: int = 12,
                clock=time.perf_counter) -> float:
    """Samples/s the training DataLoader delivers (Parquet read, PNG decode, region sampling,
    masks, tokenisation, collation) with ``workers`` worker processes and no model at all."""
    import copy

    from model.data import CorpusIndex
    from model.train import make_loader

    cfg = copy.deepcopy(cfg)
    cfg.data.workers = workers
    it = iter(make_loader(CorpusIndex.open(corpus_dir), cfg, tok, 0, 1, {}, 0))
    for _ in range(2):  # worker start-up and first reads
        next(it)
    t = clock()
    n = sum(len(next(it)["images"]) for _ in range(batches))
    return n / (clock() - t)


def run(args) -> dict:
    from model.clip import build_model
    from model.config import load_preset
    from model.loss import RegionClipLoss

    torch.manual_seed(0)
    cfg = load_preset(args.preset)
    tok, batches = _batches(args.corpus, cfg, 3, args.tmp)
    ours = build_model(cfg, len(tok)).train()
    loss_fn = RegionClipLoss(cfg.loss)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    oc, oc_loss = _open_clip_model(cfg, len(tok))
    oc.train()
    oc_opt = torch.optim.AdamW(oc.parameters(), lr=1e-4)
    oc_batches = [(b["images"].expand(-1, 3, -1, -1).contiguous(),
                   _fixed_ids(b, cfg.text.max_len)) for b in batches]

    def ours_step(b, region=False):
        terms = loss_fn(ours(b, want_global=True, want_region=region))
        loss_fn.total(terms).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def oc_step(b):
        img, txt = b
        f_img, f_txt, scale = oc(img, txt)
        oc_loss(f_img, f_txt, scale).backward()
        oc_opt.step()
        oc_opt.zero_grad(set_to_none=True)

    for fn, bs in [(ours_step, batches), (oc_step, oc_batches),
                   (lambda b: ours_step(b, True), batches)]:
        _timed(fn, bs, 2)  # warm-up
    res: dict[str, list[float]] = {"ours_global": [], "open_clip": [], "ours_region": []}
    for _ in range(args.rounds):
        res["ours_global"] += _timed(ours_step, batches, args.steps)
        res["open_clip"] += _timed(oc_step, oc_batches, args.steps)
        res["ours_region"] += _timed(lambda b: ours_step(b, True), batches, args.steps)
    med = {k: statistics.median(v) for k, v in res.items()}
    b = cfg.data.batch
    loader = {f"workers_{w}": round(loader_rate(args.corpus, cfg, tok, w), 1)
              for w in sorted({0, cfg.data.workers})}
    return {"preset": args.preset, "batch": b, "threads": torch.get_num_threads(),
            "step_s": med, "samples_per_s": {k: b / v for k, v in med.items()},
            "ours_vs_open_clip": med["open_clip"] / med["ours_global"],
            "region_over_global": med["ours_region"] / med["ours_global"],
            "loader_samples_per_s": loader,
            "params_m": {"ours": sum(p.numel() for p in ours.parameters()) / 1e6,
                         "open_clip": sum(p.numel() for p in oc.parameters()) / 1e6}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n\n")[1])
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=6, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the markdown table (and .json) here")
    p.add_argument("--tmp", type=Path, default=Path("/tmp/bench_train_tok"))
    p.add_argument("--loader-only", action="store_true",
                   help="time the DataLoader alone (no model) per --workers count")
    p.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1],
                   help="with --loader-only: comma list of DataLoader worker counts")
    p.add_argument("--batches", type=int, default=12, help="with --loader-only: timed batches")
    args = p.parse_args(argv)
    if not (args.corpus / "images").is_dir():
        print(f"bench_train: error: --corpus {args.corpus}: no images/ folder", file=sys.stderr)
        return 2
    if args.loader_only:
        print(json.dumps(loader_only(args), indent=1))
        return 0
    r = run(args)
    md = ("| contender | step s (median) | samples/s |\n|---|---|---|\n"
          + "".join(f"| {k} | {r['step_s'][k]:.3f} | {r['samples_per_s'][k]:.1f} |\n"
                    for k in ("ours_global", "open_clip", "ours_region"))
          + f"\nours / open_clip speed: {r['ours_vs_open_clip']:.2f}×; region step / global "
            f"step: {r['region_over_global']:.2f}× (batch {r['batch']}, {r['threads']} threads)\n"
          + "loader alone (no model), samples/s: "
          + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in r["loader_samples_per_s"].items())
          + "\n")
    print(md)
    print(json.dumps(r, indent=1))
    if args.out:
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
