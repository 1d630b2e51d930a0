"""The v2 negative sampler: hard negatives drawn from the positives' own distribution.

A negative is the region's caption (same template) with one attribute set to a value that some
other region of the corpus takes, so that a model that never sees the image cannot tell it
from a true caption. For each kind a value is *drawn* from a per-structure prior, and kept only
when it contradicts the region (and is not the truth of another region on the image):

laterality   paired structures (lung_left, rib_right_8): the twin on the other side, always;
             unpaired lesions: a side drawn from the label's measured sides. Unpaired organs:
             none (their captions state no side).
label        a label drawn by frequency among the labels of the same category; kept when it is
             not the region's structure, co-occurs with the region's label on some image and,
             for a lesion, lies in the lesion's location. A label without priors: a label of
             the same category present on this image.
size_class   a diameter drawn from the structure's measured diameters *relative to the body*
             (diameter / √(body area) of the slice, :func:`body_scale_mm`), times this
             slice's body scale, so the draw fits this patient's and this scanner's scale (a
             phantom at another matrix, an adult or a child); kept when the template shows the
             size class and it differs, or shows the diameter and the two differ by at least
             ``diameter_ratio`` (vocab).
intensity    a class drawn from the structure's measured classes in this modality with the
             image's contrast state (``intensity_key``): contrast changes what is likely.
location     an organ drawn from the lesion label's measured locations.

Why one draw per value (``negative_draws`` draws per kind) and no retry: a region of value v
then yields value v' with probability p(v'), so the flows v → v' and v' → v are both
p(v)·p(v') and the values negatives state follow the positives' distribution; a structure that
never changes (lungs are always hypodense) gets no negative of that kind. No prior, no draw.

The priors (``priors_v2.json``, measured on phantom corpora by
``python -m pipeline.captions.priors``) are part of the caption version: captions of a build
depend only on its own regions and this file, so parallel shards agree.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np

from pipeline.captions.attributes import VOCAB_DIR, load_structures, size_class, structure_of


@lru_cache(maxsize=4)
def load_priors(name: str) -> dict:
    """The per-label priors file ``name`` of a caption vocabulary (``{"labels": {...}}``)."""
    return json.loads((VOCAB_DIR / name).read_text())


def priors_of(vocab: dict) -> dict:
    """label → prior (``n``, ``diameter_mm``, ``intensity``, ``laterality``, ``location``,
    ``cooccur``) of a v2 vocabulary; empty without one."""
    return load_priors(vocab["priors"])["labels"] if vocab.get("priors") else {}


def body_scale_mm(body, spacing) -> float:
    """√(body area in mm²) of a slice: ``body`` an (H, W) bool mask, ``spacing`` (row, col) mm;
    0.0 without a body."""
    if body is None:
        return 0.0
    return float(np.sqrt(float(np.count_nonzero(body)) * float(spacing[0]) * float(spacing[1])))


def intensity_key(modality: str | None, contrast: bool | None) -> str:
    """The key of the intensity prior: "CT+C" (contrast), "CT-C" (none recorded as such),
    "CT" (unknown)."""
    return f"{modality}{ {True: '+C', False: '-C'}.get(contrast, '')}"


def uniform(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) from ``key`` and ``seed``."""
    return int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()[:13], 16) / 16**13


def draw(weights: dict, key: str, seed: int):
    """One value of ``weights`` (value → count), drawn with probability ∝ count; None if empty."""
    items = sorted((k, float(w)) for k, w in weights.items() if w > 0)
    total = sum(w for _, w in items)
    if not items:
        return None
    u, acc = uniform(key, seed) * total, 0.0
    for k, w in items:
        acc += w
        if u < acc:
            return k
    return items[-1][0]


def draw_diameter(quantiles: list[float], key: str, seed: int, scale: float = 1.0) -> int:
    """A whole-mm diameter: a value drawn from the distribution whose evenly spaced quantiles
    (0 … 100 %) are ``quantiles`` (inverse CDF, linear between quantiles, so every mm value can
    come out as in positives, not only the listed ones), times ``scale``."""
    q = np.asarray(quantiles, np.float64)
    u = uniform(key, seed) * (len(q) - 1)
    i = min(int(u), len(q) - 2)
    return int(round((q[i] + (u - i) * (q[i + 1] - q[i])) * scale))


@lru_cache(maxsize=4)
def _twins(version: str) -> dict:
    """(label, side) → the label of the same structure (and index) on ``side``."""
    entries = load_structures(version).entries.values()
    by_key = {(e.structure, e.index, e.category, e.side): e.label for e in entries}
    return {(e.label, s): by_key[(e.structure, e.index, e.category, s)]
            for e in entries for s in ("left", "right")
            if e.side != "none" and (e.structure, e.index, e.category, s) in by_key}


def twin(label: str, side: str, vocab: dict) -> str | None:
    """The label of ``label``'s structure on ``side`` (paired structures only), else None."""
    entry = structure_of(label, vocab)
    if entry is None or entry.side == "none":
        return None
    return _twins(vocab["structures"]).get((entry.label, side))


def is_sided(label: str, vocab: dict) -> bool:
    entry = structure_of(label, vocab)
    return entry is not None and entry.side != "none"


