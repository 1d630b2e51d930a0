"""v2 captions and the negative sampler over the whole structure vocabulary."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from pipeline.captions.attributes import load_vocab
from pipeline.captions.describe import label_words, negatives_for, render_region
from pipeline.captions.negatives import draw, draw_diameter, intensity_key, priors_of
from pipeline.captions.structures import load_structures

VOCAB = load_vocab("v2")
ENTRIES = list(load_structures(VOCAB["structures"]).entries.values())
SIDED = [e for e in ENTRIES if e.side != "none"]
OPPOSITE = {"left": "right", "right": "left"}
PRIORS = priors_of(VOCAB)


def _facts(label: str, lesion: bool, laterality: str, diameter: float = 20.0,
           intensity: str = "hypo") -> dict:
    return {"label": label, "is_lesion": lesion, "laterality": laterality,
            "location": "kidney" if lesion else None,
            "location_relation": "in" if lesion else None, "max_diameter_mm": diameter,
            "size_class": "medium-sized", "intensity_class": intensity, "intensity_value": 0.0,
            "intensity_unit": "HU", "circularity": 1.0, "elongation": 0.0, "solidity": 1.0,
            "shape_class": "round", "modality": "CT", "plane": "axial"}


def _sides(text: str) -> set[str]:
    return set(re.findall(r"\b(left|right)\b", text.lower()))


def _templates(lesion: bool) -> list[str]:
    return VOCAB["region_templates"] if lesion else VOCAB["organ_templates"]


@pytest.mark.parametrize("entry", SIDED, ids=lambda e: e.label)
def test_no_text_contradicts_the_structures_own_side(entry):
    """Every sided entry, every template, every measured side (also the wrong one): the caption
    names the structure's own side only; a negative names one side, the side of the structure
    it names (the twin's for a side negative, the structure's own otherwise)."""
    lesion = entry.category == "lesion"
    same = [e for e in SIDED if e.category == entry.category and e.label != entry.label][:4]
    own, other = entry.side, OPPOSITE[entry.side]
    for measured in ("left", "right", "midline"):
        a = _facts(entry.label, lesion, measured)
        others = [_facts(e.label, lesion, e.side, diameter=31.0 + k, intensity="hyper")
                  for k, e in enumerate(same)]
        for t in _templates(lesion):
            caption = render_region(a, t, VOCAB, "CT")
            assert _sides(caption) == {own}, caption
            assert "_" not in caption and label_words(entry.label, VOCAB)[1] in caption.lower()
            assert not re.search(r"[,:.]\s*[,:.]", caption), caption
            texts, kinds = negatives_for(a, t, others, VOCAB, "CT", seed=0, key=entry.label)
            for text, kind in zip(texts, kinds, strict=True):
                if kind == "laterality":
                    assert _sides(text) == {other}, text
                elif kind == "label":
                    named = [e for e in same if label_words(e.label, VOCAB)[1] in text]
                    assert len(_sides(text)) <= 1 and _sides(text) <= {e.side for e in named}, text
                else:
                    assert _sides(text) == {own}, text


def test_paired_structures_get_a_side_negative_naming_their_twin():
    a = _facts("adrenal_gland_left", False, "left")
    texts, kinds = negatives_for(a, VOCAB["organ_templates"][1], [], VOCAB, "CT", 0, "r")
    assert kinds == ["laterality"] and texts == ["The right adrenal gland, spanning 20 mm, hypodense."]
    rib = render_region(_facts("rib_left_8", False, "left"), VOCAB["organ_templates"][1], VOCAB, "CT")
    assert rib == "The left eighth rib, spanning 20 mm, hypodense."
    l2 = render_region(_facts("vertebrae_L2", False, "midline"), VOCAB["organ_templates"][0],
                       VOCAB, "CT")
    assert l2 == "The L2 vertebral body, hypodense to its surroundings, spanning 20 mm."


@pytest.mark.parametrize("label", ["liver", "spleen", "aorta", "spine", "body"])
def test_unpaired_organs_state_no_side_and_get_no_side_negative(label):
    for measured in ("left", "right", "midline"):
        a = _facts(label, False, measured)
        for t in VOCAB["organ_templates"]:
            assert not _sides(render_region(a, t, VOCAB, "CT")) and "midline" not in t
            for seed in range(20):
                assert "laterality" not in negatives_for(a, t, [], VOCAB, "CT", seed, "r")[1]


SCALE = 180.0  # body scale (√ body area, mm) of the slices below


def _phantom_negatives(label: str, lesion: bool, contrast: bool, n: int = 300):
    """(kind, negative text) over ``n`` region keys of a phantom label at its median diameter
    and most common intensity, on a slice of body scale SCALE."""
    prior = PRIORS[label]
    ikey = intensity_key("CT", contrast)
    intensity = max(prior["intensity"][ikey], key=prior["intensity"][ikey].get)
    d = prior["diameter_rel"][20] * SCALE
    a = _facts(label, lesion, "right", diameter=d, intensity=intensity)
    if lesion:
        a["location"] = max(prior["location"], key=prior["location"].get)
    template = _templates(lesion)[1]  # shows the label, size class and diameter, intensity
    out = Counter()
    for k in range(n):
        texts, kinds = negatives_for(a, template, [], VOCAB, "CT", 0, f"r{k}", contrast=contrast,
                                     scale=SCALE)
        out.update(zip(kinds, texts, strict=True))
    return a, prior, out


@pytest.mark.parametrize("label", ["liver", "kidney_left", "lung_right", "spleen"])
def test_organ_negatives_use_values_the_structure_takes(label):
    """Sizes from the label's prior relative to the body, scaled to this slice's body; an
    intensity class it takes without contrast; a label it co-occurs with."""
    a, prior, out = _phantom_negatives(label, False, contrast=False)
    kinds = Counter(k for k, _ in out.elements())
    assert kinds["size_class"] > 0
    lo, hi = prior["diameter_rel"][0] * SCALE, prior["diameter_rel"][-1] * SCALE
    for (kind, text), _ in out.items():
        if kind == "size_class":
            mm = int(re.search(r"spanning ([0-9]+) mm", text).group(1))
            assert lo - 1 <= mm <= hi + 1 and max(mm, a["max_diameter_mm"]) / max(
                min(mm, a["max_diameter_mm"]), 0.5) >= VOCAB["diameter_ratio"], text
        if kind == "intensity_class":
            word = re.search(r"(hyper|iso|hypo)dense", text).group(1)
            assert word in prior["intensity"]["CT-C"], text
        if kind == "label":
            assert any(label_words(x, VOCAB)[1] in text for x in prior["cooccur"]), text


def test_a_structure_that_never_changes_gets_no_negative_of_that_kind():
    """Phantom lungs are hypodense in every study: no intensity negative; lung nodules lie in
    the lung only: no location or label negative."""
    _, _, lung = _phantom_negatives("lung_left", False, contrast=True)
    assert not [k for k, _ in lung if k == "intensity_class"]
    _, _, nodule = _phantom_negatives("lung_nodule", True, contrast=True)
    assert not [k for k, _ in nodule if k in ("location", "label")]
    assert [k for k, _ in nodule if k == "laterality"]
    # intensity depends on contrast: the phantom liver is hyperdense in every contrast study
    _, _, plain = _phantom_negatives("liver", False, contrast=False)
    _, _, enhanced = _phantom_negatives("liver", False, contrast=True)
    assert [k for k, _ in plain if k == "intensity_class"]
    assert not [k for k, _ in enhanced if k == "intensity_class"]


def test_draws_follow_the_weights_and_are_deterministic():
    weights = {"hyper": 3, "iso": 1}
    got = Counter(draw(weights, f"k{i}", 0) for i in range(4000))
    assert abs(got["hyper"] / 4000 - 0.75) < 0.03
    assert [draw(weights, f"k{i}", 5) for i in range(50)] == [draw(weights, f"k{i}", 5)
                                                               for i in range(50)]
    q = list(range(0, 41))  # uniform on [0, 40]
    mm = [draw_diameter(q, f"k{i}", 0) for i in range(4000)]
    assert len(set(mm)) == 41 and abs(sum(mm) / len(mm) - 20) < 1.0
    assert draw({}, "k", 0) is None
    assert draw_diameter([0.1, 0.1], "k", 0, scale=250.0) == 25


def test_negatives_are_seeded():
    a = _facts("liver", False, "right", diameter=40.0, intensity="hyper")
    t = VOCAB["organ_templates"][0]
    runs = [negatives_for(a, t, [], VOCAB, "CT", s, "r1", contrast=False) for s in range(8)]
    assert runs[0] == negatives_for(a, t, [], VOCAB, "CT", 0, "r1", contrast=False)
    assert len({tuple(r[0]) for r in runs}) > 1


def test_label_negatives_name_only_present_structures_of_the_same_category():
    """Without a prior (TotalSegmentator labels): a label negative names a structure of the
    same category present on the image, never one of another category."""
    a = _facts("pancreas", False, "midline")
    present = ["stomach", "duodenum", "vertebrae_L1", "aorta", "rib_left_11", "iliopsoas_left"]
    others = [_facts(x, False, "midline", diameter=60.0 + k) for k, x in enumerate(present)]
    named = Counter()
    for seed in range(30):
        for t in VOCAB["organ_templates"]:
            texts, kinds = negatives_for(a, t, others, VOCAB, "CT", seed, "r")
            for text, kind in zip(texts, kinds, strict=True):
                assert kind == "label"
                named.update(x for x in present if label_words(x, VOCAB)[0] in text.lower())
    assert set(named) == {"stomach", "duodenum"}


def test_lesion_side_negatives_only_where_the_label_takes_both_sides(tmp_path):
    """A lesion label only ever seen on the right (prior) gets no side negative."""
    import json

    def sides(laterality: dict) -> Counter:
        priors = {"labels": {"liver_mass": {"n": 10, "diameter_rel": [0.1, 0.1],
                                            "intensity": {}, "laterality": laterality,
                                            "location": {"liver": 10}, "cooccur": []}}}
        path = tmp_path / f"priors_{len(laterality)}.json"
        path.write_text(json.dumps(priors))
        vocab = dict(VOCAB, priors=str(path))
        a = dict(_facts("liver_mass", True, "right"), location="liver")
        return Counter(k for s in range(100) for k in negatives_for(
            a, VOCAB["region_templates"][0], [], vocab, "CT", s, "r")[1])

    assert sides({"right": 10})["laterality"] == 0
    assert sides({"right": 5, "left": 5})["laterality"] > 20


def test_size_negatives_scale_with_the_body_and_need_one():
    """The same relative draw on a body twice as large gives twice the diameter; no body (scale
    0), no size negative."""
    t = VOCAB["organ_templates"][1]

    def sizes(scale):  # a liver at its median relative size on a body of this scale
        a = _facts("liver", False, "right", diameter=PRIORS["liver"]["diameter_rel"][20] * scale,
                   intensity="hyper")
        out = []
        for k in range(200):
            texts, kinds = negatives_for(a, t, [], VOCAB, "CT", 0, f"r{k}", scale=scale)
            out += [int(re.search(r"spanning ([0-9]+) mm", x).group(1))
                    for x, kind in zip(texts, kinds, strict=True) if kind == "size_class"]
        return out

    small, large = sizes(90.0), sizes(180.0)
    assert small and large and not sizes(0.0)
    assert 1.8 < (sum(large) / len(large)) / (sum(small) / len(small)) < 2.2
