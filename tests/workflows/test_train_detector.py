"""train-detector: YOLO dataset export, box recall, flag validation and a one-epoch smoke run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.roi.detector_data import box_recall, export_dataset, iou_matrix
from pipeline.write import commit_shard
from workflows.train_detector import main


def png(h: int, w: int, squares=()) -> bytes:
    px = np.full((h, w), 20, np.uint8)
    for x0, y0, x1, y1 in squares:
        px[y0:y1, x0:x1] = 230
    ok, buf = cv2.imencode(".png", px)
    assert ok
    return buf.tobytes()


def image_row(image_id, patient, split, h=32, w=64, squares=(), **kw) -> dict:
    return {"image_id": image_id, "patient_key": patient, "split": split, "height": h,
            "width": w, "image": {"bytes": png(h, w, squares), "path": None},
            "pixel_spacing_mm": [0.5, 0.5], **kw}


def region_row(image_id, label, bbox, **kw) -> dict:
    return {"region_id": f"{image_id}-{label}", "image_id": image_id, "label": label,
            "source": "labels", "bbox": [float(v) for v in bbox], **kw}


def test_export_dataset_files_labels_yaml(tmp_path):
    images = [image_row("a1", "PA", "train", squares=[(8, 4, 24, 20)]),
              image_row("a2", "PA", "train"), image_row("a3", "PA", "train"),
              image_row("b1", "PB", "test", squares=[(40, 10, 48, 30)]), image_row("b2", "PB", "test")]
    regions = [region_row("a1", "lung_nodule", [8, 4, 24, 20]),
               region_row("a1", "liver", [0, 0, 64, 32]),  # not a class: ignored
               region_row("b1", "kidney_mass", [40, 10, 48, 30]),
               region_row("b1", "lung_nodule", [60, -2, 70, 2])]  # clipped to the image
    classes = ["lung_nodule", "kidney_mass"]
    data_yaml = export_dataset(images, regions, tmp_path / "ds", classes, seed=0)
    ds = tmp_path / "ds"
    assert data_yaml == ds / "data.yaml"
    data = yaml.safe_load(data_yaml.read_text())
    # one train patient, no val split: train is reused as val
    assert data == {"path": str(ds.resolve()), "train": "images/train", "val": "images/train",
                    "names": {0: "lung_nodule", 1: "kidney_mass"}, "test": "images/test"}
    assert (ds / "labels/train/a1.txt").read_text() == "0 0.250000 0.375000 0.250000 0.500000\n"
    assert (ds / "labels/test/b1.txt").read_text() == (
        "1 0.687500 0.625000 0.125000 0.625000\n0 0.968750 0.031250 0.062500 0.062500\n")
    # 1 positive train image → at most 1 of the 2 background images; test is complete
    train = sorted(p.name for p in (ds / "images/train").iterdir())
    assert len(train) == 2 and "a1.png" in train
    assert sorted(p.name for p in (ds / "images/test").iterdir()) == ["b1.png", "b2.png"]
    bg = next(n for n in train if n != "a1.png").replace(".png", ".txt")
    assert (ds / "labels/train" / bg).read_text() == ""
    assert (ds / "images/test/b1.png").read_bytes() == images[3]["image"]["bytes"]
    assert not any((ds / "images/val").iterdir())
    summary = json.loads((ds / "export.json").read_text())
    assert summary["splits"]["train"] == {"patients": 1, "positive": 1, "background": 1,
                                          "background_dropped": 1, "boxes": 1}
    assert summary["train_reused_as_val"] is True


def test_export_dataset_val_from_train_patients(tmp_path):
    images = [image_row(f"{p}{k}", p, "train", squares=[(0, 0, 8, 8)])
              for p in ("PA", "PB", "PC") for k in range(2)]
    images.append(image_row("d1", "PD", "test"))
    regions = [region_row(im["image_id"], "liver_mass", [0, 0, 8, 8]) for im in images[:-1]]
    data_yaml = export_dataset(images, regions, tmp_path / "ds", ["liver_mass"],
                               background_ratio=None)
    data = yaml.safe_load(data_yaml.read_text())
    assert data["val"] == "images/val"
    ds = tmp_path / "ds"
    patients = {split: {p.name[:2] for p in (ds / "images" / split).iterdir()}
                for split in ("train", "val", "test")}
    assert len(patients["val"]) == 1 and len(patients["train"]) == 2
    assert not patients["val"] & patients["train"]  # a patient is never in two splits
    assert patients["test"] == {"d1"[:2]}


def test_export_dataset_rejects_patient_in_two_splits(tmp_path):
    images = [image_row("a1", "PA", "train"), image_row("a2", "PA", "test")]
    with pytest.raises(ValueError, match="PA"):
        export_dataset(images, [], tmp_path / "ds", ["lung_nodule"])


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou_matrix(a, b), [[50 / 150, 1, 0], [0, 0, 0]])


def test_box_recall_hand_made():
    true = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]]),  # image 0: 2 lesions
            np.array([[0, 0, 4, 4]]),                       # image 1: 1 small lesion, missed
            np.zeros((0, 4))]                               # image 2: background
    pred = [np.array([[1, 0, 10, 10],      # IoU 0.9 with truth 0, same class
                      [0, 0, 10, 9],       # duplicate: IoU 0.9, only one match allowed
                      [25, 20, 45, 40]]),  # IoU 300/500 = 0.6 with truth 1, wrong class
            np.array([[2, 2, 6, 6]]),      # IoU 4/28 < 0.5
            np.array([[0, 0, 5, 5]])]      # false positive on background
    true_labels = [["lung_nodule", "liver_mass"], ["lung_nodule"], []]
    pred_labels = [["lung_nodule", "lung_nodule", "kidney_mass"], ["lung_nodule"],
                   ["liver_mass"]]
    sizes = [[5.0, 12.0], [2.0], []]
    r = box_recall(pred, true, 0.5, pred_labels=pred_labels, true_labels=true_labels,
                   true_sizes_mm=sizes)
    assert (r["n_true"], r["n_pred"], r["tp"], r["tp_class_aware"]) == (3, 5, 2, 1)
    assert r["recall"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(2 / 5)
    assert r["recall_class_aware"] == pytest.approx(1 / 3)
    assert r["precision_class_aware"] == pytest.approx(1 / 5)
    assert r["by_class"] == {
        "liver_mass": {"n_true": 1, "recall": 1.0, "recall_class_aware": 0.0},
        "lung_nodule": {"n_true": 2, "recall": 0.5, "recall_class_aware": 0.5}}
    assert r["by_size"] == {
        "ge_10mm": {"n_true": 1, "recall": 1.0, "recall_class_aware": 0.0},
        "lt_10mm": {"n_true": 2, "recall": 0.5, "recall_class_aware": 0.5}}
    # stricter IoU: the 0.6 match is lost; no truths → None, not a division error
    assert box_recall(pred, true, 0.75)["recall"] == pytest.approx(1 / 3)
    empty = box_recall([np.zeros((0, 4))], [np.zeros((0, 4))])
    assert empty["recall"] is None and empty["precision"] is None
    nan = box_recall([np.zeros((0, 4))], [np.array([[0, 0, 1, 1]])], true_sizes_mm=[[np.nan]])
    assert nan["by_size"]["unknown"] == {"n_true": 1, "recall": 0.0}


@pytest.mark.parametrize("argv, flag", [
    ([], "SOURCE/--corpus"),
    (["--corpus", "{tmp}", "--imgsz", "100"], "--imgsz"),
    (["--corpus", "{tmp}", "--epochs", "0"], "--epochs"),
    (["--corpus", "{tmp}", "--batch", "0"], "--batch"),
    (["--corpus", "{tmp}", "--device", "tpu"], "--device"),
    (["--corpus", "{tmp}", "--model", "missing.pt"], "--model"),
    (["--corpus", "{tmp}", "--patience", "-1"], "--patience"),
    (["--corpus", "{tmp}/nope"], "--corpus"),
])
def test_flags_validated(tmp_path, capsys, argv, flag):
    (tmp_path / "images").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": {}}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert flag in capsys.readouterr().err


def make_corpus(root: Path) -> Path:
    """Images + regions shards (pipeline.write schemas): 4 patients, bright squares = nodules."""
    rng = np.random.default_rng(0)
    images, regions = [], []
    for p, split in enumerate(("train", "train", "val", "test")):
        for k in range(4):
            image_id = f"p{p}-s{k}"
            x0, y0 = (int(v) for v in rng.integers(4, 40, 2))
            s = int(rng.integers(8, 20))
            squares = [(x0, y0, x0 + s, y0 + s)] if k < 3 else []
            images.append(image_row(image_id, f"P{p}", split, h=64, w=64, squares=squares,
                                    modality="CT", plane="axial", slice_index=k))
            regions.append(region_row(image_id, "liver", [0, 0, 64, 64], split=split))
            for sq in squares:
                regions.append(region_row(image_id, "lung_nodule", sq, split=split,
                                          max_diameter_mm=s * 0.5 * 2 ** 0.5))
    marker = commit_shard(root, "shard-00000", {"images": images, "regions": regions})
    (root / "manifest.json").write_text(json.dumps({"shards": {"shard-00000": marker}}))
    return root


def test_classes_absent_from_corpus(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "run"),
                 "--classes", "spleen_mass"]) == 2
    assert "--classes spleen_mass" in capsys.readouterr().err


def test_train_detector_one_epoch_smoke(tmp_path, monkeypatch, capsys):
    attempts = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or 1 / 0)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: attempts.append(a) or 1 / 0)
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    rc = main(["--corpus", str(corpus), "--out", str(run), "--epochs", "1", "--imgsz", "64",
               "--batch", "4", "--device", "cpu", "--conf", "0.001"])
    assert rc == 0
    assert attempts == []
    weights = run / "weights" / "detector.pt"
    assert weights.is_file()
    m = json.loads((run / "metrics.json").read_text())
    assert m["classes"] == ["lung_nodule"]  # default: lesion-like labels only
    assert m["epochs_run"] == 1 and m["imgsz"] == 64 and m["train_time_s"] > 0
    assert m["test_images"] == 4 and m["test_patients"] == 1
    assert 0.0 <= m["map50"] <= 1.0
    rec = m["box_recall"]
    assert rec["n_true"] == 3 and set(rec["by_size"]) == {"ge_10mm", "lt_10mm"}
    assert m["counts"]["train"]["positive"] == 6 and m["counts"]["test"]["background"] == 1
    assert m["machine"]["cpu_count"] >= 1
    captured = capsys.readouterr()
    assert str(weights) in captured.out and "metrics.json" in captured.out
    assert "[detector] 1/1 (" in captured.err and "\r" not in captured.err  # the epochs bar
    # ultralytics' own plots, drawn offline (matplotlib Agg; no font download)
    assert set(m["plots"]) >= {"pr_curve", "confusion_matrix"}
    for path in m["plots"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(path).parent == run / "train"

    from pipeline.roi.detect import Detector, DetectorConfig

    det = Detector(DetectorConfig(weights=weights))
    assert det.imgsz == 64  # the checkpoint's training size
    assert set(det.labels.values()) == {"lung_nodule"}


def iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The former iou_matrix in numpy (clipped areas, 0 where the union is empty)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@st.composite
def xyxy_boxes(draw):
    """N×4 XYXY boxes with x1 >= x0, y1 >= y0 (zero-area ones included), pixel coordinates."""
    n = draw(st.integers(0, 8))
    coord = st.integers(0, 64).map(float) | st.floats(0, 512, allow_nan=False)
    xy = draw(hnp.arrays(np.float64, (n, 2), elements=coord))
    wh = draw(hnp.arrays(np.float64, (n, 2), elements=st.sampled_from([0.0, 1.0, 7.5]) | coord))
    return np.hstack([xy, xy + wh])


@settings(max_examples=300, deadline=None)
@given(xyxy_boxes(), xyxy_boxes())
def test_iou_matrix_equals_the_former_numpy(a, b):
    got = iou_matrix(a, b)
    assert got.shape == (len(a), len(b)) and got.dtype == np.float64
    np.testing.assert_allclose(got, iou_numpy(a, b), rtol=1e-12, atol=1e-12)
