"""RegionMed-CLIP ROI branch with MedP-CLIP prompts.

For every region: a square crop around its box (context margin on each side) is resampled with
``roi_align`` to ``roi_size`` pixels and encoded by the SAME ViT as the global image, with the
mask prompt (the region's mask cropped the same way, downscaled by strided convolutions to the
crop's patch grid) ADDED to the patch embeddings → ROI tokens. The ROI processor then lets
[ROI tokens ; sparse prompt tokens (points and box in whole-image coordinates)] cross-attend to
the global image tokens of the region's image, so the region embedding keeps global context
(where in the body the region lies: laterality, neighbours). Keys/values of the global tokens are
computed once per image, not per region. Output: the processed ROI cls token (R, D).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from model.config import PromptConfig, RoiConfig
from model.image_tower import Attention, Mlp, VisionTransformer
from model.prompts import PromptEncoder


def crop_boxes(boxes: torch.Tensor, size: int, cfg: RoiConfig) -> torch.Tensor:
    """Square crop windows (R, 4) in input pixels around boxes (R, 4) normalised xyxy."""
    b = boxes * size
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    side = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * (1 + 2 * cfg.context)
    half = side.clamp(min=cfg.min_side_px) / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


def crop(images: torch.Tensor, index: torch.Tensor, windows: torch.Tensor, out: int) -> torch.Tensor:
    """Resample windows (R, 4) of images[index] (B, C, S, S) to (R, C, out, out)."""
    rois = torch.cat([index[:, None].to(windows.dtype), windows], dim=1)  # (R, 5)
    return roi_align(images, rois.to(images.dtype), output_size=out, spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)


class RoiBlock(nn.Module):
    """Cross-attention to the global tokens, self-attention among queries, MLP (pre-norm).

    Keys/values of the global tokens are computed once per IMAGE and indexed per region."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross = Attention(dim, heads)
        self.norm_s = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm_m = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4.0)

    def forward(self, q: torch.Tensor, ctx: torch.Tensor, index: torch.Tensor,
                first_only: bool = False) -> torch.Tensor:
        """q (R, Q, D), ctx (B, M, D) global tokens, index (R,) image of each region →
        (R, Q, D), or (R, 1, D) with ``first_only``: the self-attention and MLP of query 0
        alone (all queries still serve as its keys/values), for the last block, whose other
        rows nothing reads."""
        k, v = self.cross.kv_heads(self.norm_kv(ctx))  # (B, h, M, D/h)
        q = q + self.cross.attend(self.norm_q(q), k[index], v[index])
        s = self.norm_s(q)
        if first_only:
            q, s_q = q[:, :1], s[:, :1]
        else:
            s_q = s
        q = q + self.self_attn.attend(s_q, *self.self_attn.kv_heads(s))
        return q + self.mlp(self.norm_m(q))


class RoiProcessor(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(RoiBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, roi_tokens: torch.Tensor, prompt_tokens: torch.Tensor,
                global_tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """roi (R, 1 + n, D), prompts (R, P, D), global (B, 1 + N, D), index (R,) → (R, D)."""
        q = torch.cat([roi_tokens, prompt_tokens.to(roi_tokens.dtype)], dim=1)  # (R, Q, D)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            q = blk(q, global_tokens, index, first_only=i == last)
        return self.norm(q[:, 0])


class RoiBranch(nn.Module):
    """Prompt encoder + ROI processor; the ViT is passed in (shared with the global path)."""

    def __init__(self, roi_cfg: RoiConfig, prompt_cfg: PromptConfig, dim: int, heads: int,
                 patch_size: int):
        super().__init__()
        self.cfg = roi_cfg
        self.patch = patch_size
        if roi_cfg.roi_size % patch_size:
            raise ValueError(f"roi_size {roi_cfg.roi_size} is not a multiple of {patch_size}")
        self.prompts = PromptEncoder(prompt_cfg, dim, patch_size)
        self.processor = RoiProcessor(dim, heads, roi_cfg.layers)

    def forward(self, vit: VisionTransformer, images: torch.Tensor, image_tokens: torch.Tensor,
                r: dict[str, torch.Tensor]) -> torch.Tensor:
        """images (B, C, S, S), image_tokens (B, 1 + N, D), region tensors of R flat regions:
        ``index`` (R,) image of each region, ``boxes`` (R, 4) normalised, ``masks`` (R, 1, S, S),
        ``points`` (R, P, 2), ``point_labels`` (R, P), ``box_valid`` / ``mask_valid`` (R,)
        → region features (R, D)."""
        size, rs = images.shape[-1], self.cfg.roi_size
        n = r["index"].shape[0]
        windows = crop_boxes(r["boxes"], size, self.cfg)  # (R, 4) pixels
        roi_img = crop(images, r["index"], windows, rs)  # (R, C, rs, rs)
        masks = r.get("masks")
        roi_mask = None
        if masks is not None:
            own = torch.arange(n, device=masks.device)
            roi_mask = crop(masks.to(images.dtype), own, windows, rs)  # (R, 1, rs, rs)
        sparse, dense = self.prompts(
            n, rs // self.patch, r.get("points"), r.get("point_labels"), r.get("boxes"),
            r.get("box_valid"), roi_mask, r.get("mask_valid"))  # (R, P', D), (R, D, g', g')
        roi_tokens = vit(roi_img, dense=dense.to(roi_img.dtype))  # (R, 1 + g'², D)
        return self.processor(roi_tokens, sparse, image_tokens, r["index"])
