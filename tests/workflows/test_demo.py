"""The demo's closing report: each step, its headline number and where it is; a detector that
finds fewer than half of the lesions >= 10 mm is said to only exercise the route."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline.write
from workflows import demo


def detector_metrics(recall_big: float) -> dict:
    return {"epochs_run": 4, "map50": 0.0123, "box_recall": {
        "recall": 0.1, "tp": 1, "n_true": 10,
        "by_size": {"ge_10mm": {"n_true": 8, "recall": recall_big},
                    "lt_10mm": {"n_true": 2, "recall": 0.0}}}}


def demo_folder(root: Path, recall_big: float) -> Path:
    (root / "runs" / "detector").mkdir(parents=True)
    (root / "runs" / "detector" / "metrics.json").write_text(
        json.dumps(detector_metrics(recall_big)))
    (root / "corpus").mkdir()
    (root / "corpus" / "build_summary.json").write_text(json.dumps(
        {"found": 120, "ingested": 110, "quarantined": 3,
         "rows": {"series": 9, "images": 700, "regions": 1800}}))
    (root / "reports").mkdir()
    run = {"region_zero_shot": {"accuracy": 0.741}, "image_zero_shot": {"auc": 0.9},
           "retrieval": {"image_to_report": {"r5": 0.5}}}
    (root / "reports" / "evaluation.json").write_text(json.dumps(
        {"region_aware": run, "global_only": {**run, "region_zero_shot": {"accuracy": 0.069}}}))
    return root


@pytest.fixture
def regions(monkeypatch):
    rows = [{"source": "labels"}] * 3 + [{"source": "boxes"}]
    monkeypatch.setattr(pipeline.write, "read_table", lambda corpus, table, cols=None: rows)


@pytest.mark.parametrize("recall_big, plain", [(0.0, True), (0.49, True), (0.5, False)])
def test_closing_report_names_each_step_and_its_number(tmp_path, regions, recall_big, plain):
    text = demo.closing_report(demo_folder(tmp_path, recall_big), 8, {"make-phantoms": 1.2})
    for step in ("make-phantoms", "train-detector", "build-corpus", "train-model",
                 "--global-only", "evaluate-model", "browse-catalog"):
        assert f"  {step} " in text
    assert "mAP50 0.012" in text and f"lesions >= 10 mm {recall_big:.2f} of 8" in text
    assert "9 series, 700 images, 1800 regions (1 boxes, 3 labels)" in text
    assert "region zero-shot accuracy 0.741" in text and "accuracy 0.069" in text
    assert str(tmp_path / "gallery" / "index.html") in text
    assert ("only exercises the detector route" in text) is plain
    assert ("docs/benchmarks.md" in text) is plain


def test_closing_report_survives_missing_results(tmp_path, regions):
    text = demo.closing_report(tmp_path, 8, {})
    assert "only exercises the detector route" in text and "n/a" in text


def test_closing_report_without_a_corpus(tmp_path):
    text = demo.closing_report(tmp_path, 8, {})
    assert "? series, ? images, ? regions ()" in text
