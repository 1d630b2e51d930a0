"""Contrastive losses: ``global_loss``, ``region_loss``, ``negative_loss``.

Distributed (open_clip style, ``gather_with_grad`` + ``local_loss``): every rank gathers the
features of all ranks (variable row counts are padded for the collective), keeps its LOCAL rows
and scores them against ALL columns; targets are the local rows' own columns, i.e. labels offset
by the rank's first global row. The gather's backward all-reduces the gradient and hands each
rank the slice of its own rows, so gradients also reach features used as columns elsewhere.
Each rank's loss is its rows' sum divided by the GLOBAL row count and multiplied by the world
size: after DDP averages gradients the update equals the single-process update on the whole
batch, and ``sum over ranks / world`` of the returned values equals the single-process loss.

Equal captions are equal positives: when ``*_keys`` (caption hashes) are present, the target of
a row is uniform over all columns whose key equals its own (multi-positive soft cross-entropy;
with distinct keys this is exactly the one-hot label at ``offset + i``).

* global_loss — image ↔ report/summary, symmetric CLIP (or SigLIP with the learned bias).
* region_loss — region ↔ its caption; every region's hard negatives (all ranks) join the
  columns of the region→text side as extra negatives (a negative whose text equals a region's
  own caption counts as positive for it).
* negative_loss — per region, cross-entropy over [true caption, its own K negatives] (target 0).
* grounding_loss — each region's caption through the image-space text projection against the
  images, symmetric; the positives of a caption are the copies of its own image (keys: image
  ids), of an image all its regions' captions; the global temperature. It teaches the image
  space the short phrases that image zero-shot prompts are, at a cost to image↔report
  retrieval that outweighed its gain on 10 held-out patients: off (weight 0) in the presets
  (issue 20). With the image side detached image zero-shot and retrieval were lower still.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.config import LossConfig

_LOCAL = threading.local()


def stage_losses(stage: int) -> tuple[bool, bool]:
    """(global loss, region losses) computed in progressive ``stage`` 1, 2 or 3: the global loss
    in every stage, the region losses from stage 2. The image and text towers are shared, so a
    stage 2 without the global loss undid stage 1 (in the quick start its global loss rose from
    2.50 to 4.10 across stage 2) and left the region-aware model below the global-only ablation
    on every image-level metric."""
    return True, stage in (2, 3)


@contextlib.contextmanager
def local_loss():
    """Within this context the losses see this rank's rows only (no collective), as in one
    process: validation, where ranks may hold different numbers of batches."""
    before = getattr(_LOCAL, "on", False)
    _LOCAL.on = True
    try:
        yield
    finally:
        _LOCAL.on = before


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and not getattr(_LOCAL, "on", False):
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """(n, ...) → (W, mx, ...) zero-padded; backward: all-reduce, return own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mx: int):
        ws, rk = world()
        pad = x.new_zeros((mx, *x.shape[1:]))
        pad[: len(x)] = x
        bufs = [torch.empty_like(pad) for _ in range(ws)]
        dist.all_gather(bufs, pad.contiguous())
        ctx.rank, ctx.n = rk, len(x)
        return torch.stack(bufs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank, : ctx.n], None


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(all ranks' rows concatenated (N, ...), offset of this rank's rows, N)."""
    ws, rk = world()
    if ws == 1:
        return x, 0, len(x)
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    stacked = _GatherWithGrad.apply(x, max(sizes))  # (W, mx, ...)
    allx = torch.cat([stacked[r, : sizes[r]] for r in range(ws)])
    return allx, sum(sizes[:rk]), sum(sizes)


def _targets(row_keys: torch.Tensor, col_keys: torch.Tensor) -> torch.Tensor:
    """(n, C) target distribution: uniform over the columns whose key equals the row's."""
    t = (row_keys[:, None] == col_keys[None, :]).float()
    return t / t.sum(1, keepdim=True).clamp(min=1.0)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor | None, offset: int) -> torch.Tensor:
    """Summed cross-entropy of rows (n, C); ``targets`` None → labels offset + arange(n)."""
    if targets is None:
        labels = offset + torch.arange(len(logits), device=logits.device)
        return F.cross_entropy(logits, labels, reduction="sum")
    return -(targets * F.log_softmax(logits, dim=-1)).sum()


