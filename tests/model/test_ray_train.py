"""Ray Train launcher (``train-model --address``) against torchrun: same ranks, same losses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model.checkpoint import load_checkpoint
from model.trainlog import read_log
from workflows.train_model import main as train_main


def _losses(run) -> list[tuple[int, float, int]]:
    return [(r["step"], r["loss"], r["stage"]) for r in read_log(run / "log.jsonl")]


def test_ray_train_two_workers_matches_torchrun(tiny_corpus, micro_preset, tmp_path, monkeypatch):
    """4 steps on 2 ranks (gloo): through an embedded Ray with Ray Train's TorchTrainer and
    through torchrun; both deal the shards per rank and gather features across ranks, so the
    logged losses agree step for step."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    common = ["--corpus", str(tiny_corpus), "--preset", str(micro_preset), "--steps", "4"]
    ray_run = tmp_path / "ray"
    assert train_main(common + ["--out", str(ray_run), "--address", "local",
                                "--ray-workers", "2"]) == 0
    tr_run = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "-m", "workflows.train_model", *common, "--out", str(tr_run)],
                   check=True, env=env, capture_output=True, timeout=300)
    a, b = _losses(ray_run), _losses(tr_run)
    assert [s for s, _, _ in a] == [1, 2, 3, 4] and {g for _, _, g in a} == {1, 2, 3}
    for (sa, la, _), (sb, lb, _) in zip(a, b, strict=True):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    ck = load_checkpoint(ray_run)
    assert ck["step"] == 4 and set(ck["data"]) == {0, 1}  # both ranks' data positions
