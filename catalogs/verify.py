"""Corpus checks: patient/image leakage across splits and near-duplicate images.

* :func:`check_leakage` — a ``patient_key`` seen in more than one split (in series, images or
  regions) is a leak; so is the same PNG (sha256 of its bytes) appearing in more than one split.
* :func:`near_duplicates` — 64-bit perceptual hashes (pHash by default, dHash on request)
  computed with numpy + OpenCV on the decoded PNG; pairs within ``max_distance`` bits
  (Hamming) are reported, within and across splits.

The hashes stay written here rather than taken from ``imagehash``: measured by
``workflows/bench_hashing.py`` (docs/benchmarks.md), pHash here is 3.6-4.5x faster than
``imagehash.phash`` (96 px and 512 px slices) and gives the same bits on the median image
(at most 4 bits apart; imagehash takes the median over all 64 terms, DC included, after a
Lanczos resize), equally stable under noise; and ``imagehash`` converts to 8-bit "L" by
clipping, which flattens a 16-bit PNG to white, where :func:`decode_png` scales it. Popcount is
``np.bitwise_count`` (numpy >= 2; ~100x the byte table, which stays as the numpy 1.x fallback).

The hash and pair-search helpers are shared with :mod:`catalogs.jobs`, which runs the same
search over every shard on dask.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import polars as pl

from pipeline.images.png import decode_png_bytes

from .corpus import TABLES, Corpus

HASH_METHODS = ("phash", "dhash")
DEFAULT_MAX_DISTANCE = 4
BLANK_STD = 1.0  # grey levels (8-bit scale): below this an image is flat and its hash meaningless
HASH_COLUMNS = ("image_id", "series_key", "patient_key", "split", "slice_index")


# -- perceptual hashes ---------------------------------------------------------------------------

def decode_png(png: bytes) -> np.ndarray:
    """Decode PNG bytes to a 2D float32 array on the 8-bit scale (16-bit PNGs divided by 257;
    colour reduced to luminance). Raises ValueError on undecodable bytes."""
    arr = decode_png_bytes(png)
    if arr is None:
        raise ValueError("undecodable PNG")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2GRAY)
    arr = arr.astype(np.float32)
    return arr / 257.0 if arr.max(initial=0) > 255 else arr


def _pack(bits: np.ndarray) -> int:
    return int(np.packbits(bits.astype(bool).ravel()).view(">u8")[0])


def dhash64(gray: np.ndarray) -> int:
    """Difference hash: resize to 9×8 (area), bit = pixel brighter than its left neighbour."""
    small = cv2.resize(np.asarray(gray, np.float32), (9, 8), interpolation=cv2.INTER_AREA)
    return _pack(small[:, 1:] > small[:, :-1])


def phash64(gray: np.ndarray) -> int:
    """Perceptual hash: resize to 32×32 (area), 2D DCT, keep the 8×8 lowest frequencies,
    bit = coefficient above the median of the 63 AC coefficients."""
    small = cv2.resize(np.asarray(gray, np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].ravel()
    return _pack(low > np.median(low[1:]))


def hash_png(png: bytes, method: str = "phash") -> dict:
    """``{"sha256": hex, "hash": int (64-bit, unsigned), "blank": bool}`` for one PNG."""
    if method not in HASH_METHODS:
        raise ValueError(f"unknown hash method {method!r}; choose from {HASH_METHODS}")
    gray = decode_png(png)
    fn = phash64 if method == "phash" else dhash64
    return {"sha256": hashlib.sha256(png).hexdigest(), "hash": fn(gray),
            "blank": bool(gray.std() < BLANK_STD)}


def hash_rows(items: Iterable[tuple[dict, bytes]], method: str = "phash") -> list[dict]:
    """Hash ``(row, png)`` pairs (as yielded by ``Corpus.iter_image_bytes``) into records:
    the row's columns plus sha256, hash, blank."""
    return [{**row, **hash_png(png, method)} for row, png in items]


def image_hashes(corpus: Corpus, method: str = "phash",
                 columns: Sequence[str] = HASH_COLUMNS) -> pl.DataFrame:
    """One row per image: ``columns`` + sha256 str, hash u64, blank bool."""
    recs = hash_rows(corpus.iter_image_bytes(columns), method)
    return hashes_frame(recs, columns)


