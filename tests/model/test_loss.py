"""Losses: targets, hard negatives, and the two-rank gloo gather against one process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.config import LossConfig
from model.loss import RegionClipLoss, contrastive, negative_ce

E, K = 16, 3


def _features(seed=0, b=6, r=(5, 3), keys_dup=True, siglip=False):
    """A batch of b images (split 3/3 over ranks) and regions split r[0]/r[1]."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, E, generator=g), dim=-1)

    n = sum(r)
    gkeys = torch.arange(b) * 7
    rkeys = torch.arange(n) + 100
    if keys_dup:
        gkeys[1] = gkeys[4]  # image 1 (rank 0) and image 4 (rank 1) share a caption
        rkeys[2] = rkeys[6]  # a region caption shared across ranks
    nkeys = torch.arange(n * K).view(n, K) + 1000
    nkeys[0, 1] = rkeys[7]  # region 0's negative is region 7's caption (another rank)
    f = {"image_features": unit(b), "text_features": unit(b), "global_keys": gkeys,
         "region_features": unit(n), "region_text_features": unit(n),
         "negative_features": unit(n, K), "region_keys": rkeys, "negative_keys": nkeys,
         "logit_scale": torch.tensor(10.0), "region_logit_scale": torch.tensor(12.0)}
    if siglip:
        f["logit_bias"] = torch.tensor(-5.0)
    return f


