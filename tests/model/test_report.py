"""The evaluation report: REPORT.md and REPORT.html render every section from a report dict made
by the real metric functions on synthetic embeddings (two runs side by side, counts everywhere,
labels escaped); a headless Chromium loads every plot (naturalWidth > 0) and sees a broken one."""

from __future__ import annotations

import html
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser import images_in_chromium

from model import metrics as m
from model.report import DIRECTIONS, markdown, write_html

LABELS = ["<b>kidney</b>", "aorta", "liver", "lung_nodule", "spleen"]  # one needs escaping


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _run(rng, signal: float, n_img=40, n_reg=120) -> dict:
    """One run's results from the metric functions: region embeddings pulled towards their
    label's prompt by ``signal``."""
    prompts = _unit(rng, len(LABELS))
    target = rng.integers(0, len(LABELS) - 1, n_reg)  # the last label has no region
    reg = _unit(rng, n_reg) + signal * prompts[target]
    reg /= np.linalg.norm(reg, axis=1, keepdims=True)
    img = _unit(rng, n_img)
    truth = rng.random((n_img, len(LABELS))) < 0.3
    lat = rng.standard_normal((50, 2))
    texts = _unit(rng, 25)
    key = np.arange(n_img) % 25
    caps = _unit(rng, 30)
    ckey = np.arange(n_reg) % 30
    return {
        "region_zero_shot": {"labels": LABELS, **m.single_label(
            m.EmbeddingScores(reg, prompts), target)},
        "laterality_zero_shot": {"labels": ["left", "right"], **m.single_label(
            lat, rng.integers(0, 2, 50)), "bilateral_labels": {"labels": ["lung_nodule"],
                                                               **m.single_label(lat[:9], np.ones(9, int))}},
        "image_zero_shot": m.multi_label(m.EmbeddingScores(img, prompts), truth),
        "retrieval": {
            "image_to_report": m.retrieval_recall(img, texts, key, np.arange(25)),
            "report_to_image": m.retrieval_recall(texts, img, np.arange(25), key),
            "region_to_caption": m.retrieval_recall(reg, caps, ckey, np.arange(30)),
            "caption_to_region": m.retrieval_recall(caps, reg, np.arange(30), ckey)},
        "run": "runs/x", "n_images": n_img, "n_regions": n_reg}


def synthetic_report(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"split": "test", "corpus": "corpus", "region_aware": _run(rng, 0.6),
            "global_only": _run(rng, 0.2)}


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _srcs(page: Path) -> list[str]:
    p = _Imgs()
    p.feed(page.read_text(encoding="utf-8"))
    return p.srcs


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    rep = synthetic_report()
    out = tmp_path_factory.mktemp("report") / "eval.html"
    json.dumps(rep)  # the dict is what REPORT.json holds
    return write_html(rep, out)


def test_html_has_every_section_and_counts(report_html):
    page = report_html.read_text(encoding="utf-8")
    rep = synthetic_report()
    for title in ("Headline", "Region zero-shot per class", "Confusion matrices",
                  "ROC per class", "Retrieval"):
        assert f"<h2>{title}" in page
    assert "<th>region-aware</th><th>global-only</th><th>n</th>" in page
    zs = rep["region_aware"]["region_zero_shot"]
    for c, label in enumerate(LABELS[:-1]):  # the label without regions has no row
        support = zs["per_class"]["support"][c]
        row = f"<tr><td>{html.escape(label)}</td><td>{support}</td>"
        assert row in page, label
    assert "<b>kidney</b>" not in page  # escaped, not markup
    r = rep["region_aware"]["retrieval"]["caption_to_region"]
    assert f"{r['queries']} queries, gallery {r['gallery']}" in page
    assert "40 images, 120 regions" in page
    srcs = _srcs(report_html)
    assert sorted(srcs) == sorted(f"eval_files/{n}" for n in (
        "per_class.png", "roc.png", "retrieval.png", "confusion-1.png", "confusion-2.png"))
    assert all((report_html.parent / s).stat().st_size > 5000 for s in srcs)


def test_markdown_has_counts_and_per_class_rows():
    rep = synthetic_report()
    md = markdown(rep)
    lines = md.splitlines()
    assert lines[0] == "| metric | region_aware | global_only | n |"
    zs = rep["global_only"]["region_zero_shot"]
    acc = rep["region_aware"]["region_zero_shot"]["accuracy"]
    assert f"| region_zero_shot accuracy | {acc:.3f} | " in md
    assert f"| {zs['n']} |" in md
    for d in DIRECTIONS:
        r = rep["region_aware"]["retrieval"][d]
        assert f"| {d} R10 | {r['r10']:.3f} | " in md
    assert sum(line.startswith("| aorta | ") for line in lines) == 1
    assert "40 images, 120 regions." in md


def test_every_plot_loads_in_headless_chromium(report_html, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(report_html.parent, copy)
    page = copy / report_html.name
    results = images_in_chromium(page, tmp_path / "profile")
    assert [src for src, _, _ in results] == _srcs(page) and len(results) == 5
    for src, complete, width in results:
        assert complete and width > 0, src
    # the probe does see a broken plot
    (copy / "eval_files" / "roc.png").unlink()
    broken = [s for s, _, w in images_in_chromium(page, tmp_path / "profile") if not w]
    assert broken == ["eval_files/roc.png"]
