"""Fixtures: a 4-patient phantom corpus (built once per session) and a micro preset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("REGIONCORPUS_KEY", "test-key-not-secret-0123456789")

MICRO = {
    "image": {"image_size": 64, "patch_size": 16, "width": 64, "depth": 2, "heads": 2},
    "text": {"hidden": 64, "layers": 1, "heads": 2, "intermediate": 128, "max_len": 32,
             "vocab_size": 400},
    "prompt": {"points_per_region": 2, "mask_hidden": 8},
    "roi": {"roi_size": 32, "context": 0.5, "layers": 1},
    "model": {"embed_dim": 32, "region_text_proj": True},  # as the presets
    "data": {"batch": 8, "regions_per_image": 3, "negatives_per_region": 3, "workers": 0,
             "shuffle_buffer": 32},
    "loss": {"grounding_weight": 1.0},
    "train": {"stage_steps": [2, 2, 4], "lr": 2e-3, "warmup_steps": 2, "log_every": 1,
              "ckpt_every": 4},
}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    from pipeline.phantoms.studies import make_phantoms
    from workflows.build_corpus import main as build_main

    root = tmp_path_factory.mktemp("model_corpus")
    make_phantoms(root / "ph", patients=4, seed=0)
    rc = build_main([str(root / "ph"), "--out", str(root / "corpus"), "--every-k", "0",
                     "--workers", "2"])
    assert rc == 0
    return root / "corpus"


@pytest.fixture(scope="session")
def micro_preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "micro.json"
    path.write_text(json.dumps(MICRO))
    return path
