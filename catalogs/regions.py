"""Regions as arrays: one region with its image, mask, box and crop (:class:`Region`), and a
torch map-style dataset over regions for users who bring their own model (:class:`RegionDataset`).

Frames (docs/schema.md): every array is in the pixel grid of the stored 2D image, (H, W) =
(rows, columns); pixel (c, r) covers [c, c+1) × [r, r+1), so a box is XYXY in *pixel-edge*
coordinates (a region spanning columns 10..20 has x0 = 10, x1 = 21). A crop is a plain slice of
the image: ``crop == image[y0:y0 + h, x0:x0 + w]`` with ``(x0, y0) = crop_origin``.

Reading: the region rows come from a Polars scan of the committed ``regions`` files; the pixels
from a scan of the committed ``images`` files that reads only ``image_id`` and the PNG bytes of
the wanted ``image_id`` s (projection and filter pushdown, :func:`fetch_pngs`). Nothing globs a
table folder (``pipeline.write.committed_files`` via :class:`catalogs.corpus.Corpus`).

    >>> c = Corpus.open("data/corpus")
    >>> r = c.region("3f2a...")                 # Region: r.image, r.mask, r.box, r.crop, ...
    >>> for r in c.iter_regions(where="label = 'liver'", split="test", limit=10): ...
    >>> loader = DataLoader(RegionDataset(c, size=224), batch_size=32, num_workers=2,
    ...                     collate_fn=collate_regions)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalogs.base import PIXEL_COLUMN, CorpusError
from pipeline.geometry import decode_rle
from pipeline.images.png import decode_png_bytes as decode_stored_png


class CorpusReader(Protocol):
    """What this module uses of :class:`catalogs.corpus.Corpus` (which calls into it, so it
    is not imported here): committed files, lazy tables and the SQL filter."""

    def files(self, table: str) -> list: ...

    def table(self, name: str, *, with_pixels: bool = False) -> pl.LazyFrame: ...

    def filter(self, where: str, table: str = "regions_with_images") -> pl.LazyFrame: ...


MARGIN_PX = 8          # default margin grown around the box for Region.crop, pixels
CHUNK_REGIONS = 256    # regions whose images are fetched by one images scan in iter_regions
# Region columns RegionDataset keeps in memory (the rest is never read by it).
DATASET_COLUMNS = ("region_id", "image_id", "label", "bbox", "mask_rle", "caption_region")


@dataclass(frozen=True)
class Region:
    """One region of a corpus with its pixels. All arrays are in the stored image's frame.

    * ``row``: dict of the region's columns (the ``regions`` table: region_id, image_id,
      label, bbox, mask_rle, area_mm2, caption_region, ...), as Python values.
    * ``image``: (H, W) uint8 or uint16 (the PNG's bit depth, ``images.bits``), as stored.
    * ``mask``: (H, W) bool, decoded from ``mask_rle``; all False when ``mask_rle`` is null
      (boxes-only regions, ``--segmenter none``), which ``mask_known=False`` says.
    * ``box``: (4,) float32 XYXY, pixel-edge coordinates of the image (``row["bbox"]``).
    * ``crop``: (h, w) same dtype as ``image``, the image cut to the box grown by
      ``margin_px`` on each side and clipped to the image; ``crop_mask``: (h, w) bool, the
      mask cut the same way; ``crop_origin``: (x0, y0) int, the crop's top-left pixel in the
      image (a point (x, y) of the image is (x - x0, y - y0) in the crop).
    """

    row: dict
    image: np.ndarray
    mask: np.ndarray
    mask_known: bool
    box: np.ndarray
    crop: np.ndarray
    crop_mask: np.ndarray
    crop_origin: tuple[int, int]

    @property
    def region_id(self) -> str:
        return self.row["region_id"]


# -- pure helpers -----------------------------------------------------------------------------


def crop_window(box: np.ndarray, shape: tuple[int, int],
                margin_px: int = MARGIN_PX) -> tuple[int, int, int, int]:
    """Integer window (x0, y0, x1, y1), pixel-edge, of an XYXY pixel-edge ``box`` (4,) grown by
    ``margin_px`` on each side and clipped to an image of ``shape`` (H, W); ``x1 - x0`` and
    ``y1 - y0`` are >= 0 (0 for a box wholly outside the image)."""
    if margin_px < 0:
        raise ValueError(f"margin_px must be >= 0, got {margin_px}")
    h, w = shape
    x0 = min(max(math.floor(box[0]) - margin_px, 0), w)
    y0 = min(max(math.floor(box[1]) - margin_px, 0), h)
    x1 = max(min(math.ceil(box[2]) + margin_px, w), x0)
    y1 = max(min(math.ceil(box[3]) + margin_px, h), y0)
    return x0, y0, x1, y1


def region_mask(row: dict, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """((H, W) bool mask, known) of a region row on an image of ``shape`` (H, W): decoded from
    ``mask_rle``, or all False and ``known=False`` when it is null. Raises CorpusError when the
    RLE's size is not the image's."""
    rle = row.get("mask_rle")
    if rle is None:
        return np.zeros(shape, bool), False
    if tuple(rle["size"]) != tuple(shape):
        raise CorpusError(f"region {row.get('region_id')}: mask_rle size {list(rle['size'])} "
                          f"is not the image's {list(shape)}")
    return decode_rle(rle), True


def make_region(row: dict, image: np.ndarray, margin_px: int = MARGIN_PX) -> Region:
    """:class:`Region` of a region ``row`` on its decoded (H, W) ``image``."""
    mask, known = region_mask(row, image.shape)
    box = np.asarray(row["bbox"], np.float32).reshape(4)
    x0, y0, x1, y1 = crop_window(box, image.shape, margin_px)
    return Region(row=row, image=image, mask=mask, mask_known=known, box=box,
                  crop=image[y0:y1, x0:x1], crop_mask=mask[y0:y1, x0:x1], crop_origin=(x0, y0))


def decode_png_bytes(data: bytes) -> np.ndarray:
    """(H, W) uint8/uint16 pixels of PNG bytes (``images.image.bytes``), as stored."""
    img = decode_stored_png(data)
    if img is None or img.ndim != 2:
        raise CorpusError("an images row holds bytes that are not a greyscale PNG")
    return img


# -- reading ----------------------------------------------------------------------------------


def fetch_pngs(images: pl.LazyFrame, image_ids: Iterable[str]) -> dict[str, bytes]:
    """{image_id: PNG bytes} for ``image_ids`` from ``images`` (a scan *with* pixels, e.g.
    ``Corpus.table("images", with_pixels=True)``): one scan reading ``image_id`` and
    ``image.bytes`` only, filtered on ``image_id`` in the scan."""
    ids = sorted(set(image_ids))
    if not ids:
        return {}
    df = (images.select("image_id", pl.col("image").struct.field("bytes").alias("png"))
          .filter(pl.col("image_id").is_in(pl.Series(ids, dtype=pl.String).implode()))
          .collect())
    return dict(zip(df.get_column("image_id").to_list(), df.get_column("png").to_list(),
                    strict=True))


def region_rows(corpus: CorpusReader, where: str | None = None, split: str | None = None,
                limit: int | None = None) -> pl.LazyFrame:
    """Lazy regions-table rows (regions columns only) matching ``where`` (the SQL filter of
    :meth:`Corpus.filter`, over regions + image columns) and ``split``, at most ``limit``, in
    corpus order (committed shards in name order, rows in file order)."""
    if limit is not None and limit < 0:
        raise CorpusError(f"limit must be >= 0, got {limit}")
    lf = corpus.table("regions")
    cols = lf.collect_schema().names()
    if where:
        lf = corpus.filter(where).select(cols)
    if split is not None:
        lf = lf.filter(pl.col("split") == split)
    return lf if limit is None else lf.head(limit)


def iter_region_objects(corpus: CorpusReader, rows: pl.LazyFrame, margin_px: int = MARGIN_PX,
                        chunk: int = CHUNK_REGIONS) -> Iterator[Region]:
    """:class:`Region` per row of ``rows`` (a lazy frame of region rows), in order. Images are
    fetched by one images scan per ``chunk`` rows and decoded once per run of consecutive
    regions on the same image (regions are co-sharded with, and written after, their image, so
    corpus order keeps an image's regions together)."""
    images = corpus.table("images", with_pixels=True)
    df = rows.collect()
    last_id, last_img, last_png = None, None, None
    for start in range(0, df.height, chunk):
        part = df.slice(start, chunk).to_dicts()
        pngs = fetch_pngs(images, {r["image_id"] for r in part} - {last_id})
        if last_id is not None:  # it may come back in this chunk after another image
            pngs[last_id] = last_png
        for row in part:
            if row["image_id"] != last_id:
                if row["image_id"] not in pngs:
                    raise CorpusError(f"region {row['region_id']}: image {row['image_id']} "
                                      "is not in the committed images files")
                last_id, last_png = row["image_id"], pngs[row["image_id"]]
                last_img = decode_png_bytes(last_png)
            yield make_region(row, last_img, margin_px)


def load_region(corpus: CorpusReader, region_id: str, margin_px: int = MARGIN_PX) -> Region:
    """The :class:`Region` ``region_id``; KeyError when no committed region has it."""
    rows = corpus.table("regions").filter(pl.col("region_id") == region_id).head(2).collect()
    if rows.height == 0:
        raise KeyError(f"no committed region {region_id!r}")
    return next(iter_region_objects(corpus, rows.head(1).lazy(), margin_px))


# -- torch ------------------------------------------------------------------------------------


def letterbox(img: np.ndarray, size: int, interpolation: int) -> tuple[np.ndarray, float, float]:
    """(size, size) copy of an (h, w) ``img`` resized with its aspect kept (longest side =
    ``size``) and zero-padded at the bottom and right; returns (out, sx, sy), the x and y scales
    (a point (x, y) of ``img`` is (x·sx, y·sy) in ``out``). An empty ``img`` gives zeros."""
    h, w = img.shape
    out = np.zeros((size, size), img.dtype)
    if h == 0 or w == 0:
        return out, 0.0, 0.0
    scale = size / max(h, w)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    out[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=interpolation)
    return out, nw / w, nh / h


class RegionDataset:
    """Map-style torch dataset (``__len__``/``__getitem__``, for ``torch.utils.data.DataLoader``)
    of the regions matching ``where`` (SQL filter of :meth:`Corpus.filter`) and ``split``.

    Item ``i`` (regions in corpus order) is a dict:

    * ``crop``: (1, size, size) float32 in [0, 1] — :attr:`Region.crop` (margin ``margin_px``)
      divided by 255 (8-bit) or 65535 (16-bit), resized with its aspect kept so the longer side
      is ``size`` (area interpolation when shrinking, linear when growing), zero-padded at the
      bottom and right;
    * ``mask``: (1, size, size) float32 in {0, 1}, ``crop_mask`` resized the same way (nearest);
      ``mask_known``: bool tensor, False when the region has no mask (mask all zeros);
    * ``box``: (4,) float32 XYXY, pixel-edge coordinates in the frame of ``crop``;
    * ``label`` ("" when null), ``caption`` (``caption_region``, "" when null), ``region_id``: str.

    ``transform``, when given, is called on that dict and its result returned. The constructor
    (Polars, in the calling process) keeps only the rows' small columns
    (:data:`DATASET_COLUMNS`) and, per image, which committed images file holds it. Workers read
    pixels lazily with pyarrow — one row of one file, ``image`` column only, filtered on
    ``image_id`` — because Polars is not fork-safe (a forked DataLoader worker calling into a
    Polars thread pool the parent used hangs) and fork is the Linux default. Each worker keeps
    its last decoded image, so a sequential sampler decodes an image once per run of its
    regions. Batch with :func:`collate_regions` (``default_collate`` works too).
    """

    def __init__(self, corpus: CorpusReader, where: str | None = None, split: str | None = None,
                 size: int = 224, transform: Callable[[dict], dict] | None = None,
                 margin_px: int = MARGIN_PX):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.transform, self.margin_px = size, transform, margin_px
        lf = region_rows(corpus, where, split)
        have = lf.collect_schema().names()
        # plain dicts: a forked worker must not call into Polars (see above)
        self.rows = lf.select([c for c in DATASET_COLUMNS if c in have]).collect().to_dicts()
        self.image_files = image_files(corpus, (r["image_id"] for r in self.rows))
        self._cached: tuple[str | None, np.ndarray | None] = (None, None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # workers start without a decoded image
        state["_cached"] = (None, None)
        return state

    def image(self, image_id: str) -> np.ndarray:
        """(H, W) uint8/uint16 stored pixels of ``image_id`` (the last one is cached)."""
        if self._cached[0] != image_id:
            path = self.image_files.get(image_id)
            if path is None:
                raise CorpusError(f"image {image_id} is not in the committed images files")
            t = pq.read_table(path, columns=[PIXEL_COLUMN], filters=[("image_id", "==", image_id)])
            png = t.column(PIXEL_COLUMN)[0].as_py()["bytes"]
            self._cached = (image_id, decode_png_bytes(png))
        return self._cached[1]

    def region(self, i: int) -> Region:
        row = self.rows[i]
        return make_region(row, self.image(row["image_id"]), self.margin_px)

    def __getitem__(self, i: int) -> dict:
        import torch

        r = self.region(i)
        top = 255.0 if r.crop.dtype == np.uint8 else 65535.0
        shrink = max(r.crop.shape) > self.size
        crop, sx, sy = letterbox(r.crop, self.size,
                                 cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        mask, _, _ = letterbox(r.crop_mask.astype(np.uint8), self.size, cv2.INTER_NEAREST)
        x0, y0 = r.crop_origin
        box = (r.box - np.float32([x0, y0, x0, y0])) * np.float32([sx, sy, sx, sy])
        item = {"crop": torch.from_numpy(crop.astype(np.float32) / top)[None],
                "mask": torch.from_numpy(mask.astype(np.float32))[None],
                "mask_known": torch.tensor(r.mask_known),
                "box": torch.from_numpy(box.astype(np.float32)),
                "label": r.row["label"] or "", "caption": r.row.get("caption_region") or "",
                "region_id": r.region_id}
        return self.transform(item) if self.transform else item


def image_files(corpus: CorpusReader, image_ids: Iterable[str]) -> dict[str, str]:
    """{image_id: path of the committed images file holding it} for ``image_ids`` (reads the
    ``image_id`` column of each committed images file only)."""
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    out: dict[str, str] = {}
    for path in corpus.files("images"):
        ids = pq.read_table(path, columns=["image_id"]).column("image_id")
        for image_id in ids.filter(pc.is_in(ids, value_set=wanted)).to_pylist():
            out.setdefault(image_id, str(path))
    return out


def collate_regions(batch: list[dict]) -> dict:
    """Batch of :class:`RegionDataset` items: tensors stacked on a new first axis (``crop`` and
    ``mask`` (B, 1, size, size) float32, ``box`` (B, 4) float32, ``mask_known`` (B,) bool),
    strings as lists of length B."""
    import torch

    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