def _split(f, rank, b=6, r=(5, 3)):
    bs = slice(rank * b // 2, (rank + 1) * b // 2)
    rs = slice(0, r[0]) if rank == 0 else slice(r[0], sum(r))
    out = {}
    for k, v in f.items():
        if v.ndim == 0:
            out[k] = v
        elif k in ("image_features", "text_features", "global_keys"):
            out[k] = v[bs]
        else:
            out[k] = v[rs]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, siglip, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        f = _split(_features(siglip=siglip), rank)
        for k in ("image_features", "text_features", "region_features", "region_text_features",
                  "negative_features"):
            f[k] = f[k].clone().requires_grad_(True)
        terms = RegionClipLoss(LossConfig())(f)
        total = sum(terms.values())
        total.backward()
        vals = torch.tensor([float(terms[k].detach()) for k in sorted(terms)])
        dist.all_reduce(vals)
        # numpy arrays pickle by value; torch tensors would travel as shared-memory file
        # descriptors that vanish when this process exits before the parent reads them
        grads = {k: f[k].grad.numpy().copy() for k in ("image_features", "region_features",
                                                       "negative_features", "text_features")}
        queue.put((rank, (vals / 2).tolist(), grads))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("siglip", [False, True])
def test_two_rank_gather_matches_single_process(siglip):
    f = _features(siglip=siglip)
    for k in ("image_features", "text_features", "region_features", "region_text_features",
              "negative_features"):
        f[k] = f[k].clone().requires_grad_(True)
    terms = RegionClipLoss(LossConfig())(f)
    sum(terms.values()).backward()
    single = [float(terms[k].detach()) for k in sorted(terms)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, siglip, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (v, g)) for r, v, g in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        assert results[rank][0] == pytest.approx(single, rel=1e-5, abs=1e-6)
        # each rank's local gradient is world·(gradient of the single-process loss)
        ref = _split({k: f[k].grad for k in results[rank][1]}, rank)
        for k, g in results[rank][1].items():
            torch.testing.assert_close(torch.from_numpy(g) / 2, ref[k], rtol=1e-4, atol=1e-6)


def test_hard_labels_equal_identity_keys():
    f = _features(keys_dup=False)
    with_keys = contrastive(f["image_features"], f["text_features"], f["logit_scale"],
                            f["global_keys"])
    hard = contrastive(f["image_features"], f["text_features"], f["logit_scale"], None)
    assert float(with_keys) == pytest.approx(float(hard), rel=1e-6)


def test_duplicate_captions_are_joint_positives():
    from model.loss import _targets

    t = _targets(torch.tensor([5, 5, 6]), torch.tensor([5, 5, 6, 9, 5]))
    expect = torch.tensor([[1 / 3, 1 / 3, 0, 0, 1 / 3]] * 2 + [[0, 0, 1.0, 0, 0]])
    torch.testing.assert_close(t, expect)
    # two images with one caption: text→image may pick either image without penalty
    a = F.normalize(torch.randn(2, E), dim=-1)
    b = F.normalize(a.mean(0, keepdim=True).expand(2, -1), dim=-1)
    soft = contrastive(a, b, torch.tensor(50.0), torch.tensor([3, 3]))
    hard = contrastive(a, b, torch.tensor(50.0), None)
    assert float(soft) <= float(hard) + 1e-6
    assert float(soft) == pytest.approx(math.log(2), abs=1e-3)


def test_negative_targets_true_caption_first():
    reg = F.normalize(torch.randn(3, E), dim=-1)
    text = reg.clone()  # region embedding equals its caption
    negs = F.normalize(torch.randn(3, K, E), dim=-1)
    good = negative_ce(reg, text, negs, torch.tensor(50.0))
    bad = negative_ce(reg, negs[:, 0], torch.cat([text[:, None], negs[:, 1:]], 1),
                      torch.tensor(50.0))
    assert float(good) < 0.05 < float(bad)


def test_negatives_join_region_denominator():
    f = _features(keys_dup=False)
    base = RegionClipLoss(LossConfig())(f)["region_loss"]
    f2 = dict(f)
    f2["negative_features"] = f["region_features"][:, None].expand(-1, K, -1).clone()
    f2["negative_features"] = F.normalize(f2["negative_features"] + 0.01, dim=-1)
    harder = RegionClipLoss(LossConfig())(f2)["region_loss"]
    assert float(harder) > float(base)  # negatives close to the regions raise the loss


def _empty_batch(n_regions_per_image: list[int]):
    """A collated micro-preset batch whose images have the given numbers of regions."""
    from pathlib import Path
    from tempfile import mkdtemp

    import numpy as np

    from model.collate import Collate
    from model.text_tower import load_tokenizer, train_tokenizer

    tok = load_tokenizer(train_tokenizer(["left lung", "right kidney", "ct axial slice"],
                                         Path(mkdtemp()), 100).parent)

    def region(j):
        mask = np.zeros((64, 64), np.uint8)
        mask[10:20 + j, 10:30] = 1
        return {"mask": mask, "box": np.array([0.15, 0.15, 0.5, 0.4], np.float32),
                "caption": "left lung", "negatives": ["right lung"] * 3, "label": "lung_left",
                "laterality": "left", "region_id": f"r{j}",
                "points": np.array([[0.2, 0.2, 1], [0.9, 0.9, 0]], np.float32)}

    samples = [{"image": np.full((64, 64), 40 * i, np.uint8), "image_id": f"i{i}",
                "summary": f"ct axial slice {i}", "report": "ct", "global_text": f"ct {i}",
                "image_labels": [], "regions": [region(j) for j in range(n)],
                "pos": (0, 0, i, 0, i)} for i, n in enumerate(n_regions_per_image)]
    return Collate(tok, 32, 3, 2)(samples), len(tok)


@pytest.mark.parametrize("stage", [2, 3])
def test_batch_without_valid_regions_trains(stage):
    """A stage-2/3 batch whose images have no region: finite losses, a backward pass."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import MICRO

    from model.clip import build_model
    from model.config import RunConfig
    from model.loss import RegionClipLoss

    cfg = RunConfig.from_dict(MICRO)
    batch, vocab = _empty_batch([0, 0, 0])
    model = build_model(cfg, vocab).train()
    loss_fn = RegionClipLoss(cfg.loss)
    terms = loss_fn(model(batch, want_global=stage == 3, want_region=True))
    assert {"region_loss", "negative_loss"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    loss_fn.total(terms).backward()


def test_stage_parameters_match_the_graph():
    """The prefixes each stage freezes (train.stage_unused) are exactly the parameters its
    losses do not reach: DDP without find_unused_parameters relies on it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import MICRO

    from model.clip import build_model
    from model.config import RunConfig
    from model.loss import RegionClipLoss, stage_losses
    from model.train import stage_unused

    cfg = RunConfig.from_dict(MICRO)
    batch, vocab = _empty_batch([2, 1, 3])
    model = build_model(cfg, vocab).train()
    loss_fn = RegionClipLoss(cfg.loss)
    for stage in (1, 2, 3):
        model.zero_grad(set_to_none=True)
        loss_fn.total(loss_fn(model(batch, *stage_losses(stage)))).backward()
        unused = {n for n, p in model.named_parameters() if p.grad is None}
        frozen = {n for n, _ in model.named_parameters() if n.startswith(stage_unused(stage))}
        assert unused == frozen, stage
