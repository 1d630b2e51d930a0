"""Streaming the corpus's Parquet shards into training / evaluation batches.

* Reading: the committed shards the manifest lists (``pipeline.write.committed_tables``: never
  a glob, so compacted corpora read as built and uncommitted files are never read): each
  shard's images file row groups with pyarrow, its co-sharded regions file (none when the shard
  has no regions) joined by ``image_id``. Units of work are (shard, row group, part): every (rank, DataLoader worker) pair — global reader id ``g = rank·W + worker`` — reads
  the units ``u`` with ``u % (world·W) == g`` (a row group is split into interleaved parts when
  there are more readers than row groups), so no two readers share rows.
* Order: per epoch the reader's units are shuffled with ``(seed, epoch, g)`` and rows pass a
  shuffle buffer; the stream is infinite for training (epochs loop) and a single ordered pass
  for evaluation.
* Resume: each sample carries its position (reader, epoch, index within the reader's epoch,
  shard index, row offset). ``DataState`` keeps, per reader, the epoch and the count consumed;
  a resumed stream replays the reader's epoch without decoding and skips what was consumed.
  DataLoader workers deliver batches round-robin, so the resumed loader rotates reader ids
  (``rotate``) to continue with the reader that was next. Per-sample randomness (region
  subset, negatives, points, summary vs report) comes from ``(seed, epoch, g, index)``, so a
  resumed run sees exactly the batches of an uninterrupted one.
* Decoding in workers: PNG with cv2, padding to a square, resizing to the tower input; each
  region's COCO RLE → mask at the input resolution (uint8), box → normalised [0, 1] xyxy,
  one positive point inside the mask and one negative point outside it near the box.
* Captions: stored columns when present, else the documented fallback (:mod:`model.captions`).
  Tokenisation happens in :class:`model.collate.Collate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import IterableDataset, get_worker_info

from model import captions as cap
from model.config import DataConfig
from pipeline import storage
from pipeline.images.png import decode_png
from pipeline.write import REGIONS_SCHEMA, committed_tables

IMAGE_COLS = ["image_id", "patient_key", "split", "modality", "plane", "height", "width", "image"]
IMAGE_CAPTIONS = ["caption_summary", "caption_report"]
REGION_COLS = ["region_id", "image_id", "label", "bbox", "mask_rle", "laterality"]
REGION_CAPTIONS = ["caption_region", "negatives", "negative_kinds"]


def count_split_images(images_files, split: str) -> int:
    """Images of ``split`` in the committed images files (only their ``split`` column is read)."""
    return sum(pc.sum(pc.equal(pq.read_table(f, columns=["split"]).column("split"),
                               split)).as_py() or 0 for f in images_files)


def corpus_split_images(root, split: str) -> int:
    """:func:`count_split_images` of a corpus folder or URI, without building its index."""
    return count_split_images([t["images"] for t in committed_tables(storage.location(root))
                               .values() if "images" in t], split)


@dataclass
class CorpusIndex:
    """Committed shard files of a corpus and what the training needs to know about them."""

    root: Path
    shards: list[tuple[Path, Path | None]]  # (images file, regions file or None) per shard
    row_groups: list[int]
    image_captions: bool
    region_captions: bool
    labels: list[str] = field(default_factory=list)  # label vocabulary (all splits' names)
    sides: dict[str, list[str | None]] = field(default_factory=dict)  # label → lateralities
    caption_version: str | None = None  # vocabulary of the stored captions (None: fallback)
    _meta: dict | None = field(default=None, repr=False)  # Parquet footers of the images files

    @classmethod
    def open(cls, root: Path | str) -> CorpusIndex:
        root = storage.location(root)  # a folder, or an s3:// / gs:// corpus
        try:
            tables = committed_tables(root)
        except ValueError:
            raise ValueError(f"--corpus {root}: no manifest.json (not a corpus written by "
                             "build-corpus, or no shard committed yet)") from None
        shards = [(t["images"], t.get("regions")) for t in tables.values() if "images" in t]
        if not shards:
            raise ValueError(f"--corpus {root}: no committed images")
        rgs = [pq.ParquetFile(img).num_row_groups for img, _ in shards]
        img_cols = set(pq.read_schema(shards[0][0]).names)
        reg_files = [reg for _, reg in shards if reg is not None]
        reg_cols = set(pq.read_schema(reg_files[0]).names if reg_files else REGIONS_SCHEMA.names)
        c = cls(root, shards, rgs, all(x in img_cols for x in IMAGE_CAPTIONS),
                "caption_region" in reg_cols and "negatives" in reg_cols)
        sides: dict[str, set] = {}
        version_col = ["caption_version"] if "caption_version" in reg_cols else []
        for reg in reg_files:
            t = pq.read_table(reg, columns=["label", "laterality", "split"] + version_col)
            if version_col and c.caption_version is None:
                c.caption_version = next((v for v in t.column("caption_version").to_pylist()
                                          if v), None)
            for lab, lat, split in zip(*(t.column(k).to_pylist() for k in
                                         ("label", "laterality", "split")), strict=True):
                s = sides.setdefault(lab, set())
                if split == "train":
                    s.add(lat)
        c.labels = sorted(sides)
        c.sides = {k: sorted(v, key=str) for k, v in sides.items()}
        return c

    def split_images(self, split: str) -> int:
        """How many committed images ``split`` holds (:func:`count_split_images`)."""
        return count_split_images([img for img, _ in self.shards], split)

    def prompt(self, label: str, side: str | None) -> str:
        """Zero-shot prompt in the corpus's caption phrasing (:func:`captions.prompter`)."""
        return cap.prompter(self.caption_version if self.region_captions else None)(label, side)

    def units(self, split: str | None = None) -> list[tuple[int, int]]:
        """(shard, row group) pairs; with ``split``, only the row groups whose ``split`` column
        statistics allow rows of it (the others are never read)."""
        units = [(s, g) for s, n in enumerate(self.row_groups) for g in range(n)]
        if split is None:
            return units
        return [u for u in units if self._may_hold(u, split)]

    def _may_hold(self, unit: tuple[int, int], split: str) -> bool:
        if self._meta is None:
            self._meta = {}
        s, g = unit
        if s not in self._meta:
            self._meta[s] = pq.ParquetFile(self.shards[s][0]).metadata
        meta = self._meta[s]
        names = meta.schema.names
        if "split" not in names:
            return True
        st = meta.row_group(g).column(names.index("split")).statistics
        if st is None or not st.has_min_max:
            return True
        return st.min <= split <= st.max


