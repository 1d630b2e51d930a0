"""The model stage split in three (CPU inputs → batched model work → CPU regions) gives the rows
the per-image path gave: device preprocessing equal bit for bit to the host's, packed masks
that unpack to the masks, encoder calls batched across units."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.geometry import body_mask, body_midline_x, to_uint8
from pipeline.images.png import decode_png, encode_png
from pipeline.roi.propose import ModelStage, Regions, _box_mask, model_inputs, unit_inputs
from pipeline.roi.regions import MAX_ENCODER_BATCH, RegionConfig, label_prompts, region_row
from pipeline.roi.segment import PromptSegmenter, pack_masks, unpack_masks
from pipeline.roi.segment_models import ModelParts
from tests.pipeline.roi.test_segment import tiny_sam_parts

SIZES = st.sampled_from([8, 16, 32, 50, 64, 96, 128, 200, 256, 333, 512])


@settings(max_examples=25, deadline=None)
@given(h=SIZES, w=SIZES, rgb=st.booleans(), side=st.sampled_from([64, 128, 256]),
       norm=st.sampled_from(["minmax", "imagenet"]), seed=st.integers(0, 2**16),
       constant=st.booleans())
def test_device_preprocessing_is_the_host_preprocessing(h, w, rgb, side, norm, seed, constant):
    """Every size (exact device path or host fallback), grey/RGB, both normalisations, a
    constant image: the batch equals the per-image host tensors bit for bit."""
    parts = ModelParts("id", nn.Identity(), nn.Identity(), nn.Identity(), side, norm, None)
    seg = PromptSegmenter(parts)
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if rgb else (h, w)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(3)]
    if constant:
        images[1][:] = 17
    batch = seg.preprocess_batch(images)
    assert torch.equal(batch, torch.stack([seg.preprocess(im) for im in images]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 4), h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 99))
def test_packed_masks_unpack_to_the_masks(n, h, w, seed):
    masks = np.random.default_rng(seed).random((n, h, w)) > 0.5
    packed = pack_masks(torch.from_numpy(masks))  # the device path
    assert np.array_equal(packed, pack_masks(masks))  # numpy's packbits
    assert np.array_equal(unpack_masks(packed, (h, w)), masks)


def test_encoder_batch_is_range_checked():
    for bad in (0, -1, MAX_ENCODER_BATCH + 1):
        with pytest.raises(ValueError, match="--encoder-batch"):
            RegionConfig(routes=("boxes",), encoder_batch=bad)


def test_build_corpus_refuses_a_bad_encoder_batch(tmp_path, capsys):
    from workflows.build_corpus import main

    (tmp_path / "src").mkdir()
    argv = [str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--roi", "labels,boxes",
            "--segmenter", "otsu", "--device", "cpu", "--encoder-batch", "0"]
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and "--encoder-batch 0" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def _image(k: int, size: int, rng) -> tuple[dict, np.ndarray]:
    """An images-table row (PNG of a bright body with two blobs) and its label slice."""
    px = np.full((size, size), 10, np.uint8)
    lab = np.zeros((size, size), np.int32)
    c = size // 2
    px[c // 2: c + c // 2, c // 3: size - c // 3] = 120
    for value, (r, q) in enumerate([(c - 6 + k % 4, c - 10), (c + 3, c + 4 + k % 3)], 1):
        px[r:r + 6, q:q + 5] = 200 + 20 * value
        lab[r:r + 6, q:q + 5] = value
    px = np.clip(px.astype(int) + rng.integers(0, 20, px.shape), 0, 255).astype(np.uint8)
    row = {"image_id": f"img{k}", "unit_key": f"u{k % 3}", "series_key": "s", "patient_key": "p",
           "split": "train", "modality": "CT", "plane": "axial",
           "pixel_to_ras": [-0.8, 0, 40.0, 0, -0.8, 30.0, 0, 0, 1], "pixel_spacing_mm": [0.8, 0.8],
           "image": {"bytes": encode_png(px), "path": None}}
    return row, lab


class _Unit:
    """What ``unit_inputs`` reads of a UnitResult: images and prompts."""

    def __init__(self, images, prompts):
        self.images, self.prompts = images, prompts


def _per_image_rows(seg, images, prompts, cfg) -> list[dict]:
    """The rows of the former model stage: one image at a time, host preprocessing, full
    masks (as pipeline/roi/propose.py computed them before the split)."""
    rows = []
    for image in images:
        items = prompts.get(image["image_id"], [])
        if not items:
            continue
        px = decode_png(image)
        boxes = np.array([b for _, _, b in items], np.float32).reshape(-1, 4)
        emb = seg.encode(seg.preprocess(to_uint8(px))[None])
        masks, ious = seg.decode(emb, boxes, px.shape)
        midline = body_midline_x(image["pixel_to_ras"], body_mask(to_uint8(px)))
        for k, (label, value, box) in enumerate(items):
            if masks[k].any() and ious[k] >= cfg.min_mask_score:
                rows.append(region_row(image, label, value, "boxes", masks[k], box, midline, cfg,
                                       score=float(ious[k]), segmenter=seg.name,
                                       model_sha=seg.checkpoint_sha256))
    return rows


def _units(size: int, cfg: RegionConfig) -> list[_Unit]:
    """3 units of 3 images; the middle image of each has no prompts (no encoder call)."""
    rng = np.random.default_rng(size)
    units = []
    for u in range(3):
        images, prompts = [], {}
        for k in range(3 * u, 3 * u + 3):
            row, lab = _image(k, size, rng)
            images.append(row)
            if k % 3 != 1:
                prompts[row["image_id"]] = label_prompts(row, lab, {1: "liver", 2: "nodule"}, cfg)
        units.append(_Unit(images, prompts))
    return units


def _stage_rows(units, cfg) -> tuple[list[dict], tuple[int, int]]:
    stage = ModelStage(replace(cfg, segmenter="otsu"))  # then the tiny SAM in its place
    stage.segmenter = PromptSegmenter(tiny_sam_parts(), batch_size=cfg.encoder_batch)
    inputs = unit_inputs(units, cfg)
    assert [x.image_id for x in inputs] == [f"img{k}" for k in range(9) if k % 3 != 1]
    out = stage(inputs)
    regions = Regions(out, cfg)
    return ([r for u in units for r in regions(u.images, u.prompts).regions],
            (out.encoder_calls, out.encoded_images))


CFG = RegionConfig(routes=("labels", "boxes"), min_area_mm2=0.0,
                   min_mask_score=-1.0)  # the random model's predicted IoU is below 0


@pytest.mark.parametrize("size", [64, 40])  # 64: device resize; 40: host fallback (128/40)
def test_split_stage_gives_the_per_image_rows_byte_for_byte(size):
    """At one image per encoder call the three steps (device preprocessing, packed masks, CPU
    regions) give exactly the rows of the former per-image stage."""
    units = _units(size, CFG)
    new, calls = _stage_rows(units, replace(CFG, encoder_batch=1))
    reference = PromptSegmenter(tiny_sam_parts(), batch_size=1)
    old = [r for u in units for r in _per_image_rows(reference, u.images, u.prompts, CFG)]
    assert calls == (6, 6) and len(new) >= 6 and new == old


def test_encoder_batches_span_units():
    """4 images per call across units: 2 calls for 6 images; the same regions (a generic
    ViT's embedding moves in the 6th digit with its batch on CPU: scores compared to 1e-4)."""
    units = _units(64, CFG)
    batched, calls = _stage_rows(units, replace(CFG, encoder_batch=4))
    single, _ = _stage_rows(units, replace(CFG, encoder_batch=1))
    assert calls == (2, 6)
    key = lambda r: (r["region_id"], r["label"], r["bbox"], r["source"])  # noqa: E731
    assert [key(r) for r in batched] == [key(r) for r in single]
    np.testing.assert_allclose([r["score"] for r in batched], [r["score"] for r in single],
                               atol=1e-4)


def test_boxes_only_segmenter_keeps_boxes_and_no_rle():
    cfg = RegionConfig(routes=("boxes",), segmenter="none")
    rng = np.random.default_rng(0)
    row, lab = _image(0, 64, rng)
    prompts = {row["image_id"]: label_prompts(row, lab, {1: "liver", 2: "nodule"}, cfg)}
    inputs = model_inputs([row], prompts, cfg)
    found = Regions(ModelStage(cfg)(inputs), cfg)([row], prompts)
    assert [r["bbox"] for r in found.regions] == [b for _, _, b in prompts[row["image_id"]]]
    assert all(r["mask_rle"] is None and r["segmenter"] == "none" for r in found.regions)
    box = found.regions[0]["bbox"]
    assert found.regions[0]["area_px"] == int(_box_mask((64, 64), box).sum())
    assert set(found.pixels) == set(found.bodies) == {row["image_id"]}


def test_model_stage_threads_are_the_cpus_ray_granted(monkeypatch):
    """A model actor (Ray granted it 1 CPU on a 64-core node) runs torch on 1 thread, with or
    without a detector (the segmenter alone used to keep torch's node-wide default)."""
    import sys
    import types

    from pipeline.roi import detect

    context = types.SimpleNamespace(get_task_id=lambda: "a1", get_assigned_resources=lambda:
                                    {"CPU": 1.0, "GPU": 0.5})
    ray = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(detect.os, "cpu_count", lambda: 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ModelStage(RegionConfig(routes=("boxes",), segmenter="none"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_detector_batches_hold_one_image_size_and_answers_keep_their_order():
    """Detections batched across units, one image size per detector call (ultralytics'
    letterbox depends on a batch's sizes), handed back in input order; their boxes go to the
    segmenter after the prompts."""
    from pipeline.roi.propose import ModelInput

    calls = []

    class Fake:
        def predict(self, images):
            calls.append({im.shape for im in images})
            return [(np.array([[1, 1, 5 + im.shape[0] % 7, 6]], np.float32),
                     np.array([0.5], np.float32), [f"d{im.shape[0]}"]) for im in images]

    stage = ModelStage(RegionConfig(routes=("boxes",), segmenter="none"))
    stage.detector = Fake()
    sizes = [32, 48, 32, 48, 40]
    inputs = [ModelInput(f"i{k}", np.zeros((s, s), np.uint8),
                         np.array([[0, 0, 3, 3]], np.float32)) for k, s in enumerate(sizes)]
    out = stage(inputs)
    assert all(len(shapes) == 1 for shapes in calls) and len(calls) == 3
    for k, s in enumerate(sizes):
        found = out.images[f"i{k}"]
        assert found.detections[2] == [f"d{s}"] and found.scores.shape == (2,)
