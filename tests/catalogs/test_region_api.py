"""Corpus.region / iter_regions and RegionDataset (catalogs/regions.py) on the real phantom corpus
of ``catalog_helpers.corpus_once``: arrays equal decoding the stored PNG and RLE by hand, filters
equal Corpus.filter, stray files never read, a DataLoader with 0 and 2 workers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from catalog_helpers import add_shard, copy_corpus, corpus_once, first_rows
from pycocotools import mask as mask_utils

from catalogs import regions as regions_mod
from catalogs.corpus import Corpus
from catalogs.regions import RegionDataset, collate_regions

WHERE = "label = 'liver' AND area_mm2 > 100"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return corpus_once(tmp_path_factory)


def stored_pngs(root, manifest="manifest.json") -> dict[str, bytes]:
    """{image_id: PNG bytes} of the images files the manifest lists (pyarrow, by hand)."""
    shards = json.loads((root / manifest).read_text())["shards"]
    out = {}
    for entry in shards.values():
        info = entry["tables"].get("images")
        if info:
            t = pq.read_table(root / info["file"], columns=["image_id", "image"]).to_pylist()
            out.update({r["image_id"]: r["image"]["bytes"] for r in t})
    return out


def by_hand(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def rle_by_hand(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_region_equals_hand_decoding(corpus_dir):
    c = Corpus.open(corpus_dir)
    pngs = stored_pngs(corpus_dir)
    rows = first_rows(corpus_dir, "regions", n=200)
    for row in rows[::20]:
        r = c.region(row["region_id"])
        image = by_hand(pngs[row["image_id"]])
        assert r.image.dtype == image.dtype and np.array_equal(r.image, image)
        assert r.mask.dtype == bool and r.mask_known
        assert np.array_equal(r.mask, rle_by_hand(row["mask_rle"]))
        assert r.box.dtype == np.float32 and r.box.shape == (4,)
        assert r.box.tolist() == row["bbox"]
        x0, y0, x1, y1 = (int(v) for v in row["bbox"])  # integer pixel edges in this corpus
        h, w = image.shape
        gx0, gy0 = max(x0 - 8, 0), max(y0 - 8, 0)
        assert r.crop_origin == (gx0, gy0)
        assert np.array_equal(r.crop, image[gy0:min(y1 + 8, h), gx0:min(x1 + 8, w)])
        assert np.array_equal(r.crop_mask, r.mask[gy0:min(y1 + 8, h), gx0:min(x1 + 8, w)])
        # margin 0: the crop is exactly the box and holds the whole mask
        tight = c.region(row["region_id"], margin_px=0)
        assert np.array_equal(tight.crop, image[y0:y1, x0:x1])
        assert tight.crop_mask.sum() == r.mask.sum() == row["area_px"]
        # a margin wider than the image is clipped to it
        wide = c.region(row["region_id"], margin_px=10_000)
        assert wide.crop_origin == (0, 0) and np.array_equal(wide.crop, image)
        assert {k: v for k, v in r.row.items()} == row


def test_region_unknown_id(corpus_dir):
    with pytest.raises(KeyError):
        Corpus.open(corpus_dir).region("0" * 24)


def runs(ids: list[str]) -> int:
    return sum(1 for i, v in enumerate(ids) if i == 0 or ids[i - 1] != v)


@pytest.mark.parametrize("where,split", [(WHERE, None), ("window = 'soft_tissue'", "val"),
                                         (None, "train")])
def test_iter_regions_equals_filter(corpus_dir, monkeypatch, where, split):
    c = Corpus.open(corpus_dir)
    lf = c.filter(where) if where else c.regions_with_images()
    if split:
        lf = lf.filter(pl.col("split") == split)
    want = lf.select("region_id", "image_id").collect()
    assert want.height > 0
    decoded = []
    real = regions_mod.decode_png_bytes
    monkeypatch.setattr(regions_mod, "decode_png_bytes", lambda b: decoded.append(1) or real(b))
    got = list(c.iter_regions(where=where, split=split))
    assert [r.region_id for r in got] == want.get_column("region_id").to_list()
    image_ids = want.get_column("image_id").to_list()
    assert len(decoded) == runs(image_ids)  # each image decoded once per run of its regions
    if where is None:
        assert runs(image_ids) < len(image_ids)  # (here images hold several regions)
    pngs = stored_pngs(corpus_dir)
    for r in got[::7]:
        assert np.array_equal(r.image, by_hand(pngs[r.row["image_id"]]))
        assert np.array_equal(r.mask, rle_by_hand(r.row["mask_rle"]))
    limited = [r.region_id for r in c.iter_regions(where=where, split=split, limit=3)]
    assert limited == want.get_column("region_id").to_list()[:3]


def test_stray_files_never_read(corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path / "corpus")
    real = first_rows(root, "regions", n=3)
    image_row = first_rows(root, "images", where=lambda r: r["image_id"] == real[0]["image_id"])[0]
    white = cv2.imencode(".png", np.full((image_row["height"], image_row["width"]), 255,
                                         np.uint8))[1].tobytes()
    # the stray images row reuses a real image_id with other pixels: a globbing reader sees it
    stray_image = {**image_row, "image": {"bytes": white, "path": None}}
    stray = [{**real[i], "region_id": f"stray{i:019d}"} for i in range(3)]
    stray[2]["mask_rle"] = None  # a boxes-only region
    manifest = add_shard(root, "shard-stray", {"images": [stray_image], "regions": stray})
    add_shard(root, "shard-0-stray", {"images": [stray_image]})  # sorts before shard-00000
    assert (root / "regions" / "shard-stray.parquet").is_file()

    c = Corpus.open(root)
    seen = {r.region_id for r in c.iter_regions()}
    assert seen == set(c.regions().collect().get_column("region_id"))
    assert not any(s.startswith("stray") for s in seen)
    pngs = stored_pngs(root)
    for row in real:
        assert np.array_equal(c.region(row["region_id"]).image, by_hand(pngs[row["image_id"]]))
    with pytest.raises(KeyError):
        c.region(stray[0]["region_id"])
    ds = RegionDataset(c)
    assert not any(row["region_id"].startswith("stray") for row in ds.rows)
    assert not any("-stray" in Path(path).name for path in ds.image_files.values())
    assert np.array_equal(ds.image(real[0]["image_id"]), by_hand(pngs[real[0]["image_id"]]))

    # control: with the manifest that lists the shard, the same files are read
    listed = Corpus.open(root, manifest=manifest)
    ids = {r.region_id for r in listed.iter_regions(where="region_id LIKE 'stray%'")}
    assert ids == {s["region_id"] for s in stray}
    boxes_only = listed.region(stray[2]["region_id"])
    assert not boxes_only.mask_known and boxes_only.mask.shape == boxes_only.image.shape
    assert not boxes_only.mask.any() and boxes_only.crop_mask.shape == boxes_only.crop.shape


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_dataloader(corpus_dir, workers):
    from torch.utils.data import DataLoader

    c = Corpus.open(corpus_dir)
    size = 48
    ds = RegionDataset(c, where=WHERE, size=size)
    want = c.filter(WHERE).select("region_id", "label", "caption_region").collect()
    assert len(ds) == want.height > 8
    loader = DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=collate_regions)
    seen = []
    for batch in loader:
        b = len(batch["region_id"])
        assert batch["crop"].shape == batch["mask"].shape == (b, 1, size, size)
        assert batch["crop"].dtype == batch["mask"].dtype == batch["box"].dtype
        assert str(batch["crop"].dtype) == "torch.float32" and batch["box"].shape == (b, 4)
        assert 0 <= batch["crop"].min() and batch["crop"].max() <= 1
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
        assert bool(batch["mask_known"].all())
        assert (batch["box"] >= 0).all() and (batch["box"] <= size).all()
        for i in range(b):
            ys, xs = np.nonzero(batch["mask"][i, 0].numpy())
            x0, y0, x1, y1 = batch["box"][i].tolist()  # the mask lies inside the box
            assert x0 - 1 <= xs.min() and xs.max() < x1 + 1
            assert y0 - 1 <= ys.min() and ys.max() < y1 + 1
        assert all(isinstance(s, str) for k in ("label", "caption", "region_id") for s in batch[k])
        seen += list(zip(batch["region_id"], batch["label"], batch["caption"], strict=True))
    assert seen == list(want.iter_rows())


def test_dataset_item_is_the_region_resized(corpus_dir):
    c = Corpus.open(corpus_dir)
    ds = RegionDataset(c, split="val", size=224, transform=lambda d: {**d, "seen": True})
    item = ds[0]
    r = c.region(item["region_id"])
    h, w = r.crop.shape
    s = 224 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    crop = cv2.resize(r.crop, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    assert np.allclose(item["crop"][0, :nh, :nw].numpy(), crop)
    assert not item["crop"][0, nh:, :].any() and not item["crop"][0, :, nw:].any()
    x0, y0 = r.crop_origin
    want_box = (r.box - [x0, y0, x0, y0]) * [nw / w, nh / h, nw / w, nh / h]
    assert np.allclose(item["box"].numpy(), want_box, atol=1e-4)
    assert item["seen"] is True and item["label"] == r.row["label"]


def test_iter_region_objects_any_order(corpus_dir):
    """Rows in any order (the last image of a chunk coming back in the next chunk after another
    image: X B A | B A A with chunk 3) give each region its own image."""
    c = Corpus.open(corpus_dir)
    rows = c.regions_with_images().collect()
    by_image = rows.partition_by("image_id", as_dict=False)
    a, b, x = (df.row(0, named=True) for df in by_image[:3])
    order = pl.DataFrame([x, b, a, b, a, a], schema=rows.schema)
    got = list(regions_mod.iter_region_objects(c, order.lazy(), chunk=3))
    pngs = stored_pngs(corpus_dir)
    assert [r.region_id for r in got] == order.get_column("region_id").to_list()
    for r in got:
        assert np.array_equal(r.image, by_hand(pngs[r.row["image_id"]]))