def hashes_frame(recs: list[dict], columns: Sequence[str] = HASH_COLUMNS) -> pl.DataFrame:
    schema = {c: pl.Int32 if c == "slice_index" else pl.String for c in columns}
    schema |= {"sha256": pl.String, "hash": pl.UInt64, "blank": pl.Boolean}
    return pl.DataFrame(recs, schema=schema)


# -- Hamming search ------------------------------------------------------------------------------

def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 word, int64, same shape: ``np.bitwise_count`` (numpy >= 2), else
    a 256-entry table summed over the word's 8 bytes."""
    x = np.asarray(x, np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], np.int64)
    return table[x[..., None].view(np.uint8)].sum(-1)


def bands(max_distance: int) -> list[tuple[int, int]]:
    """Split the 64 bits into ``max_distance + 1`` contiguous bands ``(shift, width)``: two
    hashes within ``max_distance`` bits agree exactly on at least one band (pigeonhole)."""
    n = min(max_distance + 1, 64)
    edges = np.linspace(0, 64, n + 1).round().astype(int)
    return [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def band_keys(h: int, max_distance: int) -> list[tuple[int, int]]:
    """``(band index, band value)`` for each band of hash ``h`` (the bucket keys)."""
    return [(i, (h >> shift) & ((1 << width) - 1))
            for i, (shift, width) in enumerate(bands(max_distance))]


def bucket_pairs(members: Sequence[int], hashes: np.ndarray, max_distance: int,
                 chunk: int = 2048) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` with i < j among ``members`` (indices into ``hashes``) within
    ``max_distance``. Brute force in chunks (a bucket is small unless images are alike)."""
    idx = np.asarray(sorted(members), np.int64)
    out = []
    for a in range(0, len(idx), chunk):
        rows = idx[a:a + chunk]
        d = popcount64(hashes[rows][:, None] ^ hashes[idx][None, :])
        ii, jj = np.nonzero((d <= max_distance) & (rows[:, None] < idx[None, :]))
        out.extend(zip(rows[ii].tolist(), idx[jj].tolist(), d[ii, jj].tolist(), strict=True))
    return out


def hamming_pairs(hashes: Sequence[int] | np.ndarray, max_distance: int,
                  skip: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """All index pairs ``(i, j, d)``, i < j, with Hamming distance ``d <= max_distance``,
    found by bucketing on bands (no all-pairs matrix). ``skip``: boolean mask of items left
    out. Sorted by (i, j)."""
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    h = np.asarray(hashes, np.uint64)
    keep = np.arange(len(h)) if skip is None else np.nonzero(~np.asarray(skip, bool))[0]
    found: dict[tuple[int, int], int] = {}
    for shift, width in bands(max_distance):
        vals = (h[keep] >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        buckets = defaultdict(list)
        for i, v in zip(keep.tolist(), vals.tolist(), strict=True):
            buckets[v].append(i)
        for members in buckets.values():
            if len(members) > 1:
                for i, j, d in bucket_pairs(members, h, max_distance):
                    found[(i, j)] = d
    return [(i, j, d) for (i, j), d in sorted(found.items())]


PAIR_SCHEMA = {"image_id_a": pl.String, "image_id_b": pl.String, "distance": pl.Int64,
               "split_a": pl.String, "split_b": pl.String, "cross_split": pl.Boolean,
               "same_patient": pl.Boolean, "series_key_a": pl.String,
               "series_key_b": pl.String, "patient_key_a": pl.String,
               "patient_key_b": pl.String}


def pairs_frame(hashes: pl.DataFrame, pairs: Iterable[tuple[int, int, int]],
                include_same_series: bool = False) -> pl.DataFrame:
    """Pairs of row indices of ``hashes`` → one row per pair (see :func:`near_duplicates`),
    with image_id_a < image_id_b, sorted by (distance, image_id_a, image_id_b)."""
    recs = hashes.select("image_id", "split", "series_key", "patient_key").rows()
    rows = []
    for i, j, d in pairs:
        a, b = sorted((recs[i], recs[j]))
        if a[2] == b[2] and not include_same_series:
            continue
        rows.append((a[0], b[0], d, a[1], b[1], a[1] != b[1], a[3] == b[3], a[2], b[2],
                     a[3], b[3]))
    return (pl.DataFrame(rows, schema=PAIR_SCHEMA, orient="row")
            .sort("distance", "image_id_a", "image_id_b"))


def near_duplicates(corpus: Corpus, max_distance: int = DEFAULT_MAX_DISTANCE,
                    method: str = "phash", include_same_series: bool = False,
                    hashes: pl.DataFrame | None = None) -> pl.DataFrame:
    """Near-duplicate image pairs: 64-bit perceptual hashes within ``max_distance`` bits.

    Returns a DataFrame, one row per pair: image_id_a str, image_id_b str (a < b),
    distance i64 (Hamming bits), split_a, split_b str, cross_split bool (the pair straddles
    splits: a leak), same_patient bool, series_key_a/b, patient_key_a/b str. Sorted by
    (distance, image_id_a, image_id_b).

    Pairs from the same series are left out unless ``include_same_series`` (neighbouring
    slices of one volume are alike by nature). Flat images (std < 1 grey level, e.g. empty
    slices) are left out: their hash carries no information; :func:`check_leakage` still
    catches byte-identical ones. With pHash, re-encoding or mild noise moves a hash by 0-2
    bits, while distinct slices of a volume are usually > 8 bits apart; synthetic phantoms of
    the same generator can be genuinely alike (end slices of two bodies), and are reported.
    """
    if hashes is None:
        hashes = image_hashes(corpus, method)
    found = hamming_pairs(hashes["hash"].to_numpy(), max_distance,
                          skip=hashes["blank"].to_numpy())
    return pairs_frame(hashes, found, include_same_series)


# -- leakage -------------------------------------------------------------------------------------

def check_leakage(corpus: Corpus, hashes: pl.DataFrame | None = None,
                  max_listed: int = 100) -> dict:
    """Split leakage report (JSON-serialisable).

    ``ok`` bool — no leak of either kind;
    ``patients_in_multiple_splits`` — [{patient_key, splits: [..], tables: [..]}] for every
    patient_key found under more than one split in series, images or regions (first
    ``max_listed``), with ``n_patient_leaks`` the full count;
    ``identical_images_across_splits`` — [{sha256, image_ids, splits}] for PNG bytes that
    occur in more than one split, with ``n_image_leaks``;
    ``identical_images_within_split`` — count of extra copies of identical bytes inside one
    split (not a leak, but worth knowing);
    ``patients`` / ``images`` — totals checked."""
    seen = []
    for table in TABLES:
        if table == "files":
            continue
        lf = corpus.table(table)
        if {"patient_key", "split"} <= set(lf.collect_schema().names()):
            seen.append(lf.select("patient_key", "split").unique()
                        .with_columns(table=pl.lit(table)))
    keys = pl.concat(seen).collect() if seen else pl.DataFrame(
        schema={"patient_key": pl.String, "split": pl.String, "table": pl.String})
    per_patient = (keys.group_by("patient_key")
                   .agg(splits=pl.col("split").unique().sort(),
                        tables=pl.col("table").unique().sort())
                   .filter(pl.col("splits").list.len() > 1).sort("patient_key"))
    if hashes is None:
        hashes = hash_bytes_only(corpus)
    per_bytes = (hashes.group_by("sha256")
                 .agg(image_ids=pl.col("image_id").sort(), splits=pl.col("split").unique().sort(),
                      n=pl.len()))
    cross = per_bytes.filter(pl.col("splits").list.len() > 1).sort("sha256")
    within = per_bytes.filter(pl.col("splits").list.len() == 1, pl.col("n") > 1)
    return {
        "ok": per_patient.height == 0 and cross.height == 0,
        "patients": int(keys["patient_key"].n_unique()),
        "images": hashes.height,
        "n_patient_leaks": per_patient.height,
        "patients_in_multiple_splits": per_patient.head(max_listed).to_dicts(),
        "n_image_leaks": cross.height,
        "identical_images_across_splits": cross.drop("n").head(max_listed).to_dicts(),
        "identical_images_within_split": int((within["n"] - 1).sum()),
    }


def hash_bytes_only(corpus: Corpus) -> pl.DataFrame:
    """image_id, split, sha256 of the PNG bytes (no decoding)."""
    rows = [(r["image_id"], r["split"], hashlib.sha256(png).hexdigest())
            for r, png in corpus.iter_image_bytes(("image_id", "split"))]
    return pl.DataFrame(rows, schema={"image_id": pl.String, "split": pl.String,
                                      "sha256": pl.String}, orient="row")


def verify_captions(corpus: Corpus, **kwargs) -> dict:
    """Re-derive every checkable caption attribute from the stored corpus and report agreement
    (see pipeline.captions.check.verify_captions)."""
    from pipeline.captions.check import verify_captions as check

    return check(corpus.root, manifest=corpus.manifest, **kwargs)
