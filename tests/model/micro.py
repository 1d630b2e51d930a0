"""A micro model configuration and a word-level tokenizer for model unit tests (CPU, seconds)."""

from __future__ import annotations

import torch

S, K, P = 64, 2, 2  # image size, negatives per region, points per region
MICRO = {
    "image": {"image_size": S, "patch_size": 16, "width": 32, "depth": 1, "heads": 2},
    "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "max_len": 8},
    "prompt": {"points_per_region": P, "mask_hidden": 4},
    "roi": {"roi_size": 32, "layers": 1},
    "model": {"embed_dim": 16, "region_text_proj": True},
    "data": {"negatives_per_region": K},
    "loss": {"grounding_weight": 1.0},
}


class WordTokenizer:
    """Stand-in for the WordPiece tokenizer: one id per word of ``words``, [CLS]=1 first,
    padding 0."""

    def __init__(self, words: list[str]):
        self.ids = {w: i + 2 for i, w in enumerate(words)}

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[1] + [self.ids[w] for w in t.split()][: max_length - 1] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}
