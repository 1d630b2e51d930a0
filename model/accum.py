"""Gradient accumulation that enlarges the contrastive batch (open_clip's ``accum_freq``): see
:func:`accumulate`. Used by :mod:`model.train`."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from model.loss import stage_losses


def accumulate(model, loss_fn, micro: list[dict], stage: int, amp,
               world: int = 1) -> dict[str, torch.Tensor]:
    """Forward and backward of one optimizer step (gradients add up in ``.grad``) → mean terms.

    The contrastive batch is ALL the micro-batches (open_clip's ``accum_freq``): their features
    are first computed without grad and cached; then each micro-batch is recomputed with grad and
    its loss is taken over the cached set with its own rows live, so the summed gradient equals
    the gradient of one batch of all of them. The RNG state (prompt dropout) is replayed, so the
    recomputed features equal the cached ones. One micro-batch: a plain forward and backward."""
    want_global, want_region = stage_losses(stage)
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
        for name, v in terms.items():  # on the device: no host sync per step
            out[name] = out[name] + v.detach() / accum if name in out else v.detach() / accum
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
