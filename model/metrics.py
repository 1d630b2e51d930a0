"""Zero-shot and retrieval metrics, computed in blocks so memory stays flat in the gallery size.

Scores are cosine similarities of L2-normalised embeddings. Nothing here builds an
(items × gallery) similarity or relevance matrix, or sorts a whole gallery:

* classification (zero-shot) takes its scores from a :class:`ScoreSource`: either a small dense
  (N, C) matrix (:class:`DenseScores`) or embeddings (N, E) and class prompts (C, E)
  (:class:`EmbeddingScores`), multiplied one block of rows at a time on the device, and one class
  column at a time for the one-vs-rest AUC and ROC (``sklearn.metrics.roc_curve``); working memory
  is O(N) plus one block, never O(N · C).
* retrieval (:func:`retrieval_recall`) keeps a running ``torch.topk`` of each block of queries over
  blocks of the gallery; a query's relevant items are those whose key equals its key (a text query
  and every item that carries that text), so no relevance matrix exists either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from scipy import sparse
from scipy.stats import rankdata
from sklearn.metrics import auc, confusion_matrix, roc_curve

ROWS = 4096  # rows of a score block (queries or items)
GALLERY = 8192  # gallery items scored against a block of queries at once
CURVE_K = 50  # retrieval R@K curves run K = 1..CURVE_K
ROC_POINTS = 101  # at most this many (fpr, tpr) points kept per class curve
TEMPERATURE = 100.0  # single-label AUCs use softmax(TEMPERATURE · cosine), as CLIP does
MISS = 2**62  # rank given to a query with no relevant item in its top k


def _blocks(n: int, size: int) -> Iterator[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


# -- score sources --------------------------------------------------------------------------------

class DenseScores:
    """Scores given as one (N, C) float array (small inputs: laterality, tests)."""

    def __init__(self, scores: np.ndarray):
        self.scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
        self.n, self.n_classes = self.scores.shape

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, their (rows, C) float64 scores) block by block."""
        for sl in _blocks(self.n, ROWS):
            yield sl, self.scores[sl]

    def column(self, c: int) -> torch.Tensor:
        """(N,) float64 scores of class c."""
        return self.scores[:, c]


class EmbeddingScores:
    """Scores of item embeddings (N, E) against class embeddings (C, E), computed on ``device``
    one block of rows at a time. Every score is the same float32 matrix-vector product (one class
    against a block of items) in :meth:`blocks` and in :meth:`column`, so the two agree exactly
    (a matrix product and a matrix-vector product differ by ~1e-8, enough to swap two items'
    ranks); the only temporaries are one block's (rows, C) scores."""

    def __init__(self, items: np.ndarray, classes: np.ndarray, device="cpu",
                 rows: int | None = None):
        self.items = torch.as_tensor(np.asarray(items, dtype=np.float32))
        self.classes = torch.as_tensor(np.asarray(classes, dtype=np.float32), device=device)
        self.device, self.rows = device, rows or ROWS
        self.n, self.n_classes = len(self.items), len(self.classes)

    def _scores(self, sl: slice, classes: range) -> torch.Tensor:
        x = self.items[sl].to(self.device)
        return torch.stack([x @ self.classes[c] for c in classes], 1).double().cpu()

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for sl in _blocks(self.n, self.rows):
            yield sl, self._scores(sl, range(self.n_classes))

    def column(self, c: int) -> torch.Tensor:
        return torch.cat([self._scores(sl, range(c, c + 1))[:, 0]
                          for sl in _blocks(self.n, self.rows)] or [torch.zeros(0)])


ScoreSource = DenseScores | EmbeddingScores


def _source(scores) -> ScoreSource:
    return scores if isinstance(scores, DenseScores | EmbeddingScores) else DenseScores(scores)


# -- AUC and ROC ----------------------------------------------------------------------------------

