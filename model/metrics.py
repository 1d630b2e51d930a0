"""Zero-shot and retrieval metrics in numpy (ranks by scipy)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc_binary(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of scores (N,) for the boolean labels positive (N,) by the rank-sum
    (Mann-Whitney) statistic, tied scores sharing their mean rank (``scipy.stats.rankdata``;
    equal to ``sklearn.metrics.roc_auc_score``); None if only one class is present."""
    pos = np.asarray(positive).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean one-vs-rest AUC over columns of scores (N, C) and boolean truth (N, C)."""
    aucs = [auc_binary(scores[:, c], truth[:, c]) for c in range(scores.shape[1])]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def single_label(scores: np.ndarray, target: np.ndarray) -> dict:
    """Single-label zero-shot: scores (N, C) (cosine similarities), target (N,) class index."""
    if len(target) == 0:
        return {"accuracy": None, "balanced_accuracy": None, "auc": None, "n": 0}
    pred = scores.argmax(1)
    recalls = [float((pred[target == c] == c).mean()) for c in np.unique(target)]
    prob = _softmax(scores * 100.0)
    truth = np.eye(scores.shape[1], dtype=bool)[target]
    return {"accuracy": float((pred == target).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "auc": macro_auc(prob, truth), "n": int(len(target))}


def multi_label(scores: np.ndarray, truth: np.ndarray) -> dict:
    """Multi-label zero-shot with the label-count oracle: an image with k labels predicts its
    top-k classes. accuracy = mean per-image fraction of its labels in its top-k;
    balanced_accuracy = mean over classes of (TPR + TNR)/2 of that decision; auc = macro
    one-vs-rest AUC of the raw scores."""
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
            "auc": macro_auc(scores, truth), "n": int(len(scores))}


def recall_at(sim: np.ndarray, relevant: np.ndarray, ks=(1, 5, 10)) -> dict:
    """sim (Q, G), relevant (Q, G) bool: fraction of queries with a relevant item in the top k."""
    order = np.argsort(-sim, axis=1)
    rel_sorted = np.take_along_axis(relevant, order, axis=1)
    first = np.where(rel_sorted.any(1), rel_sorted.argmax(1), sim.shape[1] + 1)
    return {f"r{k}": float((first < k).mean()) for k in ks} | {"queries": int(len(sim)),
                                                               "gallery": int(sim.shape[1])}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
