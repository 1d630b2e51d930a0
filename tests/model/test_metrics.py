"""auc_binary (scikit-learn) equals the hand-written rank loop it replaced; the blocked zero-shot
and retrieval metrics (running top-k, one class column at a time) equal the dense ones they
replaced (an (items × gallery) matrix and a full argsort) on random embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from model import metrics as m
from model.metrics import auc_binary


def auc_loop(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The former implementation: ranks averaged over ties by a Python loop."""
    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), float)
    s = scores[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@st.composite
def scored_labels(draw):
    n = draw(st.integers(0, 60))
    # few distinct values (many ties) or any finite float
    elements = draw(st.sampled_from([st.integers(-3, 3).map(float),
                                     st.floats(-1e6, 1e6, allow_nan=False)]))
    scores = draw(hnp.arrays(np.float64, n, elements=elements))
    labels = draw(hnp.arrays(np.bool_, n))
    return scores, labels


@settings(max_examples=300, deadline=None)
@given(scored_labels())
def test_auc_equals_the_former_loop(case):
    scores, labels = case
    new, old = auc_binary(scores, labels), auc_loop(scores, labels)
    if old is None:
        assert new is None
    else:
        assert new == pytest.approx(old, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(scored_labels())
def test_auc_equals_scikit_learn(case):
    metrics = pytest.importorskip("sklearn.metrics")
    scores, labels = case
    new = auc_binary(scores, labels)
    if labels.all() or not labels.any():
        assert new is None  # sklearn raises here; the evaluator skips the class
    else:
        assert new == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(scored_labels())
def test_roc_curve_area_equals_the_rank_auc(case):
    """roc_points' AUC (area under every corner of sklearn's curve) is the rank-sum AUC, ties
    included; the kept points run from (0, 0) to (1, 1)."""
    scores, labels = case
    roc, rank = m.roc_points(scores, labels, points=5), auc_binary(scores, labels)
    if rank is None:
        assert roc is None
    else:
        assert roc["auc"] == pytest.approx(rank, abs=1e-12)
        assert len(roc["fpr"]) <= 5 and (roc["fpr"][0], roc["tpr"][0]) == (0, 0)
        assert (roc["fpr"][-1], roc["tpr"][-1]) == (1, 1)


def test_auc_degenerate_inputs():
    assert auc_binary(np.array([]), np.array([], bool)) is None
    assert auc_binary(np.array([0.3, 0.1]), np.array([1, 1])) is None
    assert auc_binary(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert auc_binary(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


# -- the dense implementations the blocked ones replaced (verbatim, as references) ---------------

def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def old_single_label(scores, target):
    pred = scores.argmax(1)
    recalls = [float((pred[target == c] == c).mean()) for c in np.unique(target)]
    prob = _softmax(scores * 100.0)
    truth = np.eye(scores.shape[1], dtype=bool)[target]
    return {"accuracy": float((pred == target).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "auc": m.macro_auc(prob, truth), "n": int(len(target))}


def old_multi_label(scores, truth):
    k = truth.sum(1)
    order = np.argsort(-scores, axis=1)
    pred = np.zeros_like(truth)
    for i in range(len(scores)):
        pred[i, order[i, : k[i]]] = True
    hit = (pred & truth).sum(1) / np.maximum(k, 1)
    bal = []
    for c in range(truth.shape[1]):
        t = truth[:, c]
        if t.any() and (~t).any():
            bal.append(0.5 * (pred[t, c].mean() + (~pred[~t, c]).mean()))
    return {"accuracy": float(hit[k > 0].mean()) if (k > 0).any() else None,
            "balanced_accuracy": float(np.mean(bal)) if bal else None,
            "auc": m.macro_auc(scores, truth), "n": int(len(scores))}


def old_recall_at(sim, relevant, ks=(1, 5, 10)):
    order = np.argsort(-sim, axis=1)
    rel_sorted = np.take_along_axis(relevant, order, axis=1)
    first = np.where(rel_sorted.any(1), rel_sorted.argmax(1), sim.shape[1] + 1)
    return {f"r{k}": float((first < k).mean()) for k in ks} | {"queries": int(len(sim)),
                                                               "gallery": int(sim.shape[1])}


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks far smaller than the inputs, so every loop runs many times (and unevenly)."""
    monkeypatch.setattr(m, "ROWS", 12)
    monkeypatch.setattr(m, "GALLERY", 7)


@pytest.mark.parametrize("seed", range(6))
def test_blocked_zero_shot_equals_the_dense_one(seed, small_blocks):
    rng = np.random.default_rng(seed)
    # d = 512: cosines within about ±0.15, so softmax(100 · cosine) stays below 1 in float64
    n, c, d = int(rng.integers(30, 150)), int(rng.integers(2, 9)), 512
    x, prompts = _unit(rng, n, d), _unit(rng, c, d)
    target = rng.integers(0, c, n)
    target[: c - 1] = np.arange(c - 1)  # most classes present, the last one maybe not
    src = m.EmbeddingScores(x, prompts)
    scores = np.stack([src.column(k).numpy() for k in range(c)], 1)
    assert scores == pytest.approx(x.astype(np.float64) @ prompts.T.astype(np.float64), abs=1e-6)
    assert np.array_equal(np.concatenate([b.numpy() for _, b in src.blocks()]), scores)
    # the former dense algorithm on the same scores, its softmax in float64 (in float32 it
    # rounds confident rows to 1.0 and ties them; the new one ranks by log-probabilities)
    old = old_single_label(scores, target)
    new = m.single_label(src, target)
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert new[key] == pytest.approx(old[key], abs=1e-6), key
    assert new["n"] == old["n"] == n
    assert sum(new["per_class"]["support"]) == n == np.sum(new["confusion"])
    assert new["per_class"]["correct"] == np.diag(new["confusion"]).tolist()
    # multi-label: 0..3 labels per item
    truth = rng.random((n, c)) < rng.uniform(0.1, 0.5)
    old = old_multi_label(scores, truth)
    new = m.multi_label(src, truth)
    assert new == pytest.approx(old, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_blocked_retrieval_equals_the_dense_one(seed, small_blocks):
    """Items → distinct texts (one relevant each) and texts → items (all items with the text)."""
    rng = np.random.default_rng(seed)
    n, g, d = int(rng.integers(20, 120)), int(rng.integers(3, 40)), 32
    items, texts = _unit(rng, n, d), _unit(rng, g, d)
    key = rng.integers(0, g, n)
    key[:g] = rng.permutation(g)  # every text has an item
    rel = np.zeros((n, g), bool)
    rel[np.arange(n), key] = True
    ks = (1, 2, 5, 10)
    for q, gal, qk, gk, r in [(items, texts, key, np.arange(g), rel),
                              (texts, items, np.arange(g), key, rel.T)]:
        old = old_recall_at(q @ gal.T, r, ks)
        new = m.retrieval_recall(q, gal, qk, gk, ks)
        assert {k: new[k] for k in old} == pytest.approx(old, abs=1e-12)
        assert new["curve"][0] == pytest.approx(new["r1"], abs=1e-6)
        assert new["curve"][9] == pytest.approx(new["r10"], abs=1e-6)
        assert new["curve"][-1] == 1.0 or len(gal) > m.CURVE_K
        dense = m.recall_at(q @ gal.T, r, ks)
        assert dense.pop("curve") == pytest.approx(new.pop("curve"))
        assert dense == pytest.approx(new)


def test_retrieval_query_without_relevant_item_never_counts():
    q, gal = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    r = m.retrieval_recall(q, gal, np.array([0, 1, 7]), np.array([0, 1, 2]), ks=(1, 5))
    assert r["r1"] == r["r5"] == pytest.approx(2 / 3) and r["curve"][-1] == pytest.approx(2 / 3)
