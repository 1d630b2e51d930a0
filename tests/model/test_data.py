"""Data: reader assignment, fallback captions, collation, evaluation metrics."""

from __future__ import annotations

import numpy as np
import pytest

from model import captions as cap
from model.config import DataConfig
from model.data import CorpusIndex, RegionCorpus, reader_ids
from model.metrics import auc_binary, multi_label, recall_at, single_label


def _rows(ds, g, readers):
    return {(r["shard"], r["row"]) for r in ds._epoch_rows(g, readers, 0)}


def test_readers_partition_the_split(tiny_corpus):
    c = CorpusIndex.open(tiny_corpus)
    ds = RegionCorpus(c, "train", DataConfig(), 64, train=True)
    everything = _rows(ds, 0, 1)
    assert everything
    for world, workers in [(1, 2), (2, 1), (2, 3)]:
        parts = []
        for rank in range(world):
            for w in range(workers):
                g, n = reader_ids(world, rank, workers, w, rotate=0)
                parts.append(_rows(ds, g, n))
        assert set().union(*parts) == everything
        assert sum(len(p) for p in parts) == len(everything)  # disjoint


@pytest.mark.parametrize("stored", [True, False])
def test_samples_and_captions(tiny_corpus, stored):
    c = CorpusIndex.open(tiny_corpus)
    if not stored:  # as for corpora built before the caption columns existed
        c.region_captions = c.image_captions = False
    else:  # build-corpus always writes the caption columns: the trainer must see them
        assert c.region_captions and c.image_captions
    ds = RegionCorpus(c, "train", DataConfig(regions_per_image=3, negatives_per_region=3), 64)
    s = next(iter(ds))
    assert s["image"].shape == (64, 64) and s["image"].dtype == np.uint8
    assert 1 <= len(s["regions"]) <= 3 and s["summary"] and s["report"]
    for r in s["regions"]:
        assert r["mask"].shape == (64, 64) and r["mask"].any()
        assert 0 <= r["box"][0] < r["box"][2] <= 1 and 0 <= r["box"][1] < r["box"][3] <= 1
        assert len(r["negatives"]) == 3 and r["caption"] not in r["negatives"]
        assert r["points"][0, 2] == 1  # a positive point inside the mask
        if stored:
            continue
        assert r["caption"] == cap.region_caption(r["label"], r["laterality"])
        if r["laterality"] in ("left", "right"):
            other = "right" if r["laterality"] == "left" else "left"
            assert cap.region_caption(r["label"], other) in r["negatives"]
    if not stored:
        assert s["summary"].startswith("axial CT slice showing")
        assert c.prompt("lung_nodule", "right") == "right lung nodule"


def test_caption_fallback_rules():
    assert cap.region_caption("lung_nodule", "right") == "right lung nodule"
    assert cap.region_caption("lung_left", "left") == "left lung"
    assert cap.region_caption("spine", "midline") == "midline spine"
    negs, kinds = cap.fallback_negatives("r1", "lung_nodule", "right",
                                         ["lung_nodule", "liver", "spine"], 3)
    assert negs[0] == "left lung nodule" and kinds[0] == "laterality"
    assert len(negs) == 3 and "right lung nodule" not in negs
    assert cap.text_key("Right  lung") == cap.text_key("right lung")
    styled = cap.prompter("v1")  # the stored captions' phrasing (pipeline vocabulary v1)
    assert styled("lung_nodule", "right") == "lung nodule on the right"
    assert styled("spine", "midline") == "vertebral body in the midline"


def test_v2_prompts_use_the_captions_phrase_and_never_contradict_a_side():
    """From captions v2 the zero-shot prompt is the phrase the captions use: a sided structure
    names its own side only ("left adrenal gland", never "... on the right" or "... on the
    left" again), an unpaired one its measured side."""
    from pipeline.captions.attributes import load_vocab
    from pipeline.captions.describe import label_words
    from pipeline.captions.structures import load_structures

    styled, vocab = cap.prompter("v2"), load_vocab("v2")
    assert styled("adrenal_gland_left", "right") == "left adrenal gland"
    assert styled("lung_nodule", "right") == "lung nodule on the right"
    assert styled("liver", None) == "liver"
    sided = [n for n, e in load_structures().entries.items() if e.side in ("left", "right")]
    assert sided
    for name in sided:
        for side in ("left", "right", "midline", None):
            p = styled(name, side)
            assert p == label_words(name, vocab)[1] and " on the " not in p, (name, side)


