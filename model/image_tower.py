"""Vision Transformer image tower: patch embed, cls token, pos embed, pre-norm blocks.

The same tower encodes the global image and the ROI crops (RegionMed-CLIP): the position
embedding is bilinearly resized when the input grid differs from the preset's. Dense prompts
(MedP-CLIP masks) are added to the patch embeddings before the blocks.

The options ``pre_norm``, ``norm_eps`` and ``act`` let the tower compute exactly what an open_clip
or timm ViT computes, so their weights can be imported (``cfg.weights``, :mod:`model.pretrained`);
their defaults are the tower this project always had.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ImageTowerConfig
from model.pretrained import ImportReport, import_weights, read_weights, tower_options

log = logging.getLogger(__name__)


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x): the activation of OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
               "quick_gelu": QuickGELU}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"image.act {name}: unknown (have {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


class Attention(nn.Module):
    """Multi-head attention on (B, N, D) queries and (B, M, D) keys/values (SDPA kernel)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def kv_heads(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx (B, M, D) → k, v (B, h, M, D/h)."""
        b, m, d = ctx.shape
        k, v = self.kv(ctx).view(b, m, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) queries against precomputed k, v (B, h, M, D/h)."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, h, N, d/h)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # (B, h, N, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, *self.kv_heads(x if ctx is None else ctx))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float, act: str = "gelu"):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), activation(act), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float = 1e-5,
                 act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_ratio, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT returning the normalised token sequence (B, 1 + N, D): cls first, then patches."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, d))
        eps = cfg.norm_eps
        self.norm_pre = nn.LayerNorm(d, eps=eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, eps, cfg.act)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=eps)
        self.import_report: ImportReport | None = None  # set by build_image_tower on import
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def width(self) -> int:
        return self.cfg.width

    def pos_for(self, grid: int) -> torch.Tensor:
        """Position embedding (1, 1 + grid², D) for a grid × grid input (bilinear resize)."""
        if grid == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = self.grid
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bilinear",
                                  align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, images: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, S, S) → tokens (B, 1 + (S/p)², D); ``dense`` (B, D, S/p, S/p) is added
        to the patch embeddings (mask prompts)."""
        x = self.patch_embed(images)  # (B, D, g, g)
        grid = x.shape[-1]
        if dense is not None:
            x = x + dense
        x = x.flatten(2).transpose(1, 2)  # (B, g², D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_for(grid)  # (B, 1 + g², D)
        x = self.norm_pre(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_image_tower(cfg: ImageTowerConfig) -> VisionTransformer:
    """ViT from ``cfg``; ``cfg.weights`` (a local open_clip, timm or own state dict) is imported
    when set (:func:`model.pretrained.import_weights`: keys mapped, RGB filters to 1 channel,
    position embedding resampled to the preset's grid). ``cfg`` takes the tower options the file
    implies (``pre_norm``, ``norm_eps``), so the run's checkpoint rebuilds the same tower; the
    import report is logged and kept as ``tower.import_report``."""
    if not cfg.weights:
        return VisionTransformer(cfg)
    source = read_weights(cfg.weights, cfg)
    for name, value in tower_options(source).items():
        setattr(cfg, name, value)
    vit = VisionTransformer(cfg)
    report = import_weights(vit, source, cfg)
    vit.import_report = report
    log.info("image weights imported: %d tower keys matched, %d missing, %d zero-filled, "
             "%d file keys unexpected, %d outside the image tower", len(report.matched),
             len(report.missing), len(report.filled), len(report.unexpected), report.ignored)
    if report.missing:  # names in tower.import_report.missing
        log.warning("image weights: %d tower keys left at their initialisation",
                    len(report.missing))
    return vit
