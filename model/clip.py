"""The region-aware CLIP, assembled from parts (segment-anything style).

Parts are built first (image tower, text tower, ROI branch with its prompt encoder) and handed to
:class:`RegionCLIP`; ``model_registry[preset](vocab_size)`` builds a preset by name, and
:func:`build_model` builds any :class:`RunConfig`. ``forward`` returns named features (a dict):

========================  ==========  ======================================================
key                       shape       meaning
========================  ==========  ======================================================
image_features            (B, E)      L2-normalised image embeddings
text_features             (B, E)      each image's report/summary (``want_global``)
global_keys               (B,)        caption hash: equal captions are equal positives
region_features           (R, E)      valid regions, flattened row-major (``want_region``)
region_text_features      (R, E)      each region's caption (``region_text_proj`` when present)
negative_features         (R, K, E)   each region's hard-negative captions (the same projection)
region_keys / negative_keys (R,) / (R, K)
caption_image_features    (R, E)      each region's caption through ``text_proj`` (image space)
region_image_features     (R, E)      the image embedding of each region's image
region_image_keys         (R,)        its image's key (regions of one image share it)
logit_scale, region_logit_scale  ()   exp(learned temperature), clamped at ``max_logit_scale``
logit_bias                ()          SigLIP bias (``siglip`` only)
========================  ==========  ======================================================

Global-only ablation (``ModelConfig.global_only``): no prompt encoder or ROI branch; region
embeddings for evaluation are the mask-pooled final patch tokens of the global image through the
image projection (:meth:`RegionCLIP.pooled_regions`), falling back to the image embedding when a
mask covers no patch.

Two text projections (``ModelConfig.region_text_proj``): region captions go through
``region_text_proj``, reports and summaries through ``text_proj``; the text tower below them is
shared. With one projection the region losses pulled short label phrases ("the left kidney")
into region space, where the image embeddings do not look, and image zero-shot fell below the
global-only ablation (docs/benchmarks.md, issue 20). ``encode_text(..., region=True)`` embeds a
text for comparison with region embeddings, the default for comparison with image embeddings.
The short region captions can reach image space through the ``caption_image_*`` features
(``grounding_loss`` in :mod:`model.loss`, ``loss.grounding_weight`` > 0): measured on 10
held-out patients it costs image↔report retrieval more than it gives zero-shot, so the presets
leave it off (docs/benchmarks.md, issue 20).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import PRESET_DIR, RunConfig, load_preset
from model.image_tower import VisionTransformer, build_image_tower
from model.prompts import drop_prompts
from model.roi import RoiBranch
from model.text_tower import TextTower, build_text_tower

TEXT_BUCKET = 64  # distinct texts per length bucket in :meth:`RegionCLIP._texts`


class RegionCLIP(nn.Module):
    def __init__(self, cfg: RunConfig, image_tower: VisionTransformer, text_tower: TextTower,
                 roi_branch: RoiBranch | None):
        super().__init__()
        self.cfg = cfg
        e = cfg.model.embed_dim
        self.visual = image_tower
        self.text = text_tower
        self.roi = roi_branch
        self.image_proj = nn.Linear(image_tower.width, e, bias=False)
        self.text_proj = nn.Linear(text_tower.width, e, bias=False)
        self.region_proj = nn.Linear(image_tower.width, e, bias=False) if roi_branch else None
        self.region_text_proj = nn.Linear(text_tower.width, e, bias=False) \
            if roi_branch and cfg.model.region_text_proj else None
        init = cfg.model.init_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.region_logit_scale = nn.Parameter(torch.tensor(init))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.model.init_logit_bias)) \
            if cfg.model.siglip else None
        for proj in (self.image_proj, self.text_proj, self.region_proj, self.region_text_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)

    # -- encoders -----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, S, S) → (normalised embeddings (B, E), tokens (B, 1 + N, D))."""
        tokens = self.visual(images)
        return F.normalize(self.image_proj(tokens[:, 0]), dim=-1), tokens

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, region: bool = False
                    ) -> torch.Tensor:
        """ids, mask (T, L) → normalised embeddings (T, E) in image space, or with ``region``
        in region space (``region_text_proj``; models without one have a single space)."""
        proj = self.region_text_proj if region and self.region_text_proj is not None \
            else self.text_proj
        return F.normalize(proj(self.text(ids, mask)), dim=-1)

    def encode_regions(self, images: torch.Tensor, tokens: torch.Tensor,
                       regions: dict[str, torch.Tensor]) -> torch.Tensor:
        """Region embeddings (R, E) through the ROI branch (see :mod:`model.roi`)."""
        if self.roi is None:
            return self.pooled_regions(tokens, regions)
        return F.normalize(self.region_proj(self.roi(self.visual, images, tokens, regions)), dim=-1)

    def pooled_regions(self, tokens: torch.Tensor, regions: dict[str, torch.Tensor]) -> torch.Tensor:
        """Global-only region embedding: mask-average of patch tokens (R, E)."""
        b, n1, d = tokens.shape
        g = int(math.isqrt(n1 - 1))
        m = F.adaptive_avg_pool2d(regions["masks"].float(), g).flatten(1)  # (R, g²)
        patches = tokens[regions["index"], 1:]  # (R, g², D)
        w = m / m.sum(1, keepdim=True).clamp(min=1e-6)
        pooled = torch.einsum("rn,rnd->rd", w.to(patches.dtype), patches)
        empty = (m.sum(1) <= 0)[:, None]
        pooled = torch.where(empty, tokens[regions["index"], 0], pooled)
        return F.normalize(self.image_proj(pooled), dim=-1)

    def scales(self) -> dict[str, torch.Tensor]:
        mx = math.log(self.cfg.model.max_logit_scale)
        out = {"logit_scale": self.logit_scale.clamp(max=mx).exp(),
               "region_logit_scale": self.region_logit_scale.clamp(max=mx).exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    # -- training forward -------------------------------------------------------------------
    def forward(self, batch: dict, want_global: bool = True, want_region: bool = True) -> dict:
        images = batch["images"]
        want_region = want_region and self.roi is not None
        img_emb, tokens = self.encode_image(images)
        out: dict[str, torch.Tensor] = {"image_features": img_emb, **self.scales()}
        if want_global:
            out["text_features"] = self._texts(batch, batch["global_text"],
                                               _host(batch, "global_text"))
            out["global_keys"] = batch["global_key"]
        if want_region:
            regions = flat_regions(batch)
            if self.training:
                labels, box_valid, mask_valid = drop_prompts(self.cfg.prompt, regions["point_labels"])
                regions.update(point_labels=labels, box_valid=box_valid, mask_valid=mask_valid)
            r, k = regions["neg_text"].shape
            host = _host(batch, "region_text")
            if host is not None:  # the same indices, from the collated batch's CPU copies
                valid = batch["host"]["region_valid"]
                host = torch.cat([host[valid], batch["host"]["neg_text"][valid].flatten()])
            text = self._texts(batch, torch.cat([regions["text"], regions["neg_text"].flatten()]),
                               host, region=True)
            out["region_features"] = self.encode_regions(images, tokens, regions)
            out["region_text_features"] = text[:r]
            out["negative_features"] = text[r:].view(r, k, text.shape[-1])  # R may be 0
            out["region_keys"] = regions["key"]
            out["negative_keys"] = regions["neg_key"]
            if want_global and self.region_text_proj is not None \
                    and self.cfg.loss.grounding_weight > 0:
                out.update(self._grounding(batch, regions, img_emb))
        return out

    def _grounding(self, batch: dict, regions: dict, img_emb: torch.Tensor) -> dict:
        """Region captions in image space, paired with their images' embeddings."""
        host = _host(batch, "region_text")
        if host is not None:
            host = host[batch["host"]["region_valid"]]
        return {"caption_image_features": self._texts(batch, regions["text"], host),
                "region_image_features": img_emb[regions["index"]],
                "region_image_keys": batch["image_key"][regions["index"]]}

    def _texts(self, batch: dict, idx: torch.Tensor, host: torch.Tensor | None = None,
               region: bool = False) -> torch.Tensor:
        """Embeddings (len(idx), E) of batch texts ``idx``: each distinct text encoded once, in
        length-sorted buckets of about ``TEXT_BUCKET`` texts, each trimmed to its own longest
        text (short region captions do not pay for the long reports' padding). With ``host``
        (``idx`` on the CPU, and the batch's CPU ``host["text_len"]``) the buckets are planned
        on the host: no device → host copy. ``region``: see :meth:`encode_text`."""
        if host is not None:
            uniq, inverse = torch.unique(host, return_inverse=True)
            lengths = batch["host"]["text_len"][uniq]
        else:
            uniq, inverse = torch.unique(idx, return_inverse=True)
            lengths = batch["text_mask"][uniq].sum(1)
        order = torch.argsort(lengths, stable=True)
        dev = idx.device
        parts = []
        for chunk in torch.tensor_split(order, max(1, -(-len(order) // TEXT_BUCKET))):
            n = max(1, int(lengths[chunk].max())) if len(chunk) else 1
            rows = uniq[chunk].to(dev, non_blocking=True)
            parts.append(self.encode_text(batch["text_ids"][rows, :n],
                                          batch["text_mask"][rows, :n], region))
        emb = torch.cat(parts)[torch.argsort(order).to(dev)]  # back to ``uniq`` order
        return emb[inverse.to(dev)]


def _host(batch: dict, key: str) -> torch.Tensor | None:
    """The CPU copy of ``batch[key]`` that :class:`model.collate.Collate` keeps, if any."""
    host = batch.get("host")
    return None if host is None else host.get(key)


def flat_regions(batch: dict) -> dict[str, torch.Tensor]:
    """Valid regions of a collated batch, flattened row-major: index (R,), boxes (R, 4), ..."""
    valid = batch["region_valid"]  # (B, Rm)
    index = valid.nonzero()[:, 0]  # (R,)
    out = {"index": index, "boxes": batch["boxes"][valid], "points": batch["points"][valid],
           "point_labels": batch["point_labels"][valid],
           "masks": batch["masks"][valid].unsqueeze(1).float(),  # (R, 1, S, S)
           "text": batch["region_text"][valid], "key": batch["region_key"][valid],
           "neg_text": batch["neg_text"][valid], "neg_key": batch["neg_key"][valid]}
    return out


def build_model(cfg: RunConfig, vocab_size: int) -> RegionCLIP:
    """Build the parts of ``cfg`` and hand them to the whole."""
    vit = build_image_tower(cfg.image)
    text = build_text_tower(cfg.text, vocab_size)
    roi = None
    if not cfg.model.global_only:
        roi = RoiBranch(cfg.roi, cfg.prompt, cfg.image.width, cfg.image.heads,
                        cfg.image.patch_size)
    return RegionCLIP(cfg, vit, text, roi)


def _build_preset(name: str, vocab_size: int, global_only: bool = False) -> RegionCLIP:
    cfg = load_preset(name)
    cfg.model.global_only = global_only
    return build_model(cfg, vocab_size)


model_registry = {p.stem: functools.partial(_build_preset, p.stem)
                  for p in sorted(PRESET_DIR.glob("*.json"))}