def test_collate_pads_regions_and_dedups_texts(tiny_corpus):
    from model.collate import Collate
    from model.text_tower import load_tokenizer, train_tokenizer

    c = CorpusIndex.open(tiny_corpus)
    ds = RegionCorpus(c, "train", DataConfig(regions_per_image=4), 64)
    it = iter(ds)
    samples = [next(it) for _ in range(6)]
    texts = [s["global_text"] for s in samples] + [r["caption"] for s in samples
                                                   for r in s["regions"]]
    tok = load_tokenizer(train_tokenizer(texts * 3 + ["left right"], ds_tmp(c), 200).parent)
    b = Collate(tok, 32, 3, 2)(samples)
    n = [len(s["regions"]) for s in samples]
    assert b["region_valid"].shape == (6, max(n)) and b["region_valid"].sum() == sum(n)
    assert b["masks"].shape == (6, max(n), 64, 64) and b["points"].shape == (6, max(n), 2, 2)
    assert len(set(b["texts"])) == len(b["texts"]) == b["text_ids"].shape[0]
    for i, s in enumerate(samples):
        assert b["texts"][int(b["global_text"][i])] == s["global_text"]
        for j, r in enumerate(s["regions"]):
            assert b["texts"][int(b["region_text"][i, j])] == r["caption"]


def ds_tmp(c):
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / "tok"


def test_metrics():
    assert auc_binary(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc_binary(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    s = single_label(np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]), np.array([0, 1, 1]))
    assert s["accuracy"] == pytest.approx(2 / 3) and s["balanced_accuracy"] == 0.75
    m = multi_label(np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.9]]),
                    np.array([[1, 1, 0], [0, 0, 1]], bool))
    assert m["accuracy"] == 1.0 and m["auc"] == 1.0
    rel = np.array([[1, 0, 0], [0, 0, 1]], bool)
    r = recall_at(np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]]), rel, ks=(1, 2, 3))
    assert (r["r1"], r["r2"], r["r3"]) == (0.0, 0.0, 1.0)


def test_each_split_reads_its_own_rows_only(tiny_corpus):
    """The rows of train, val and test partition the images table; a reader of one split never
    yields (or converts) another split's row, and its regions are its images' own."""
    import pyarrow.parquet as pq

    c = CorpusIndex.open(tiny_corpus)
    total = sum(pq.ParquetFile(img).metadata.num_rows for img, _ in c.shards)
    seen = 0
    for split in ("train", "val", "test"):
        ds = RegionCorpus(c, split, DataConfig(), 64, train=False)
        rows = list(ds._epoch_rows(0, 1, 0))
        assert all(r["split"] == split for r in rows)
        assert all(reg["image_id"] == r["image_id"] for r in rows for reg in r["regions"])
        seen += len(rows)
    assert seen == total


def test_positive_point_window_matches_a_full_scan(tiny_corpus):
    """The positive point is searched in the mask's RLE bounding box only: the same point as a
    scan of the whole padded mask, for every region of the split (train and eval sampling)."""
    from pycocotools import mask as mask_utils

    c = CorpusIndex.open(tiny_corpus)
    for train in (False, True):
        ds = RegionCorpus(c, "train", DataConfig(), 64, train=train)
        for k, row in enumerate(list(ds._epoch_rows(0, 1, 0))[:12]):
            h, w = row["height"], row["width"]
            side = max(h, w)
            oy, ox = (side - h) // 2, (side - w) // 2
            for j, r in enumerate(row["regions"]):
                got = ds._region(r, (oy, ox, side), np.random.default_rng([k, j]))["points"]
                m = mask_utils.decode({"size": list(r["mask_rle"]["size"]),
                                       "counts": r["mask_rle"]["counts"].encode()})
                sq = np.zeros((side, side), np.uint8)
                sq[oy:oy + m.shape[0], ox:ox + m.shape[1]] = m
                rng = np.random.default_rng([k, j])
                box = ds._region(r, (oy, ox, side), np.random.default_rng([k, j]))["box"]
                negs = r.get("negatives")  # replay the draws _region makes before the points
                if train and negs is not None and len(negs) > ds.cfg.negatives_per_region:
                    rng.choice(len(negs), ds.cfg.negatives_per_region, replace=False)
                assert np.array_equal(got, ds._points(sq, box, side, rng))
