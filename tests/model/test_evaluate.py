"""evaluate-model end to end on the 4-patient phantom corpus: a region-aware run and its
global-only baseline (a few micro steps each) give REPORT.json with per-class counts, R@K curves
and the confusion matrix, REPORT.md and REPORT.html with its plots, which headless Chromium
loads."""

from __future__ import annotations

import json

import pytest
from browser import images_in_chromium

from model.train import TrainOptions, train
from workflows.evaluate_model import main as eval_main


@pytest.fixture(scope="module")
def evaluation(tiny_corpus, micro_preset, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    for name, only in (("run", False), ("base", True)):
        train(TrainOptions(corpus=tiny_corpus, out=root / name, preset=str(micro_preset),
                           steps=4, ckpt_every=100, global_only=only))
    out = root / "reports" / "eval.json"
    assert eval_main(["--corpus", str(tiny_corpus), "--run", str(root / "run"), "--baseline",
                      str(root / "base"), "--out", str(out)]) == 0
    return out


def test_report_json_has_counts_and_curves(evaluation):
    rep = json.loads(evaluation.read_text())
    assert set(rep) >= {"region_aware", "global_only", "split"}
    for kind in ("region_aware", "global_only"):
        r = rep[kind]
        zs = r["region_zero_shot"]
        c = len(zs["labels"])
        assert len(zs["confusion"]) == c and all(len(row) == c for row in zs["confusion"])
        assert sum(zs["per_class"]["support"]) == zs["n"] == r["n_regions"] > 0
        assert sum(map(sum, zs["confusion"])) == zs["n"]
        assert zs["accuracy"] == pytest.approx(sum(zs["per_class"]["correct"]) / zs["n"])
        for roc in zs["roc"]:
            assert roc is None or (roc["fpr"][0] == 0 and roc["tpr"][-1] == 1)
        for d, res in r["retrieval"].items():
            assert len(res["curve"]) == 50, d
            assert res["curve"][0] == pytest.approx(res["r1"], abs=1e-6), d
            assert res["curve"] == sorted(res["curve"]) and res["queries"] > 0
        assert r["retrieval"]["image_to_report"]["queries"] == r["n_images"]
        assert r["retrieval"]["region_to_caption"]["queries"] == r["n_regions"]


def test_report_md_and_html_beside_the_json(evaluation, tmp_path):
    md = evaluation.with_suffix(".md").read_text()
    assert md.startswith("| metric | region_aware | global_only | n |")
    page = evaluation.with_suffix(".html")
    assert "<th>region-aware</th><th>global-only</th><th>n</th>" in page.read_text()
    results = images_in_chromium(page, tmp_path / "profile")
    assert len(results) == 5
    for src, complete, width in results:
        assert src.startswith("eval_files/") and complete and width > 0, src