def auc_binary(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of scores (N,) for the boolean labels positive (N,) by the rank-sum
    (Mann-Whitney) statistic, tied scores sharing their mean rank (``scipy.stats.rankdata``;
    equal to ``sklearn.metrics.roc_auc_score``, tested, and twice as fast: 0.48 s vs 0.91 s at
    1M scores); None if only one class is present."""
    pos = np.asarray(positive).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_points(scores: np.ndarray, positive: np.ndarray, points: int = ROC_POINTS) -> dict | None:
    """One-vs-rest ROC of scores (N,) for boolean labels (N,): ``fpr``, ``tpr`` (at most
    ``points`` of ``sklearn.metrics.roc_curve``'s corners, first and last kept) and the exact
    ``auc`` (``sklearn.metrics.auc`` over all corners: equal to :func:`auc_binary`); None if
    only one class is present."""
    pos = np.asarray(positive).astype(bool)
    if pos.all() or not pos.any():
        return None
    fpr, tpr, _ = roc_curve(pos, np.asarray(scores))
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
    return {"fpr": [round(float(x), 4) for x in fpr[keep]],
            "tpr": [round(float(x), 4) for x in tpr[keep]], "auc": float(auc(fpr, tpr))}


def macro_auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean one-vs-rest AUC over columns of scores (N, C) and boolean truth (N, C)."""
    aucs = [auc_binary(scores[:, c], truth[:, c]) for c in range(scores.shape[1])]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


# -- single-label zero-shot -----------------------------------------------------------------------

def single_label(scores, target: np.ndarray) -> dict:
    """Single-label zero-shot over scores (N, C) (a dense array or a :class:`ScoreSource`) and
    target (N,) class indices: accuracy, balanced accuracy (mean recall over the classes present),
    macro one-vs-rest AUC of softmax(100 · cosine) (ranked by its logarithm in float64: the
    float32 softmax rounds confident rows to 1.0 and ties them), n; ``per_class`` support / correct / auc,
    ``confusion`` (C × C counts, rows = truth) and ``roc`` (per class, None without both sides)."""
    target = np.asarray(target, dtype=np.int64)
    if len(target) == 0:
        return {"accuracy": None, "balanced_accuracy": None, "auc": None, "n": 0}
    src = _source(scores)
    pred = np.empty(src.n, np.int64)
    lse = torch.empty(src.n, dtype=torch.float64)
    for sl, s in src.blocks():
        pred[sl] = s.argmax(1).numpy()
        lse[sl] = torch.logsumexp(s * TEMPERATURE, 1)

    def log_prob(c: int) -> np.ndarray:  # ranks as the softmax does, without its saturation at 1
        return (src.column(c) * TEMPERATURE - lse).numpy()

    return _summary(pred, target, src.n_classes, log_prob)


def _summary(pred: np.ndarray, target: np.ndarray, n_classes: int,
             column: Callable[[int], np.ndarray]) -> dict:
    cm = confusion_matrix(target, pred, labels=np.arange(n_classes))
    support, correct = cm.sum(1), np.diag(cm)
    present = support > 0
    rocs = [roc_points(column(c), target == c) if 0 < support[c] < len(target) else None
            for c in range(n_classes)]
    aucs = [r["auc"] for r in rocs if r is not None]
    return {"accuracy": float(correct.sum() / len(target)),
            "balanced_accuracy": float(np.mean(correct[present] / support[present])),
            "auc": float(np.mean(aucs)) if aucs else None, "n": int(len(target)),
            "per_class": {"support": support.tolist(), "correct": correct.tolist(),
                          "auc": [r and r["auc"] for r in rocs]},
            "confusion": cm.tolist(), "roc": rocs}


# -- multi-label zero-shot ------------------------------------------------------------------------

def multi_label(scores, truth) -> dict:
    """Multi-label zero-shot with the label-count oracle: an item with k labels predicts its
    top-k classes. scores (N, C) dense or a :class:`ScoreSource`; truth (N, C) boolean, dense or
    ``scipy.sparse``. accuracy = mean per-item fraction of its labels in its top-k (items with
    labels); balanced_accuracy = mean over classes of (TPR + TNR)/2 of that decision;
    auc = macro one-vs-rest AUC of the raw scores; n = items."""
    src = _source(scores)
    truth = sparse.csr_matrix(truth, dtype=bool)
    k = np.asarray(truth.sum(1)).ravel()
    hit = np.zeros(src.n)
    tp, fp = np.zeros(src.n_classes, np.int64), np.zeros(src.n_classes, np.int64)
    for sl, s in src.blocks():
        rank = torch.argsort(torch.argsort(-s, dim=1), dim=1).numpy()  # rank of each class
        pred = rank < k[sl, None]
        t = truth[sl].toarray()
        hit[sl] = (pred & t).sum(1) / np.maximum(k[sl], 1)
        tp += (pred & t).sum(0)
        fp += (pred & ~t).sum(0)
    pos = np.asarray(truth.sum(0)).ravel()
    neg = src.n - pos
    both = (pos > 0) & (neg > 0)
    bal = 0.5 * (tp[both] / pos[both] + (neg[both] - fp[both]) / neg[both])
    aucs = [auc_binary(src.column(c).numpy(), truth[:, c].toarray().ravel())
            for c in np.flatnonzero(both)]
    return {"accuracy": float(hit[k > 0].mean()) if (k > 0).any() else None,
            "balanced_accuracy": float(bal.mean()) if both.any() else None,
            "auc": float(np.mean(aucs)) if aucs else None, "n": int(src.n)}


# -- retrieval ------------------------------------------------------------------------------------

@torch.no_grad()
def first_relevant(queries: np.ndarray, gallery: np.ndarray, query_key: np.ndarray,
                   gallery_key: np.ndarray, k: int, device="cpu", rows: int | None = None,
                   cols: int | None = None) -> np.ndarray:
    """(Q,) int64: the 0-based rank of each query's first relevant gallery item in its top k by
    cosine (queries (Q, E) · gallery (G, E)), or :data:`MISS` when none is in its top k. Item g
    is relevant to query q when ``gallery_key[g] == query_key[q]``. A running top-k over gallery
    blocks of ``cols`` (default GALLERY) for ``rows`` queries at a time (default ROWS / 4):
    memory O(rows · (cols + k)), whatever G is."""
    rows, cols = rows or ROWS // 4, cols or GALLERY
    q_all = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    g_all = torch.as_tensor(np.asarray(gallery, dtype=np.float32))
    g_key = torch.as_tensor(np.asarray(gallery_key, dtype=np.int64))
    q_key = torch.as_tensor(np.asarray(query_key, dtype=np.int64))
    k = min(k, len(g_all))
    out = np.full(len(q_all), MISS, np.int64)
    for qs in _blocks(len(q_all), rows):
        q = q_all[qs].to(device)
        best_v = torch.full((len(q), 0), float("-inf"), device=device)
        best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=device)
        for gs in _blocks(len(g_all), cols):
            v, i = (q @ g_all[gs].to(device).T).topk(min(k, gs.stop - gs.start), dim=1)
            best_v, at = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), 1)
            best_i = torch.cat([best_i, i + gs.start], 1).gather(1, at)
        hits = (g_key[best_i.cpu()] == q_key[qs, None])
        out[qs] = torch.where(hits.any(1), hits.int().argmax(1), MISS).numpy()
    return out


