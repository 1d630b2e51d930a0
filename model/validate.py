"""Validation during training (``TrainConfig.val_every``): loss terms and a cheap region
zero-shot accuracy on the val split, logged as rows with ``"split": "val"``.

Each rank reads its own share of the val split (the trainer's reader assignment) once, keeps up
to ``val_batches`` collated batches in memory and reuses them at every pass, so passes are
comparable. Losses are computed per rank without gathering across ranks (a rank whose share is
empty has no batch to match), then one all-reduce sums (loss · batches, batches, correct,
regions) over the ranks. Zero-shot: each region embedding (the ROI branch, or for the
global-only ablation the mask-pooled patch tokens) against one text embedding per label (the mean
of the label's prompts, :func:`model.captions.label_prompts`); top-1 accuracy over the regions.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from model import captions as cap
from model.clip import flat_regions
from model.collate import Collate, to_device
from model.config import RunConfig
from model.data import CorpusIndex, RegionCorpus
from model.loss import RegionClipLoss, local_loss


class Validator:
    def __init__(self, corpus: CorpusIndex, cfg: RunConfig, tok, rank: int, world: int,
                 device: torch.device, amp):
        self.corpus, self.cfg, self.tok, self.world = corpus, cfg, tok, world
        self.rank, self.device, self.amp = rank, device, amp
        self.loss_fn = RegionClipLoss(cfg.loss)
        self.collate = Collate(tok, cfg.text.max_len, cfg.data.negatives_per_region,
                               cfg.prompt.points_per_region)
        self.batches: list[dict] | None = None

    def _load(self) -> list[dict]:
        c = self.cfg
        ds = RegionCorpus(self.corpus, "val", c.data, c.image.image_size,
                          points=c.prompt.points_per_region, seed=c.train.seed, train=False,
                          rank=self.rank, world=self.world)
        loader = DataLoader(ds, batch_size=c.data.batch, collate_fn=self.collate, num_workers=0)
        return list(itertools.islice(loader, c.train.val_batches))

    def _label_embeddings(self, core) -> torch.Tensor:
        """(labels, E) normalised mean prompt embedding per label of the corpus vocabulary."""
        c = self.corpus
        rows = []
        for lab in c.labels:
            texts = cap.label_prompts(lab, c.sides.get(lab, []), c.prompt)
            enc = self.tok(texts, padding=True, truncation=True, max_length=self.cfg.text.max_len,
                           return_tensors="pt")
            emb = core.encode_text(enc["input_ids"].to(self.device),
                                   enc["attention_mask"].to(self.device), region=True)
            rows.append(F.normalize(emb.float().mean(0), dim=-1))
        return torch.stack(rows)

    def _regions(self, core, b: dict) -> torch.Tensor:
        _, tokens = core.encode_image(b["images"])
        return core.encode_regions(b["images"], tokens, flat_regions(b)).float()

    @torch.no_grad()
    def run(self, core, step: int, stage: int, log) -> dict:
        """One pass; writes the ``split: val`` row (rank 0) and returns it."""
        if self.batches is None:
            self.batches = self._load()
        core.eval()
        index = {lab: i for i, lab in enumerate(self.corpus.labels)}
        sums: dict[str, float] = {}
        correct = regions = 0.0
        with self.amp, local_loss():
            labels = self._label_embeddings(core) if index else None
            for batch in self.batches:
                b = to_device(batch, self.device)
                feats = core(b, want_global=True, want_region=not self.cfg.model.global_only)
                for k, v in self.loss_fn(feats).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                truth = [index.get(lab, -1) for lab in b["meta"]["label"]]
                if labels is not None and truth:
                    pred = (self._regions(core, b) @ labels.T).argmax(1).cpu()
                    correct += float((pred == torch.tensor(truth)).sum())
                    regions += len(truth)
        core.train()
        keys = ["global_loss"] + ([] if self.cfg.model.global_only
                                  else ["region_loss", "negative_loss"])
        m = self.cfg.model
        if not m.global_only and m.region_text_proj and self.cfg.loss.grounding_weight > 0:
            keys.append("grounding_loss")  # from the config: the same keys on every rank
        vec = torch.tensor([sums.get(k, 0.0) for k in keys]
                           + [float(len(self.batches)), correct, regions], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(vec)
        vals = vec.tolist()
        n, right, total = vals[len(keys):]
        if n == 0:  # no val rows on any rank (e.g. a corpus without val patients): no row
            return {}
        terms = {k: vals[i] / n for i, k in enumerate(keys)}
        return log.write(step, stage, terms, dict.fromkeys(terms, 1), split="val",
                         val_batches=int(n), val_regions=int(total),
                         zero_shot_region_acc=right / total if total else None)
