"""Evaluation on the corpus's TEST split (held-out patients).

For each run (the region-aware one and, with ``--baseline``, the global-only ablation):

* ``region_zero_shot``: every test region is classified among the labels of the vocabulary
  with prompts "{laterality} {label}" (one per side the label has in the TRAIN split, embeddings
  averaged; phrased like the corpus's captions when it has stored ones, e.g. "lung nodule on
  the right"; see :func:`model.captions.prompter`) → accuracy, balanced accuracy (mean
  per-class recall), macro one-vs-rest AUC (softmax of 100·cosine); per class its support,
  correct count, AUC and ROC curve, and the confusion matrix (rows = truth), with the
  ``labels`` they are indexed by.
* ``laterality_zero_shot``: regions whose laterality is left or right, prompts
  "left {label}" vs "right {label}" with the region's TRUE label → the same three numbers;
  ``bilateral_labels`` repeats them on the labels that occur on both sides in the train split
  (e.g. nodules, masses), where the side cannot be guessed from the label.
* ``image_zero_shot``: multi-label (an image holds several structures); prompts are the label
  prompts and "slice showing {prompt}", averaged; decisions use the label-count oracle (an
  image with k labels predicts its top k) — see :func:`model.metrics.multi_label`.
* ``retrieval``: R@1/5/10 and the R@K curve (K = 1..50) for image→report, report→image,
  region→caption, caption→region, with the query and gallery counts. Galleries of texts are the
  DISTINCT texts of the split; a text query's relevant items are all images/regions carrying
  that exact text (templated corpora repeat captions).

Scores are never held as an (items × gallery) matrix: zero-shot scores are computed in blocks of
rows and one class column at a time, retrieval keeps a running top-k over gallery blocks
(:mod:`model.metrics`), on ``device``; memory beyond the embeddings stays flat in the gallery
size (``workflows/bench_evaluate.py``).

Texts compared with regions (region zero-shot and laterality prompts, captions) are embedded
with ``region=True``, texts compared with images with the default; a model with one text
projection (the global-only ablation, runs saved before ``region_text_proj``) embeds both alike.

Region embeddings: the region-aware model uses its ROI branch with the box, the mask and one
positive point as prompts; the global-only model mask-pools its final patch tokens
(:meth:`model.clip.RegionCLIP.pooled_regions`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from torch.utils.data import DataLoader

from model import captions as cap
from model import metrics
from model.checkpoint import load_run
from model.clip import RegionCLIP, flat_regions
from model.collate import Collate, to_device
from model.data import CorpusIndex, RegionCorpus


@torch.no_grad()
def embed_texts(model: RegionCLIP, tok, texts: list[str], max_len: int, device,
                chunk: int = 256, region: bool = False) -> np.ndarray:
    """Normalised text embeddings (T, E) for comparison with images, or with ``region`` with
    regions (:meth:`model.clip.RegionCLIP.encode_text`)."""
    out = []
    for i in range(0, len(texts), chunk):
        enc = tok(texts[i:i + chunk], padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        out.append(model.encode_text(enc["input_ids"].to(device),
                                     enc["attention_mask"].to(device), region).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.model.embed_dim), np.float32)


@torch.no_grad()
def embed_split(model: RegionCLIP, tok, corpus: CorpusIndex, split: str, device,
                batch: int = 32) -> dict:
    """Image and region embeddings of a split with their metadata."""
    cfg = model.cfg
    dcfg = dataclasses.replace(cfg.data, regions_per_image=10**6, workers=0)
    ds = RegionCorpus(corpus, split, dcfg, cfg.image.image_size,
                      points=cfg.prompt.points_per_region, train=False)
    collate = Collate(tok, cfg.text.max_len, dcfg.negatives_per_region,
                      cfg.prompt.points_per_region)
    loader = DataLoader(ds, batch_size=batch, collate_fn=collate, num_workers=0)
    img, reg = [], []
    meta: dict[str, list] = {}
    for b in loader:
        b = to_device(b, device)
        emb, tokens = model.encode_image(b["images"])
        img.append(emb.float().cpu())
        if b["region_valid"].any():
            r = flat_regions(b)
            pl = r["point_labels"].clone()
            pl[pl == 0] = -1  # evaluation prompt: box + mask + the positive point
            r.update(point_labels=pl, box_valid=torch.ones_like(r["index"], dtype=torch.bool),
                     mask_valid=torch.ones_like(r["index"], dtype=torch.bool))
            reg.append(model.encode_regions(b["images"], tokens, r).float().cpu())
        for k, v in b["meta"].items():
            meta.setdefault(k, []).extend(v)
    d = cfg.model.embed_dim
    return {"image": torch.cat(img).numpy() if img else np.zeros((0, d), np.float32),
            "region": torch.cat(reg).numpy() if reg else np.zeros((0, d), np.float32),
            **meta}


def _prompt_matrix(model, tok, groups: list[list[str]], max_len: int, device,
                   region: bool = False) -> np.ndarray:
    """Mean (re-normalised) embedding of each group of prompts → (C, E)."""
    flat = [t for g in groups for t in g]
    emb = embed_texts(model, tok, flat, max_len, device, region=region)
    out, i = [], 0
    for g in groups:
        m = emb[i:i + len(g)].mean(0)
        out.append(m / max(np.linalg.norm(m), 1e-8))
        i += len(g)
    return np.stack(out)


def zero_shot(model, tok, corpus: CorpusIndex, e: dict, device) -> dict:
    ml = model.cfg.text.max_len
    labels = corpus.labels
    groups = [cap.label_prompts(lab, corpus.sides.get(lab, []), corpus.prompt) for lab in labels]
    prompts = _prompt_matrix(model, tok, groups, ml, device, region=True)  # (C, E)
    idx = {lab: i for i, lab in enumerate(labels)}
    target = np.array([idx[x] for x in e["label"]], dtype=int)
    res = {"region_zero_shot": {"labels": list(labels), **metrics.single_label(
        metrics.EmbeddingScores(e["region"], prompts, device), target)}}
    img_groups = [g + [f"slice showing {p}" for p in g] for g in groups]
    img_prompts = _prompt_matrix(model, tok, img_groups, ml, device)
    pairs = [(i, idx[x]) for i, labs in enumerate(e["image_labels"]) for x in set(labs)]
    rows, cols = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    truth = sparse.csr_matrix((np.ones(len(rows), bool), (rows, cols)),
                              shape=(len(e["image"]), len(labels)))  # (images, labels)
    res["image_zero_shot"] = metrics.multi_label(
        metrics.EmbeddingScores(e["image"], img_prompts, device), truth)
    sided = [i for i, s in enumerate(e["laterality"]) if s in cap.SIDES]
    pairs = [[corpus.prompt(e["label"][i], "left"), corpus.prompt(e["label"][i], "right")]
             for i in sided]
    flat = embed_texts(model, tok, [t for p in pairs for t in p], ml, device, region=True)
    lat_scores = np.zeros((len(sided), 2), np.float32)
    if sided:
        lat_scores = np.einsum("ne,nke->nk", e["region"][sided], flat.reshape(len(sided), 2, -1))
    lat_target = np.array([cap.SIDES.index(e["laterality"][i]) for i in sided], dtype=int)
    res["laterality_zero_shot"] = {"labels": list(cap.SIDES),
                                   **metrics.single_label(lat_scores, lat_target)}
    # labels seen on BOTH sides in training: the side cannot be inferred from the label alone
    both = {lab for lab, s in corpus.sides.items() if {"left", "right"} <= set(s)}
    keep = np.array([e["label"][i] in both for i in sided], dtype=bool)
    res["laterality_zero_shot"]["bilateral_labels"] = {
        "labels": sorted(both), **metrics.single_label(lat_scores[keep], lat_target[keep])}
    return res


def retrieval(model, tok, e: dict, device) -> dict:
    ml = model.cfg.text.max_len
    out = {}
    for name, items, texts in [("image", e["image"], e["report"]),
                               ("region", e["region"], e["caption"])]:
        gallery = sorted(set(texts))
        pos = {t: i for i, t in enumerate(gallery)}
        temb = embed_texts(model, tok, gallery, ml, device, region=name == "region")
        key, text_key = np.array([pos[t] for t in texts], dtype=np.int64), np.arange(len(gallery))
        txt = "report" if name == "image" else "caption"
        out[f"{name}_to_{txt}"] = metrics.retrieval_recall(items, temb, key, text_key,
                                                           device=device)
        out[f"{txt}_to_{name}"] = metrics.retrieval_recall(temb, items, text_key, key,
                                                           device=device)
    return out


class NothingToEvaluate(ValueError):
    """The split holds no regions (e.g. a corpus built without test patients)."""


def evaluate_run(run: Path, corpus: CorpusIndex, device="cpu", split: str = "test") -> tuple[str, dict]:
    """(``region_aware`` | ``global_only``, metrics) of one run folder; :class:`NothingToEvaluate`
    when ``split`` has no regions."""
    model, tok, cfg = load_run(run, device)
    e = embed_split(model, tok, corpus, split, device)
    if len(e["region"]) == 0:
        raise NothingToEvaluate(split)
    res = zero_shot(model, tok, corpus, e, device)
    res["retrieval"] = retrieval(model, tok, e, device)
    res["run"] = str(run)
    res["n_images"], res["n_regions"] = int(len(e["image"])), int(len(e["region"]))
    return ("global_only" if cfg.model.global_only else "region_aware"), res