@dataclass
class DataState:
    """Position of a reader: ``epoch`` and ``index`` (samples of that epoch already consumed)."""

    epoch: int = 0
    index: int = 0
    shard: int = -1  # shard index and row offset of the last consumed sample (information)
    row: int = -1


def reader_ids(world: int, rank: int, workers: int, worker: int, rotate: int) -> tuple[int, int]:
    """(global reader id, number of readers) of a physical DataLoader worker."""
    w = max(workers, 1)
    logical = (worker + rotate) % w
    return rank * w + logical, world * w


class RegionCorpus(IterableDataset):
    """Samples (dicts of numpy arrays and strings) of one split, see the module docstring."""

    def __init__(self, corpus: CorpusIndex, split: str, cfg: DataConfig, image_size: int,
                 points: int = 2, seed: int = 0, train: bool = True, rank: int = 0,
                 world: int = 1, start: dict[int, DataState] | None = None, rotate: int = 0):
        self.corpus, self.split, self.cfg, self.size = corpus, split, cfg, image_size
        self.points, self.seed, self.train = points, seed, train
        self.rank, self.world, self.start, self.rotate = rank, world, start or {}, rotate

    # -- raw rows ----------------------------------------------------------------------------
    def _regions_by_image(self, shard: int, cache: dict) -> dict[str, list[dict]]:
        """The shard's regions of this split by image id: the needed columns only, read and
        converted once per shard visit (rows of other splits are filtered on read)."""
        if shard not in cache:
            cache.clear()
            c = self.corpus
            regions = c.shards[shard][1]
            by_image: dict[str, list] = {}
            if regions is not None:
                cols = REGION_COLS + (REGION_CAPTIONS if c.region_captions else [])
                t = pq.read_table(regions, columns=cols, filters=[("split", "==", self.split)])
                for r in t.to_pylist():
                    by_image.setdefault(r["image_id"], []).append(r)
            cache[shard] = by_image
        return cache[shard]

    def _read_unit(self, shard: int, group: int, part: int, parts: int, regions_cache: dict):
        """Rows of this split and part in one images row group (read once, needed columns only;
        only the kept rows are converted to Python)."""
        c = self.corpus
        cols = IMAGE_COLS + (IMAGE_CAPTIONS if c.image_captions else [])
        pf = pq.ParquetFile(c.shards[shard][0])
        t = pf.read_row_group(group, columns=cols)
        base = sum(pf.metadata.row_group(i).num_rows for i in range(group))
        offsets = np.arange(base, base + t.num_rows)
        keep = pc.fill_null(pc.equal(t.column("split"), self.split), False)
        if parts > 1:
            keep = pc.and_(keep, pa.array(offsets % parts == part))
        kept = pc.indices_nonzero(keep).to_numpy()
        if len(kept) == 0:
            return
        by_image = self._regions_by_image(shard, regions_cache)
        rows = t.take(kept).to_pylist()
        for row, off in zip(rows, offsets[kept].tolist(), strict=True):
            row["regions"] = by_image.get(row["image_id"], [])
            row["shard"], row["row"] = shard, off
            yield row

    def _epoch_rows(self, g: int, readers: int, epoch: int):
        units = self.corpus.units(self.split)
        if not units:
            return
        parts = math.ceil(readers / len(units))
        virtual = [(s, grp, p) for (s, grp) in units for p in range(parts)]
        mine = [v for i, v in enumerate(virtual) if i % readers == g]
        rng = np.random.default_rng([self.seed, epoch, g])
        if self.train:  # shards in random order, each shard's units together in random order:
            order = {s: k for k, s in enumerate(rng.permutation(len(self.corpus.shards)))}
            mine = [mine[i] for i in rng.permutation(len(mine))]
            mine.sort(key=lambda v: order[v[0]])  # (each regions shard is read once per epoch)
        cache: dict = {}
        buf: list = []
        for s, grp, p in mine:
            for row in self._read_unit(s, grp, p, parts, cache):
                if not self.train:
                    yield row
                    continue
                if len(buf) < self.cfg.shuffle_buffer:
                    buf.append(row)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], row = row, buf[j]
                yield row
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        g, readers = reader_ids(self.world, self.rank, workers, worker, self.rotate)
        st = self.start.get(g, DataState())
        epoch = st.epoch
        while True:
            for index, row in enumerate(self._epoch_rows(g, readers, epoch)):
                if epoch == st.epoch and index < st.index:
                    continue  # replayed, not decoded
                rng = np.random.default_rng([self.seed, epoch, g, index, 1])
                sample = self.decode(row, rng)
                sample["pos"] = (g, epoch, index, row["shard"], row["row"])
                yield sample
            epoch += 1
            if not self.train:
                return

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, row: dict, rng: np.random.Generator) -> dict:
        """One sample: image (S, S) uint8, regions, captions."""
        img = decode_png(row)
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        h, w = img.shape
        side = max(h, w)
        oy, ox = (side - h) // 2, (side - w) // 2
        sq = np.zeros((side, side), np.uint8)
        sq[oy:oy + h, ox:ox + w] = img
        image = cv2.resize(sq, (self.size, self.size), interpolation=cv2.INTER_AREA)
        regions = [r for r in row["regions"] if r["bbox"] is not None]
        cap_n = self.cfg.regions_per_image
        if self.train and len(regions) > cap_n:
            regions = [regions[i] for i in sorted(rng.choice(len(regions), cap_n, replace=False))]
        out_regions = [self._region(r, (oy, ox, side), rng) for r in regions]
        labels = [r["label"] for r in row["regions"]]
        all_caps = [self._caption(r) for r in row["regions"]]
        summary = row.get("caption_summary") or cap.image_summary(labels, row["modality"],
                                                                   row["plane"])
        report = row.get("caption_report") or cap.image_report(all_caps, row["modality"],
                                                                row["plane"])
        mode = self.cfg.global_text
        if mode == "both":
            mode = "summary" if (not self.train or rng.random() < 0.5) else "report"
        return {"image": image, "image_id": row["image_id"], "summary": summary,
                "report": report, "global_text": summary if mode == "summary" else report,
                "image_labels": sorted(set(labels)), "regions": out_regions}

    def _caption(self, r: dict) -> str:
        return r.get("caption_region") or cap.region_caption(r["label"], r["laterality"])

    def _region(self, r: dict, pad: tuple[int, int, int], rng: np.random.Generator) -> dict:
        oy, ox, side = pad
        s = self.size
        rle = {"size": list(r["mask_rle"]["size"]), "counts": r["mask_rle"]["counts"].encode()}
        m = mask_utils.decode(rle)  # (H, W)
        bx, by, bw, bh = (int(v) for v in mask_utils.toBbox(rle))  # the mask's own extent
        inside = (by + oy, by + oy + bh, bx + ox, bx + ox + bw)  # rows, columns of ``sq``
        sq = np.zeros((side, side), np.uint8)
        sq[oy:oy + m.shape[0], ox:ox + m.shape[1]] = m
        mask = (cv2.resize(sq.astype(np.float32), (s, s), interpolation=cv2.INTER_AREA) > 0.25)
        x0, y0, x1, y1 = r["bbox"]
        box = np.array([(x0 + ox) / side, (y0 + oy) / side, (x1 + ox) / side, (y1 + oy) / side],
                       np.float32).clip(0, 1)
        negs = r.get("negatives")
        if not negs or len(negs) == 0:
            negs, _ = cap.fallback_negatives(r["region_id"], r["label"], r["laterality"],
                                             self.corpus.labels, max(3, self.cfg.negatives_per_region))
        k = self.cfg.negatives_per_region
        if self.train and len(negs) > k:
            negs = [negs[i] for i in sorted(rng.choice(len(negs), k, replace=False))]
        negs = (list(negs) * k)[:k] if len(negs) < k else list(negs[:k])
        return {"mask": mask.astype(np.uint8), "box": box, "caption": self._caption(r),
                "negatives": negs, "label": r["label"], "laterality": r["laterality"],
                "region_id": r["region_id"], "points": self._points(sq, box, side, rng, inside)}

    def _points(self, sq: np.ndarray, box: np.ndarray, side: int, rng: np.random.Generator,
                inside: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """(P, 3): x, y normalised and label (1 inside the mask, 0 outside, −1 none). ``inside``
        (row0, row1, col0, col1): the window of ``sq`` that holds every mask pixel (the mask's
        RLE bounding box): the same pixels in the same order as a scan of all of ``sq``."""
        pts = np.full((self.points, 3), -1.0, np.float32)
        r0, r1, c0, c1 = inside if inside is not None else (0, side, 0, side)
        ys, xs = np.nonzero(sq[r0:r1, c0:c1])
        ys, xs = ys + r0, xs + c0
        if self.points >= 1 and len(xs):
            i = int(rng.integers(len(xs))) if self.train else len(xs) // 2
            pts[0] = [(xs[i] + 0.5) / side, (ys[i] + 0.5) / side, 1]
        if self.points >= 2:
            x0, y0, x1, y1 = (box * side).tolist()
            pw, ph = (x1 - x0) * 0.5 + 2, (y1 - y0) * 0.5 + 2
            for _ in range(20):
                x = rng.uniform(max(0, x0 - pw), min(side, x1 + pw))
                y = rng.uniform(max(0, y0 - ph), min(side, y1 + ph))
                if not sq[min(int(y), side - 1), min(int(x), side - 1)]:
                    pts[1] = [x / side, y / side, 0]
                    break
        return pts


def states_from_batch(states: dict[int, DataState], positions) -> dict[int, DataState]:
    """Update per-reader states with the positions (g, epoch, index, shard, row) of a batch."""
    for g, epoch, index, shard, row in positions:
        st = states.get(int(g))
        if st is None or (epoch, index + 1) >= (st.epoch, st.index):
            states[int(g)] = DataState(int(epoch), int(index) + 1, int(shard), int(row))
    return states


def image_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S) → normalised float (B, 1, S, S)."""
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    return (x - 0.5) / 0.25
