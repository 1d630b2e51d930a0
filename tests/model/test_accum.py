"""Gradient accumulation enlarges the contrastive batch (open_clip's ``accum_freq``).

The gradient after ``accumulate`` over K micro-batches of B images equals the gradient of one
batch of K·B images (every parameter, 1e-5 relative), over generated batches: images with 0–3
regions, captions shared within and across micro-batches (equal positives), every stage, CLIP and
SigLIP. Prompt dropout is replayed (the recomputed features equal the cached ones), and one
micro-batch is the plain forward/backward, bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from micro import MICRO, K, P, WordTokenizer, sample

from model.clip import build_model
from model.collate import Collate
from model.config import RunConfig
from model.loss import RegionClipLoss, stage_losses
from model.train import accumulate, merge_features

WORDS = ["left", "right", "lung", "nodule", "liver", "lesion", "kidney", "cyst", "small", "large"]
CAPTIONS = [" ".join(WORDS[i:i + n]) for i in range(0, 8) for n in (2, 3)]  # 16 texts, 2–3 words


@functools.cache
def _model(siglip: bool, drop: bool) -> tuple[torch.nn.Module, RegionClipLoss]:
    cfg = RunConfig.from_dict(MICRO)
    cfg.model.siglip = siglip
    if not drop:  # deterministic prompts: a batch of 2B draws other dropout numbers than 2 of B
        cfg.prompt.drop_box = cfg.prompt.drop_points = cfg.prompt.drop_mask = 0.0
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=len(WORDS) + 2)
    with torch.no_grad():  # fan-in init: distinct features and O(1) gradients (at the default
        for p in model.parameters():  # init every input embeds alike, the loss is ln B, and the
            if p.ndim >= 2:  # gradient is float32 noise of the batch shape)
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model, RegionClipLoss(cfg.loss)


def _sample(rng: np.random.Generator, n_regions: int, i: int) -> dict:
    return sample(rng, n_regions, i, lambda: CAPTIONS[rng.integers(len(CAPTIONS))],
                  lambda: [CAPTIONS[c] for c in rng.integers(len(CAPTIONS), size=K)],
                  lambda: CAPTIONS[rng.integers(len(CAPTIONS))])


def _grads(model, loss_fn, micro: list[dict], stage: int) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    accumulate(model, loss_fn, micro, stage, amp=torch.autocast("cpu", enabled=False))
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Every parameter's gradient within ``rel`` of its norm, plus a float32 rounding floor of
    1e-6: a near-zero gradient (e.g. all captions equal) is a difference of O(1) terms, and the
    big batch pads its texts to other lengths (attention sums in another order)."""
    assert got.keys() == want.keys()
    assert any(w is not None for w in want.values())
    for name, g in got.items():
        w = want[name]
        assert (g is None) == (w is None), name
        if w is not None:
            err = float((g - w).norm())
            assert err <= rel * float(w.norm()) + 1e-6, (name, err, float(w.norm()))


collate = Collate(WordTokenizer(WORDS), max_len=8, negatives=K, points=P)


@settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), accum=st.integers(2, 3),
       stage=st.sampled_from([1, 2, 3]), siglip=st.booleans(),
       regions=st.lists(st.integers(0, 3), min_size=9, max_size=9))
def test_accumulated_gradient_equals_big_batch(seed, b, accum, stage, siglip, regions):
    """K micro-batches of B (features cached, each recomputed with grad) ≡ one batch of K·B."""
    model, loss_fn = _model(siglip, drop=False)
    rng = np.random.default_rng(seed)
    for i in range(0, b * accum, b):  # RegionCLIP.forward fails on a batch without regions
        regions[i] = max(regions[i], 1)  # (clip.py: view(0, K, -1)); one per micro-batch
    samples = [_sample(rng, regions[i], i) for i in range(b * accum)]
    micro = [collate(samples[i * b:(i + 1) * b]) for i in range(accum)]
    _assert_same(_grads(model, loss_fn, micro, stage), _grads(model, loss_fn, [collate(samples)],
                                                                    stage))


def test_prompt_dropout_is_replayed():
    """With prompt dropout on, the accumulated gradient equals the gradient of the SAME random
    draws taken over the whole set at once (each micro-batch forward with grad, one loss)."""
    model, loss_fn = _model(siglip=False, drop=True)
    rng = np.random.default_rng(1)
    micro = [collate([_sample(rng, 3, 2 * i + j) for j in range(2)]) for i in range(2)]
    torch.manual_seed(5)
    got = _grads(model, loss_fn, micro, stage=3)
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    feats = [model(m, True, True) for m in micro]
    merged = {k: v if v.ndim == 0 else torch.cat([f[k] for f in feats]) for k, v in feats[0].items()}
    loss_fn.total(loss_fn(merged)).backward()
    _assert_same(got, {n: None if p.grad is None else p.grad.clone()
                       for n, p in model.named_parameters()})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_micro_batch_is_the_plain_step(stage):
    """accum=1 is unchanged: exactly the forward, loss and backward of the batch alone."""
    model, loss_fn = _model(siglip=False, drop=True)
    batch = collate([_sample(np.random.default_rng(2), 2, i) for i in range(3)])
    live = {"x": torch.ones(2)}
    assert merge_features([], 0, live) is live
    torch.manual_seed(3)
    got = _grads(model, loss_fn, [batch], stage)
    torch.manual_seed(3)
    model.zero_grad(set_to_none=True)
    loss_fn.total(loss_fn(model(batch, *stage_losses(stage)))).backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (got[n] is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, got[n]), n


@pytest.mark.parametrize("workers", [0, 3])  # 3: the rotation (micro-batches mod workers)
def test_accumulating_run_resumes_exactly(tiny_corpus, micro_preset, tmp_path, workers):
    """--accum 2 through all three stages: 8 steps straight vs. killed after step 6 (checkpoint
    at 4) + --resume → the same losses; every log row has the loader wait and the compute time."""
    from model.checkpoint import load_checkpoint
    from model.train import TrainOptions, train
    from model.trainlog import read_log

    def run(out, **kw):
        train(TrainOptions(corpus=tiny_corpus, out=out, preset=str(micro_preset), steps=8,
                           accum=2, batch=4, workers=workers, **kw))
        return [(r["step"], r["loss"], r["data_s"], r["step_s"]) for r in read_log(out / "log.jsonl")]

    straight = run(tmp_path / "straight")
    run(tmp_path / "killed", stop_after=6)
    assert load_checkpoint(tmp_path / "killed")["step"] == 4
    resumed = run(tmp_path / "killed", resume=True)
    assert [r[0] for r in resumed] == [r[0] for r in straight] == list(range(1, 9))
    for a, b in zip(straight, resumed, strict=True):
        assert a[1] == pytest.approx(b[1], rel=1e-5, abs=1e-6)
    assert all(r[2] >= 0 and r[3] > 0 for r in straight + resumed)
