"""Collation: pad a variable number of regions per image, tokenise each distinct text once.

Batch layout (B images, Rm = most regions of an image in the batch, K negatives, P points,
U distinct texts, L tokens):

==================  ================  ===============================================
images              (B, 1, S, S)      normalised float
region_valid        (B, Rm) bool      padding mask of the regions
boxes               (B, Rm, 4)        normalised xyxy
masks               (B, Rm, S, S)     uint8 at the input resolution
points              (B, Rm, P, 2)     normalised xy; point_labels (B, Rm, P): 1/0/−1
text_ids/text_mask  (U, L)            every distinct caption of the batch, tokenised once
global_text         (B,)              index into the U texts; region_text (B, Rm);
neg_text            (B, Rm, K)        negatives; *_key: hashes of the caption texts
image_key           (B,)              hash of the image id (equal images, equal keys)
meta                dict of lists     ids, labels, lateralities, captions (evaluation)
pos                 list of tuples    data positions (reader, epoch, index, shard, row)
host                dict of tensors   CPU copies of the text indices, region_valid and
                                      text_len (U,): text buckets are planned on the host
==================  ================  ===============================================
"""

from __future__ import annotations

import numpy as np
import torch

from model.captions import text_key
from model.data import image_tensor


class Collate:
    def __init__(self, tokenizer, max_len: int, negatives: int, points: int):
        self.tok, self.max_len, self.k, self.p = tokenizer, max_len, negatives, points

    def __call__(self, samples: list[dict]) -> dict:
        b = len(samples)
        rm = max(1, max(len(s["regions"]) for s in samples))
        size = samples[0]["image"].shape[-1]
        texts: dict[str, int] = {}

        def tid(t: str) -> int:
            return texts.setdefault(t, len(texts))

        valid = torch.zeros(b, rm, dtype=torch.bool)
        boxes = torch.zeros(b, rm, 4)
        masks = torch.zeros(b, rm, size, size, dtype=torch.uint8)
        points = torch.zeros(b, rm, self.p, 2)
        plabels = torch.full((b, rm, self.p), -1, dtype=torch.long)
        rtext = torch.zeros(b, rm, dtype=torch.long)
        ntext = torch.zeros(b, rm, self.k, dtype=torch.long)
        gtext = torch.tensor([tid(s["global_text"]) for s in samples])
        meta = {k: [] for k in ("image_id", "summary", "report", "image_labels", "region_id",
                                "label", "laterality", "caption")}
        for i, s in enumerate(samples):
            for k in ("image_id", "summary", "report", "image_labels"):
                meta[k].append(s[k])
            for j, r in enumerate(s["regions"]):
                valid[i, j] = True
                boxes[i, j] = torch.from_numpy(r["box"])
                masks[i, j] = torch.from_numpy(r["mask"])
                pts = torch.from_numpy(r["points"][: self.p])
                points[i, j, : len(pts)] = pts[:, :2]
                plabels[i, j, : len(pts)] = pts[:, 2].long()
                rtext[i, j] = tid(r["caption"])
                ntext[i, j] = torch.tensor([tid(t) for t in r["negatives"][: self.k]])
                for k in ("region_id", "label", "laterality", "caption"):
                    meta[k].append(r[k])
        uniq = list(texts)
        enc = self.tok(uniq, padding=True, truncation=True, max_length=self.max_len,
                       return_tensors="pt")
        keys = torch.tensor([text_key(t) for t in uniq], dtype=torch.long)
        return {
            "images": image_tensor(np.stack([s["image"] for s in samples])),
            "region_valid": valid, "boxes": boxes, "masks": masks, "points": points,
            "point_labels": plabels, "text_ids": enc["input_ids"],
            "text_mask": enc["attention_mask"], "global_text": gtext,
            "global_key": keys[gtext], "region_text": rtext, "region_key": keys[rtext],
            "neg_text": ntext, "neg_key": keys[ntext], "meta": meta,
            "image_key": torch.tensor([text_key(s["image_id"]) for s in samples],
                                      dtype=torch.long),
            "pos": [s["pos"] for s in samples], "texts": uniq,
            "host": {"global_text": gtext, "region_text": rtext, "neg_text": ntext,
                     "region_valid": valid, "text_len": enc["attention_mask"].sum(1)},
        }


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
