"""MedP-CLIP feature-level region prompts, encoded like SAM's prompt encoder.

* points (x, y in [0, 1] of the image, label 1 positive / 0 negative / -1 absent) and boxes
  (two corner points, each kind with its own learned type embedding) → random-Fourier
  positional encoding + type embedding → sparse prompt tokens (R, P + 2, D);
* masks → strided 2×2 convolutions down to the patch grid → dense prompt (R, D, g, g) that is
  ADDED to the patch embeddings; an absent mask contributes the learned ``no_mask`` embedding.

Any combination may be given; a missing kind is ``None`` (whole batch) or marked per region
(label -1 for points, ``box_valid`` False, ``mask_valid`` False). Absent point/box slots carry
the learned ``not_a_point`` embedding and no positional encoding, as in SAM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import PromptConfig

NEG, POS, CORNER0, CORNER1 = 0, 1, 2, 3


class RandomFourier(nn.Module):
    """Positional encoding of normalised coordinates with a fixed Gaussian projection."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("gauss", scale * torch.randn(2, dim // 2), persistent=True)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 2) in [0, 1] → (..., dim)."""
        c = (2 * coords - 1) @ self.gauss.to(coords.dtype)  # (..., dim/2)
        c = 2 * math.pi * c
        return torch.cat([torch.sin(c), torch.cos(c)], dim=-1)


class LayerNorm2d(nn.Module):
    def __init__(self, ch: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W), fused kernel
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PromptEncoder(nn.Module):
    def __init__(self, cfg: PromptConfig, dim: int, patch_size: int):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        self.pe = RandomFourier(dim)
        self.type_embed = nn.Embedding(4, dim)  # neg, pos, box corner 0, box corner 1
        self.not_a_point = nn.Parameter(torch.zeros(dim))
        self.no_mask = nn.Parameter(torch.zeros(dim))
        steps = max(1, int(round(math.log2(patch_size))))
        if 2**steps != patch_size:
            raise ValueError(f"patch size {patch_size}: mask prompts need a power of two")
        layers: list[nn.Module] = []
        ch_in = 1
        for _ in range(steps):
            layers += [nn.Conv2d(ch_in, cfg.mask_hidden, 2, 2), LayerNorm2d(cfg.mask_hidden),
                       nn.GELU()]
            ch_in = cfg.mask_hidden
        layers.append(nn.Conv2d(cfg.mask_hidden, dim, 1))
        self.mask_down = nn.Sequential(*layers)
        nn.init.normal_(self.type_embed.weight, std=0.02)
        nn.init.normal_(self.not_a_point, std=0.02)
        nn.init.normal_(self.no_mask, std=0.02)

    def _points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """coords (R, P, 2), labels (R, P) in {-1, 0, 1, 2, 3} → tokens (R, P, D)."""
        present = (labels >= 0).unsqueeze(-1)  # (R, P, 1)
        pe = self.pe(coords) * present  # (R, P, D)
        typ = self.type_embed(labels.clamp(min=0))  # (R, P, D)
        return torch.where(present, pe + typ, self.not_a_point.to(pe.dtype).expand_as(pe))

    def sparse(self, n: int, points: torch.Tensor | None = None,
               point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
               box_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Sparse prompt tokens (n, P + 2·[boxes given], D); (n, 0, D) when neither is given."""
        coords, labels = [], []
        if points is not None:
            coords.append(points)  # (R, P, 2)
            labels.append(point_labels.long())  # (R, P)
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)  # (R, 2, 2): (x0, y0), (x1, y1)
            lab = torch.tensor([CORNER0, CORNER1], device=boxes.device).expand(len(boxes), 2)
            if box_valid is not None:
                lab = torch.where(box_valid[:, None], lab, torch.full_like(lab, -1))
            coords.append(corners)
            labels.append(lab)
        if not coords:
            return self.not_a_point.new_zeros(n, 0, self.dim)
        return self._points(torch.cat(coords, 1), torch.cat(labels, 1))

    def dense(self, n: int, grid: int, masks: torch.Tensor | None = None,
              mask_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Dense prompt (n, D, grid, grid) from masks (n, 1, grid·p, grid·p) in [0, 1]."""
        no_mask = self.no_mask.view(1, -1, 1, 1).expand(n, -1, grid, grid)
        if masks is None:
            return no_mask
        emb = self.mask_down(masks.to(self.no_mask.dtype))  # (n, D, grid, grid)
        if mask_valid is None:
            return emb
        return torch.where(mask_valid.view(-1, 1, 1, 1), emb, no_mask)

    def forward(self, n: int, grid: int, points=None, point_labels=None, boxes=None,
                box_valid=None, masks=None, mask_valid=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse (n, P', D), dense (n, D, grid, grid))."""
        sparse = self.sparse(n, points, point_labels, boxes, box_valid)
        return sparse, self.dense(n, grid, masks, mask_valid)


def drop_prompts(cfg: PromptConfig, point_labels: torch.Tensor, generator: torch.Generator | None
                 = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-time prompt dropout: (point_labels with dropped rows −1, box_valid, mask_valid),
    each kind dropped per region with its probability; a region keeps at least its box or mask."""
    r = point_labels.shape[0]
    dev = point_labels.device
    u = torch.rand(r, 3, generator=generator).to(dev)
    keep_pts = u[:, 0] >= cfg.drop_points
    box_valid = u[:, 1] >= cfg.drop_box
    mask_valid = u[:, 2] >= cfg.drop_mask
    box_valid = box_valid | ~mask_valid  # never drop both box and mask
    labels = torch.where(keep_pts[:, None], point_labels, torch.full_like(point_labels, -1))
    return labels, box_valid, mask_valid
