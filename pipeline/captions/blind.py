"""The blind-model check: can a text-only classifier tell true region captions from negatives?

Hard negatives exist so that a model must look at the image to reject them. If a classifier
that never sees the image separates a region's caption from its negatives, the negatives carry
a text artefact (a word only negatives use, an impossible size, a side that contradicts the
structure's name) and teach the template instead of the image (SugarCrepe, NeurIPS 2023).

:func:`blind_accuracy` trains TF-IDF word 1-2-grams + logistic regression (scikit-learn) on the
true region captions (class 1) against their negatives (class 0), out of fold: ``GroupKFold``
with the image id as group, so no image's captions are both trained on and scored. It reports
the balanced accuracy of the out-of-fold predictions (chance: 0.5). Deterministic: the folds
are GroupKFold's (no shuffling), the solver is lbfgs, the optional subsample is a seeded hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

#: Default pass threshold of ``verify_captions`` / ``browse-catalog --blind-threshold``.
BLIND_THRESHOLD = 0.60
#: Single-character tokens count too: a digit ("8") or a side letter can be the cue.
TOKEN_PATTERN = r"(?u)\b\w+\b"


def _keep(image_id: str, seed: int, fraction: float) -> bool:
    h = int(hashlib.sha256(f"{seed}|{image_id}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def blind_dataset(regions: Iterable[tuple[str, str | None, list[str] | None]], seed: int = 0,
                  max_regions: int = 50_000) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, y, groups) from ``(image_id, caption_region, negatives)`` triples: one row per
    caption (y = 1) and per negative (y = 0), grouped by image; regions without a caption or
    without negatives are left out. Above ``max_regions`` regions, whole images are kept by a
    seeded hash of their id so that about ``max_regions`` remain."""
    regions = [(i, c, list(n)) for i, c, n in regions if c and n is not None and len(n)]
    images = {i for i, _, _ in regions}
    fraction = min(1.0, max_regions / max(len(regions), 1))
    if fraction < 1.0:
        keep = {i for i in images if _keep(i, seed, fraction)}
        regions = [r for r in regions if r[0] in keep]
    texts, y, groups = [], [], []
    for image_id, caption, negatives in regions:
        for text, label in ((caption, 1), *((n, 0) for n in negatives)):
            texts.append(text)
            y.append(label)
            groups.append(image_id)
    return texts, np.asarray(y, np.int8), np.asarray(groups)


def blind_accuracy(regions: Iterable[tuple[str, str | None, list[str] | None]], seed: int = 0,
                   folds: int = 5, max_regions: int = 50_000) -> dict:
    """Out-of-fold balanced accuracy of the text-only classifier (module docstring).

    Args:
        regions: ``(image_id, caption_region, negatives)`` per region.
        seed: seed of the subsample above ``max_regions`` (the folds are not random).
        folds: GroupKFold splits (fewer when there are fewer images).

    Returns:
        ``{"balanced_accuracy": float | None, "captions": n, "negatives": n, "images": n,
        "folds": k, "top_negative_ngrams": [...], "top_positive_ngrams": [...]}``;
        ``balanced_accuracy`` is None when there are fewer than 2 images or no negatives.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline

    texts, y, groups = blind_dataset(regions, seed, max_regions)
    n_images = len(set(groups.tolist()))
    out = {"balanced_accuracy": None, "captions": int((y == 1).sum()),
           "negatives": int((y == 0).sum()), "images": n_images, "folds": 0,
           "top_negative_ngrams": [], "top_positive_ngrams": []}
    k = min(folds, n_images)
    if k < 2 or out["negatives"] == 0:
        return out

    def model():
        return make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), token_pattern=TOKEN_PATTERN, lowercase=True),
            LogisticRegression(max_iter=2000, class_weight="balanced"))

    predicted = np.zeros_like(y)
    for train, test in GroupKFold(n_splits=k).split(texts, y, groups):
        if len(set(y[train].tolist())) < 2:
            predicted[test] = y[train][0]
            continue
        fitted = model().fit([texts[i] for i in train], y[train])
        predicted[test] = fitted.predict([texts[i] for i in test])
    out["balanced_accuracy"] = round(float(balanced_accuracy_score(y, predicted)), 4)
    out["folds"] = k
    full = model().fit(texts, y)  # the cues it found, for the report
    names = full[0].get_feature_names_out()
    order = np.argsort(full[1].coef_[0])
    out["top_negative_ngrams"] = [str(names[i]) for i in order[:8]]
    out["top_positive_ngrams"] = [str(names[i]) for i in order[::-1][:8]]
    return out
