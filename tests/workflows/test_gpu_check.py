"""workflows.gpu_check: refuses cleanly without CUDA; a CPU dry run prints the JSON it prints on
a GPU (per segmenter: images/s, encoder batch, images per call, busy fractions; YOLO images/s)."""

from __future__ import annotations

import json
from unittest import mock

import pytest

from workflows import gpu_check


@pytest.mark.parametrize("argv", [[], ["--device", "cuda:0"], ["--device", "mps"]])
def test_refuses_without_cuda(argv, capsys):
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: error: --device")


@pytest.mark.parametrize("argv", [["--images", "0"], ["--encoder-batch", "0"],
                                  ["--encoder-batch", "257"], ["--shard-images", "0"]])
def test_refuses_bad_numbers(argv, capsys):
    assert gpu_check.main(["--device", "cpu", *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cpu_dry_run_prints_the_json(capsys, monkeypatch):
    from tests.pipeline.roi.test_segment import tiny_sam_parts

    monkeypatch.setattr(gpu_check, "sam_vit_b_parts", lambda checkpoint: tiny_sam_parts())
    argv = ["--device", "cpu", "--images", "4", "--encoder-batch", "2", "--shard-images", "4"]
    assert gpu_check.main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["device"] == "cpu" and record["image_size"] == [512, 512]
    names = [s["segmenter"] for s in record["segmenters"]]
    assert names == ["lite-medsam", "tiny-sam"]
    for s in record["segmenters"]:
        assert s["images"] == 4 and s["encoder_batch"] == 2
        assert s["encoder_images_per_call"] == 2.0 and s["images_per_s"] > 0
        assert s["actor_cpu_ms_per_image"] >= 0
        assert s["gpu_busy_events"] is None and s["gpu_busy_nvml"] is None
    assert record["yolo"]["images"] == 4 and record["yolo"]["images_per_s"] > 0
