"""A micro model configuration and a word-level tokenizer for model unit tests (CPU, seconds)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
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


def sample(rng: np.random.Generator, n_regions: int, i: int, caption: Callable[[], str],
           negatives: Callable[[], list[str]], text: Callable[[], str]) -> dict:
    """One dataset sample of ``n_regions`` random boxes (masks, two points each) on an S×S
    noise image; the texts drawn by the callables, in region order, then the image's text."""
    regions = []
    for j in range(n_regions):
        x0, y0 = rng.uniform(0, 0.6, 2)
        w, h = rng.uniform(0.15, 0.4, 2)
        mask = np.zeros((S, S), np.uint8)
        mask[int(y0 * S):int((y0 + h) * S) + 1, int(x0 * S):int((x0 + w) * S) + 1] = 1
        pts = np.array([[x0 + w / 2, y0 + h / 2, 1], [min(x0 + w + 0.05, 1), y0, 0]], np.float32)
        regions.append({"box": np.array([x0, y0, x0 + w, y0 + h], np.float32), "mask": mask,
                        "points": pts, "caption": caption(), "negatives": negatives(),
                        "region_id": f"r{i}.{j}", "label": "x", "laterality": "left"})
    t = text()
    return {"image": rng.integers(0, 256, (S, S), dtype=np.uint8), "regions": regions,
            "global_text": t, "image_id": f"i{i}", "summary": t, "report": t,
            "image_labels": [], "pos": (0, 0, i, 0, i)}
