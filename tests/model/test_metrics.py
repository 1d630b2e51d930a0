"""auc_binary (scipy ranks) equals the hand-written rank loop it replaced and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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


def test_auc_degenerate_inputs():
    assert auc_binary(np.array([]), np.array([], bool)) is None
    assert auc_binary(np.array([0.3, 0.1]), np.array([1, 1])) is None
    assert auc_binary(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert auc_binary(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
