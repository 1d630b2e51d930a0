"""The blind-model check on texts whose cues are known."""

from __future__ import annotations

import random

from pipeline.captions.blind import blind_accuracy, blind_dataset

ORGANS = ["liver", "spleen", "left kidney", "right kidney", "aorta", "left lung", "right lung"]


def _caption(organ: str, mm: int, word: str) -> str:
    return f"The {organ}, spanning {mm} mm, {word}."


def _rows(cue: str | None, n_images: int = 60, seed: int = 0) -> list[tuple]:
    """Regions whose negatives are drawn from the same distribution as the captions (no
    cue), plus ``cue`` in every negative when given."""
    rng = random.Random(seed)

    def fact():
        return rng.choice(ORGANS), rng.randint(10, 200), rng.choice(["hypodense", "isodense"])

    rows = []
    for k in range(n_images * 4):
        caption = _caption(*fact())
        negs = [n for n in (_caption(*fact()), _caption(*fact())) if n != caption]
        if cue:
            negs = [n.replace(".", f" {cue}.") for n in negs]
        rows.append((f"img{k // 4}", caption, negs))
    return rows


def test_negatives_drawn_from_positives_are_at_chance():
    report = blind_accuracy(_rows(None))
    assert report["folds"] == 5 and report["images"] == 60
    assert abs(report["balanced_accuracy"] - 0.5) < 0.1


def test_a_cue_word_is_found():
    report = blind_accuracy(_rows("tiny"))
    assert report["balanced_accuracy"] > 0.95
    assert "tiny" in report["top_negative_ngrams"]


def test_single_character_tokens_count():
    report = blind_accuracy(_rows("3"))
    assert report["balanced_accuracy"] > 0.95


def test_deterministic_and_grouped_by_image():
    rows = _rows("tiny")
    assert blind_accuracy(rows) == blind_accuracy(list(rows))
    texts, y, groups = blind_dataset(rows)
    assert len(texts) == len(y) == len(groups) and set(groups.tolist()) == {f"img{i}" for i in range(60)}
    few = blind_dataset(rows, max_regions=100)[2]
    assert 0 < len(set(few.tolist())) < 60  # whole images kept or dropped


def test_too_little_to_judge():
    assert blind_accuracy([("img0", "The liver.", ["The spleen."])])["balanced_accuracy"] is None
    assert blind_accuracy([("img0", "The liver.", [])])["captions"] == 0