def same_structure(a: str, b: str, vocab: dict) -> bool:
    ea, eb = structure_of(a, vocab), structure_of(b, vocab)
    if ea is None or eb is None:
        return a == b
    return (ea.structure, ea.index) == (eb.structure, eb.index)


def category(label: str, vocab: dict) -> str:
    entry = structure_of(label, vocab)
    return entry.category if entry is not None else "other"


def _label_weights(a: dict, present: set[str], vocab: dict, priors: dict) -> dict:
    own = priors.get(a["label"])
    cat = category(a["label"], vocab)
    if own is None:  # no prior: the same category's labels present on this image
        return {x: 1 for x in present if category(x, vocab) == cat}
    return {x: p["n"] for x, p in priors.items() if category(x, vocab) == cat}


def _label_ok(a: dict, value: str, present: set[str], vocab: dict, priors: dict) -> bool:
    if same_structure(value, a["label"], vocab):
        return False
    own = priors.get(a["label"])
    if own is not None and value not in own.get("cooccur", ()):
        return False
    if a.get("location"):
        return a["location"] in priors.get(value, {}).get("location", {})
    return own is not None or value in present


def _weights(kind: str, a: dict, present: set[str], vocab: dict, priors: dict,
             contrast: bool | None = None) -> dict:
    prior = priors.get(a["label"], {})
    if kind == "laterality":
        entry = structure_of(a["label"], vocab)
        if entry is not None and entry.side != "none":  # paired: the twin on the other side
            other = "right" if entry.side == "left" else "left"
            return {other: 1} if twin(a["label"], other, vocab) else {}
        return dict(prior.get("laterality", {})) if a["is_lesion"] else {}
    if kind == "label":
        return _label_weights(a, present, vocab, priors)
    if kind == "size_class":  # the quantiles; drawn through :func:`draw_diameter`
        return {"quantiles": prior["diameter_rel"]} if prior.get("diameter_rel") else {}
    if kind == "intensity_class":
        return dict(prior.get("intensity", {}).get(intensity_key(a["modality"], contrast), {}))
    if kind == "location" and a.get("location"):
        return dict(prior.get("location", {}))
    return {}


def with_changed(a: dict, kind: str, value, vocab: dict) -> dict:
    """Attributes ``a`` with attribute ``kind`` set to ``value`` (what a negative states)."""
    if kind == "laterality" and is_sided(a["label"], vocab):  # paired: the other side's twin
        return dict(a, label=twin(a["label"], value, vocab) or a["label"])
    if kind == "size_class" and not isinstance(value, str):  # v2: a diameter (mm)
        return dict(a, size_class=size_class(value, vocab), diameter_text=f"{value:.0f}")
    b = dict(a, **{kind: value})
    if kind == "size_class":
        b["diameter_text"] = str(vocab["size_examples_mm"][value])
    if kind == "location":
        b["location_relation"] = "in"
    return b


def size_contradicts(a: dict, b: dict, template: str, vocab: dict) -> bool:
    """A size negative ``b`` of ``a`` is false on its face: the template shows the size class
    and it differs, or shows the diameter and the two differ by ``diameter_ratio`` or more."""
    shows_class = "{size}" in template or "{Size}" in template
    shows_diameter = "{diameter}" in template
    d0 = max(float(a["max_diameter_mm"]), 0.5)
    d1 = max(float(b["diameter_text"]), 0.5)
    ratio = max(d0, d1) / min(d0, d1)
    return (shows_class and b["size_class"] != a["size_class"]) or (
        shows_diameter and ratio >= float(vocab["diameter_ratio"]))


def contradicts(kind: str, a: dict, b: dict, template: str, vocab: dict) -> bool:
    """True when ``b`` (``a`` with ``kind`` changed) states something false of ``a``."""
    if kind == "size_class":
        return size_contradicts(a, b, template, vocab)
    if kind == "label":
        return not same_structure(b["label"], a["label"], vocab)
    return b["label"] != a["label"] or b.get(kind) != a.get(kind)


def sampled_values(kind: str, a: dict, template: str, present: set[str], vocab: dict,
                   seed: int, key: str, contrast: bool | None = None,
                   scale: float = 0.0) -> list:
    """The distinct values of ``kind`` drawn for region ``a`` (module docstring), in draw
    order; ``present``: labels of the other regions on the image; ``contrast``: the image's;
    ``scale``: its :func:`body_scale_mm` (no size negative without a body)."""
    priors = priors_of(vocab)
    weights = _weights(kind, a, present, vocab, priors, contrast)
    if kind == "size_class" and scale < 1.0:
        return []
    out = []
    for i in range(int(vocab["negative_draws"].get(kind, 0))):
        value = (draw_diameter(weights["quantiles"], f"{key}|{kind}|{i}", seed, scale)
                 if kind == "size_class" and weights else draw(weights, f"{key}|{kind}|{i}", seed))
        if value is None or value in out:
            continue
        if kind == "label" and not _label_ok(a, value, present, vocab, priors):
            continue
        if contradicts(kind, a, with_changed(a, kind, value, vocab), template, vocab):
            out.append(value)
    return out
