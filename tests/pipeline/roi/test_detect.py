"""Detector stage: ultralytics offline, letterbox geometry, batched predict on a tiny YOLO."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

from pipeline.roi.detect import Detector, DetectorConfig, ultralytics_offline


@pytest.fixture
def no_network(monkeypatch):
    """Any DNS lookup or socket connect is recorded and fails; the test fails if one happened."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    yield attempts
    assert attempts == [], f"network was touched: {attempts}"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A randomly initialised yolov8n saved as an ultralytics checkpoint (.pt)."""
    ul = ultralytics_offline(tmp_path_factory.mktemp("ultralytics-config"))
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    ul.YOLO("yolov8n.yaml").save(path)
    return path


@pytest.mark.parametrize("imgsz", [256, 640])
@pytest.mark.parametrize("shape", [(300, 500), (457, 123)])
def test_letterbox_round_trip(imgsz, shape):
    ultralytics_offline()
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.ops import scale_boxes

    h, w = shape
    img = np.full((h, w, 3), 200, np.uint8)
    x0, y0, x1, y1 = round(0.2 * w), round(0.3 * h), round(0.6 * w), round(0.7 * h)
    img[y0:y1, x0:x1] = 250  # a box at a known place: pixels [x0, x1) x [y0, y1)
    lb = LetterBox((imgsz, imgsz), auto=False, stride=32)
    params = lb.get_params({"img": img})
    out = lb(image=img.copy())
    assert out.shape[:2] == (imgsz, imgsz)

    # (1) the whole frame: its letterboxed place is read from the pixels (padding is 114)
    rows, cols = np.nonzero(out[:, :, 0] != 114)
    frame = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], np.float64)
    back = scale_boxes(out.shape[:2], frame.copy(), (h, w))
    np.testing.assert_allclose(back, [[0, 0, w, h]], atol=1e-3)

    # (2) the inner box through LetterBox's resize + pad, then ultralytics' scale_boxes
    nw, nh = params["new_unpad"]
    sx, sy = nw / w, nh / h
    fwd = np.array([[x0 * sx + params["left"], y0 * sy + params["top"],
                     x1 * sx + params["left"], y1 * sy + params["top"]]])
    back = scale_boxes(out.shape[:2], fwd.copy(), (h, w))
    np.testing.assert_allclose(back, [[x0, y0, x1, y1]], atol=1e-3)

    # (3) that forward map is where the resized pixels really put the box: its intensity
    # centroid (pixel centres at c + 0.5) maps back onto the original centroid, within 0.1
    # letterboxed pixel (bilinear downscaling is not exactly mass-preserving); a half-pixel
    # convention error would be off by 0.5 * |1/scale - 1| original pixels
    inner = out[:, :, 0].astype(np.float64) - 200
    inner[inner < 0] = 0
    r, c = np.indices(inner.shape)
    cx, cy = ((c + 0.5) * inner).sum() / inner.sum(), ((r + 0.5) * inner).sum() / inner.sum()
    cent = scale_boxes(out.shape[:2], np.array([[cx, cy, cx, cy]]), (h, w))[0, :2]
    np.testing.assert_allclose(cent, [(x0 + x1) / 2, (y0 + y1) / 2], atol=0.1 / min(sx, sy))


def test_detector_batched_predict(tiny_weights, no_network):
    assert os.environ["YOLO_OFFLINE"] == "1"
    det = Detector(DetectorConfig(weights=tiny_weights, conf=0.0, imgsz=64, batch=8))
    assert len(det.checkpoint_sha256) == 64
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 70), np.uint8), rng.integers(0, 255, (64, 64, 3), np.uint8),
              rng.integers(0, 255, (96, 50), np.uint8)]
    calls = []
    predict = det.model.predict
    det.model.predict = lambda src, **kw: calls.append(len(src)) or predict(src, **kw)
    out = det.predict(images)
    assert calls == [3]  # one batched call
    assert len(out) == 3
    for (boxes, scores, labels), im in zip(out, images, strict=True):
        h, w = im.shape[:2]
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
        assert scores.dtype == np.float32 and scores.shape == (len(boxes),)
        assert len(labels) == len(boxes) > 0 and all(isinstance(x, str) for x in labels)
        assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= w).all()
        assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= h).all()
    grey = images[0]
    (b1, s1, _), (b3, s3, _) = det.predict([grey, np.repeat(grey[:, :, None], 3, axis=2)])
    np.testing.assert_array_equal(b1, b3)
    np.testing.assert_array_equal(s1, s3)
    assert det.predict([]) == []


def test_detector_class_map(tiny_weights, no_network):
    det = Detector(DetectorConfig(weights=tiny_weights, conf=0.0, imgsz=64,
                                  class_map={"0": "lung_nodule"}))  # yaml models name classes "0", "1", ...
    assert det.labels[0] == "lung_nodule" and det.labels[1] == "1"
    _, _, labels = det.predict([np.zeros((64, 64), np.uint8)])[0]
    assert set(labels) <= set(det.labels.values())
    assert det.imgsz == 64


def test_detector_missing_weights(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="--detector") as err:
        Detector(DetectorConfig(weights=missing))
    assert str(missing) in str(err.value)


def test_detector_rejects_bad_images(tiny_weights):
    det = Detector(DetectorConfig(weights=tiny_weights, imgsz=64))
    with pytest.raises(ValueError, match="uint8"):
        det.predict([np.zeros((8, 8), np.float32)])
    with pytest.raises(ValueError, match="shape"):
        det.predict([np.zeros((8, 8, 4), np.uint8)])
