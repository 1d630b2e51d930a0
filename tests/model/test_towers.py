"""The towers' CLS-only last layers compute exactly what the full layers would."""

from __future__ import annotations

import pytest
import torch

from model.config import TextTowerConfig
from model.roi import RoiProcessor
from model.text_tower import TextTower


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_text_tower_equals_bert_cls_output(layers):
    torch.manual_seed(0)
    tower = TextTower(TextTowerConfig(hidden=64, layers=layers, heads=2, intermediate=128), 300)
    ids = torch.randint(5, 300, (6, 12))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # padded rows: padding must not leak into the CLS feature
    mask[4, 2:] = 0
    ids[mask == 0] = 0
    ours = tower(ids, mask)
    full = tower.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    assert ours.shape == (6, 64)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    (ours * torch.randn_like(ours)).sum().backward()  # gradients reach the first layer
    grad = tower.bert.encoder.layer[0].intermediate.dense.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    ids2 = ids.clone()
    ids2[2, 7] = 17  # a padded position's token changes nothing
    torch.testing.assert_close(tower(ids2, mask)[2], ours[2].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_roi_processor_last_block_first_query_only(layers):
    torch.manual_seed(0)
    proc = RoiProcessor(32, 2, layers)
    roi, prompts = torch.randn(7, 5, 32), torch.randn(7, 4, 32)
    glob, index = torch.randn(3, 17, 32), torch.tensor([0, 0, 1, 2, 2, 2, 1])
    q = torch.cat([roi, prompts], 1)
    for blk in proc.blocks:  # every block on every query
        q = blk(q, glob, index)
    torch.testing.assert_close(proc(roi, prompts, glob, index), proc.norm(q[:, 0]))
