"""Prompt encoder and ROI branch: every prompt kind and combination gives the right shapes."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.config import ImageTowerConfig, PromptConfig, RoiConfig
from model.image_tower import VisionTransformer
from model.prompts import PromptEncoder, drop_prompts
from model.roi import RoiBranch

D, PATCH, R, P = 32, 16, 5, 2


def _inputs(r=R, size=64):
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(r, P, 2, generator=g)
    labels = torch.tensor([[1, 0]] * r)
    labels[0] = torch.tensor([-1, -1])  # region 0 has no points
    xy = torch.rand(r, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.3], dim=1)
    masks = (torch.rand(r, 1, size, size, generator=g) > 0.7).float()
    return pts, labels, boxes, masks


@pytest.mark.parametrize("use", list(itertools.product([False, True], repeat=3)))
def test_every_prompt_combination_shapes(use):
    pts, labels, boxes, masks = _inputs()
    enc = PromptEncoder(PromptConfig(mask_hidden=8), D, PATCH)
    use_pts, use_box, use_mask = use
    sparse, dense = enc(R, 4, points=pts if use_pts else None,
                        point_labels=labels if use_pts else None,
                        boxes=boxes if use_box else None, masks=masks if use_mask else None)
    assert sparse.shape == (R, P * use_pts + 2 * use_box, D)
    assert dense.shape == (R, D, 4, 4)
    assert torch.isfinite(sparse).all() and torch.isfinite(dense).all()
    if not use_mask:  # absent mask: the learned no-mask embedding everywhere
        assert torch.allclose(dense, enc.no_mask.view(1, D, 1, 1).expand_as(dense))


def test_absent_slots_use_not_a_point_and_per_region_validity():
    pts, labels, boxes, masks = _inputs()
    enc = PromptEncoder(PromptConfig(mask_hidden=8), D, PATCH)
    box_valid = torch.tensor([True, False, True, True, True])
    mask_valid = torch.tensor([False, True, True, True, True])
    sparse, dense = enc(R, 4, pts, labels, boxes, box_valid, masks, mask_valid)
    nap = enc.not_a_point
    assert torch.allclose(sparse[0, 0], nap) and torch.allclose(sparse[0, 1], nap)  # no points
    assert torch.allclose(sparse[1, 2], nap) and torch.allclose(sparse[1, 3], nap)  # no box
    assert not torch.allclose(sparse[2, 2], nap)
    assert torch.allclose(dense[0], enc.no_mask.view(D, 1, 1).expand(D, 4, 4))
    assert not torch.allclose(dense[1], enc.no_mask.view(D, 1, 1).expand(D, 4, 4))


def test_positive_and_negative_points_differ_and_depend_on_position():
    enc = PromptEncoder(PromptConfig(), D, PATCH)
    xy = torch.tensor([[[0.2, 0.3]], [[0.2, 0.3]], [[0.8, 0.3]]])
    lab = torch.tensor([[1], [0], [1]])
    tok = enc.sparse(3, xy, lab)
    assert tok.shape == (3, 1, D)
    assert not torch.allclose(tok[0], tok[1])  # label type matters
    assert not torch.allclose(tok[0], tok[2])  # position matters (left vs right)


def test_drop_prompts_keeps_box_or_mask():
    labels = torch.ones(1000, 2, dtype=torch.long)
    lab, box_valid, mask_valid = drop_prompts(PromptConfig(drop_box=0.5, drop_mask=0.5),
                                              labels, torch.Generator().manual_seed(0))
    assert (box_valid | mask_valid).all()
    assert (lab == -1).any() and (lab == 1).any()


@pytest.mark.parametrize("use", [(True, True, True), (False, True, False), (False, False, True),
                                 (True, False, False)])
def test_roi_branch_shapes(use):
    use_pts, use_box, use_mask = use
    vit = VisionTransformer(ImageTowerConfig(image_size=64, width=D, depth=1, heads=2))
    roi = RoiBranch(RoiConfig(roi_size=32, layers=1), PromptConfig(mask_hidden=8), D, 2, PATCH)
    images = torch.randn(2, 1, 64, 64)
    tokens = vit(images)
    assert tokens.shape == (2, 1 + 16, D)
    pts, labels, boxes, masks = _inputs()
    r = {"index": torch.tensor([0, 0, 1, 1, 1]), "boxes": boxes}
    if use_pts:
        r.update(points=pts, point_labels=labels)
    if not use_box:
        r["box_valid"] = torch.zeros(R, dtype=torch.bool)
    if use_mask:
        r["masks"] = masks
    out = roi(vit, images, tokens, r)
    assert out.shape == (R, D) and torch.isfinite(out).all()
    out.sum().backward()
    assert vit.patch_embed.weight.grad is not None  # crops go through the shared ViT
