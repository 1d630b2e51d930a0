"""The trainer and the evaluator read a compacted corpus as built: the committed files come
from the manifest (compact shards included), never from a glob over ``images/shard-*``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.config import DataConfig
from model.data import CorpusIndex, RegionCorpus


@pytest.fixture(scope="module")
def compacted(tiny_corpus, tmp_path_factory) -> Path:
    """The tiny corpus's phantoms built one series per shard, then compacted."""
    from catalogs import jobs
    from workflows.build_corpus import main as build_main

    out = tmp_path_factory.mktemp("compacted") / "corpus"
    assert build_main([str(tiny_corpus.parent / "ph"), "--out", str(out), "--every-k", "0",
                       "--units-per-shard", "1", "--workers", "2"]) == 0
    report = jobs.compact(out, scheduler="synchronous")
    assert len(report["groups"]["compact-00000"]) >= 2
    assert not list((out / "images").glob("shard-*"))  # the built files are gone
    return out


def _pass(corpus: CorpusIndex) -> list[dict]:
    """One evaluation pass over every split: the rows the trainer's reader yields."""
    return [row for split in ("train", "val", "test")
            for row in RegionCorpus(corpus, split, DataConfig(), 64, train=False)
            ._epoch_rows(0, 1, 0)]


def test_reader_yields_exactly_the_manifest_rows(compacted):
    manifest = json.loads((compacted / "manifest.json").read_text())
    c = CorpusIndex.open(compacted)
    assert [img.name for img, _ in c.shards] == ["compact-00000.parquet"]
    rows = _pass(c)
    assert len(rows) == len({r["image_id"] for r in rows}) == manifest["rows"]["images"]
    regions = [g["region_id"] for r in rows for g in r["regions"]]
    assert len(regions) == len(set(regions)) == manifest["rows"]["regions"] > 0


def test_train_and_evaluate_on_a_compacted_corpus(compacted, micro_preset, tmp_path):
    from model.train import TrainOptions, train
    from workflows.evaluate_model import main as eval_main

    run = tmp_path / "run"
    train(TrainOptions(corpus=compacted, out=run, preset=str(micro_preset), steps=2,
                       ckpt_every=100))
    out = tmp_path / "eval.json"
    assert eval_main(["--corpus", str(compacted), "--run", str(run), "--out", str(out)]) == 0
    report = json.loads(out.read_text())["region_aware"]
    assert report["n_images"] > 0 and report["n_regions"] > 0