def retrieval_recall(queries: np.ndarray, gallery: np.ndarray, query_key: np.ndarray,
                     gallery_key: np.ndarray, ks=(1, 5, 10), device="cpu") -> dict:
    """R@k for ks and the R@K curve (K = 1..CURVE_K): the fraction of queries with a relevant
    item (equal key, see :func:`first_relevant`) among their top K; with queries, gallery."""
    kmax = max(CURVE_K, *ks)
    first = first_relevant(queries, gallery, query_key, gallery_key, kmax, device)
    return _recalls(first, ks, len(gallery))


def recall_at(sim: np.ndarray, relevant: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Dense form for small inputs: sim (Q, G), relevant (Q, G) bool; as
    :func:`retrieval_recall`."""
    sim, relevant = torch.as_tensor(sim), torch.as_tensor(relevant, dtype=torch.bool)
    k = min(max(CURVE_K, *ks), sim.shape[1])
    hits = relevant.gather(1, sim.topk(k, dim=1).indices)
    first = torch.where(hits.any(1), hits.int().argmax(1), MISS).numpy()
    return _recalls(first, ks, sim.shape[1])


def _recalls(first: np.ndarray, ks, gallery: int) -> dict:
    n = max(len(first), 1)
    counts = np.bincount(np.minimum(first, CURVE_K), minlength=CURVE_K + 1)
    curve = (np.cumsum(counts)[:CURVE_K] / n).round(6).tolist()
    return ({f"r{k}": float((first < k).sum() / n) for k in ks}
            | {"queries": int(len(first)), "gallery": int(gallery), "curve": curve})