def _siglip(logits: torch.Tensor, targets: torch.Tensor | None, offset: int) -> torch.Tensor:
    """Summed sigmoid loss of rows (n, C) with ±1 labels (positives from targets / diagonal)."""
    if targets is None:
        pos = torch.zeros_like(logits)
        pos[torch.arange(len(logits)), offset + torch.arange(len(logits))] = 1
    else:
        pos = (targets > 0).float()
    return -F.logsigmoid((2 * pos - 1) * logits).sum()


def contrastive(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None,
                extra_b: torch.Tensor | None = None, extra_keys: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric loss between paired local rows a (n, E), b (n, E) over all ranks' rows.

    ``extra_b`` (m, E) are additional text-side negatives (all ranks), in the a→b side only."""
    ws = world()[0]
    a, b = a.float(), b.float()
    all_a, offset, n_all = gather(a)
    all_b = gather(b)[0]
    all_keys = gather(keys)[0] if keys is not None else None
    cols_b, col_keys = all_b, all_keys
    if extra_b is not None:
        cols_b = torch.cat([all_b, gather(extra_b.float())[0]])
        if keys is not None:
            col_keys = torch.cat([all_keys, gather(extra_keys)[0]])
    t_ab = _targets(keys, col_keys) if keys is not None else None
    t_ba = _targets(keys, all_keys) if keys is not None else None
    logits_ab = scale * a @ cols_b.T  # (n, N [+ M])
    logits_ba = scale * b @ all_a.T  # (n, N)
    if bias is not None:  # SigLIP: every pair is one binary term; one direction covers all
        return _siglip(logits_ab + bias, t_ab, offset) / max(n_all, 1) * ws
    total = _soft_ce(logits_ab, t_ab, offset) + _soft_ce(logits_ba, t_ba, offset)
    return total / (2 * max(n_all, 1)) * ws


def negative_ce(region: torch.Tensor, text: torch.Tensor, negs: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over [true, own K negatives] per region; global-mean scaled like above."""
    ws = world()[0]
    n_all = len(region)
    if ws > 1:
        n = torch.tensor([len(region)], device=region.device, dtype=torch.float32)
        dist.all_reduce(n)
        n_all = int(n.item())
    cand = torch.cat([text.float()[:, None], negs.float()], dim=1)  # (R, 1 + K, E)
    logits = scale * torch.einsum("re,rke->rk", region.float(), cand)
    labels = torch.zeros(len(region), dtype=torch.long, device=region.device)
    return F.cross_entropy(logits, labels, reduction="sum") / max(n_all, 1) * ws


class RegionClipLoss(torch.nn.Module):
    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named ``*_loss`` terms for whichever features are present in ``f``."""
        out: dict[str, torch.Tensor] = {}
        bias = f.get("logit_bias")
        if "text_features" in f:
            out["global_loss"] = contrastive(f["image_features"], f["text_features"],
                                             f["logit_scale"], f.get("global_keys"), bias=bias)
        if "region_features" in f:
            negs = f["negative_features"]  # (R, K, E)
            nk = f.get("negative_keys")
            out["region_loss"] = contrastive(
                f["region_features"], f["region_text_features"], f["region_logit_scale"],
                f.get("region_keys"), extra_b=negs.flatten(0, 1),
                extra_keys=nk.flatten() if nk is not None else None, bias=bias)
            out["negative_loss"] = negative_ce(f["region_features"], f["region_text_features"],
                                               negs, f["region_logit_scale"])
        if "caption_image_features" in f:
            out["grounding_loss"] = contrastive(
                f["caption_image_features"], f["region_image_features"], f["logit_scale"],
                f["region_image_keys"], bias=bias)
        return out

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        w = {"global_loss": self.cfg.global_weight, "region_loss": self.cfg.region_weight,
             "negative_loss": self.cfg.negative_weight,
             "grounding_loss": self.cfg.grounding_weight}
        return sum(w[k] * v for k, v in terms.items())
