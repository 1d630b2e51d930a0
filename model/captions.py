"""Captions for training and zero-shot prompts, with the fallback used by :mod:`model.data`.

When the corpus has the caption columns (images: ``caption_summary``, ``caption_report``;
regions: ``caption_region``, ``negatives``, ``negative_kinds``) they are used as stored. When a
column is missing (corpora built before captions existed) or a value is null, captions are
derived from the row:

* region caption: ``"{laterality} {label}"`` with the label's underscores as spaces and a side
  suffix moved in front (``lung_nodule`` right → "right lung nodule", ``lung_left`` left →
  "left lung", ``spine`` midline → "midline spine"; no laterality → just the label);
* negatives (≥ 3, each changing one attribute): the laterality swapped (left ↔ right) when the
  region has a side, then the label swapped for other labels of the corpus vocabulary (kept
  side), chosen deterministically from a hash of the region id;
* image summary: "{plane} {modality} slice showing {sorted label phrases}";
* image report: "{modality}. plane: {plane}. findings: {sorted region captions}."
"""

from __future__ import annotations

import functools
import hashlib

SIDES = ("left", "right")


def base_label(label: str) -> str:
    """Label words without a side suffix: ``lung_left`` → "lung", ``lung_nodule`` → "lung nodule"."""
    words = label.replace("_", " ").split()
    if len(words) > 1 and words[-1] in SIDES:
        words = words[:-1]
    return " ".join(words)


def region_caption(label: str, laterality: str | None) -> str:
    words = label.replace("_", " ").split()
    side = laterality if laterality else (words[-1] if words and words[-1] in SIDES else None)
    base = base_label(label)
    return f"{side} {base}" if side else base


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def text_key(text: str) -> int:
    """Stable signed 63-bit hash of a caption (equal text → equal key, across processes)."""
    return _seed(" ".join(text.lower().split())) >> 1


def fallback_negatives(region_id: str, label: str, laterality: str | None,
                       labels: list[str], k: int = 3) -> tuple[list[str], list[str]]:
    """(negative captions, kinds) for a region without stored negatives."""
    true = region_caption(label, laterality)
    negs, kinds = [], []
    if laterality in SIDES:
        negs.append(region_caption(label, "right" if laterality == "left" else "left"))
        kinds.append("laterality")
    others = sorted({base_label(x) for x in labels} - {base_label(label)})
    start = _seed(region_id) % max(len(others), 1)
    for i in range(len(others)):
        if len(negs) >= k:
            break
        cand = f"{laterality} {others[(start + i) % len(others)]}" if laterality else \
            others[(start + i) % len(others)]
        if cand != true and cand not in negs:
            negs.append(cand)
            kinds.append("label")
    while len(negs) < k:  # tiny vocabularies: reuse a negative rather than the truth
        negs.append(negs[-1] if negs else f"not {true}")
        kinds.append(kinds[-1] if kinds else "negation")
    return negs, kinds


def image_summary(labels: list[str], modality: str | None, plane: str | None) -> str:
    found = ", ".join(sorted({base_label(x) for x in labels})) or "no labelled structures"
    return f"{plane or ''} {modality or ''} slice showing {found}".strip()


def image_report(region_captions: list[str], modality: str | None, plane: str | None) -> str:
    found = ", ".join(sorted(set(region_captions))) or "no labelled structures"
    return f"{modality or 'unknown modality'}. plane: {plane or 'unknown'}. findings: {found}."


@functools.lru_cache(maxsize=8)
def prompter(version: str | None):
    """``prompt(label, side)`` in the phrasing of the corpus's captions: with stored captions of
    vocabulary ``version`` (``pipeline/captions/vocab_<version>.json``): from v2 the structure
    vocabulary's noun phrase, with side words only for structures that are not themselves sided
    ("left adrenal gland", "lung nodule on the right"); v1 "{display} {side words}"
    ("lung nodule on the right", "vertebral body in the midline"); otherwise (or if that
    vocabulary is not available) the fallback "{laterality} {label}" (:func:`region_caption`)."""
    vocab = None
    if version:
        try:
            from pipeline.captions.attributes import load_vocab

            vocab = load_vocab(version)
        except (ImportError, OSError, ValueError):
            vocab = None
    if vocab is None:
        return region_caption
    if vocab.get("structures"):  # v2+: the captions' own phrase ("left adrenal gland")
        from pipeline.captions.describe import label_words
        from pipeline.captions.negatives import is_sided

        def phrase(label: str, side: str | None) -> str:
            side_words = "" if is_sided(label, vocab) else vocab["laterality_words"].get(side or "", "")
            return f"{label_words(label, vocab)[1]} {side_words}".strip()

        return phrase

    def prompt(label: str, side: str | None) -> str:
        name = vocab["label_display"].get(label, base_label(label))
        return f"{name} {vocab['laterality_words'].get(side or '', '')}".strip()

    return prompt


def label_prompts(label: str, lateralities: list[str | None], prompt=region_caption) -> list[str]:
    """Zero-shot prompts of a label class: one per side seen with it (default phrasing
    "{laterality} {label}")."""
    sides = lateralities or [None]
    return sorted({prompt(label, s) for s in sides})
