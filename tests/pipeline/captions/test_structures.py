"""The structure vocabulary (structures_v1.json) and the label-name gate (safe_label_names)."""

from __future__ import annotations

import copy
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.captions.structures import (
    CATEGORIES,
    MAX_RAW_LABEL_CHARS,
    SIDES,
    VOCAB_DIR,
    canonical_label,
    load_structures,
    name_key,
    safe_label_names,
    vocab_from_dict,
)
from pipeline.phantoms.anatomy import LABELS

VOCAB = load_structures()
ENTRIES = list(VOCAB.entries.values())
SIDED = [e for e in ENTRIES if e.side != "none"]
OPPOSITE = {"left": "right", "right": "left"}
SIDE_FORMS = {"left": ["L", "l", "Lt", "LT", "lt", "Left", "LEFT", "left", "Sin", "sx"],
              "right": ["R", "r", "Rt", "RT", "rt", "Right", "RIGHT", "right", "Dx", "dex"]}
SEPARATORS = ["_", "-", " ", ".", "/", "__", " - ", "  "]
CANARIES = ["DOE^JOHN", "John Doe", "Smith, Jane", "1970-01-01", "19700101", "01.01.1970",
            "MRN 1234567", "PID_7654321", "Acc#A12345"]
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _doc() -> dict:
    return json.loads((VOCAB_DIR / "structures_v1.json").read_text(encoding="utf-8"))


def _words(text: str) -> set[str]:
    return set(re.split(r"[\W_]+", text.lower()))


# ----------------------------------------------------------------------------- the file


def test_loader_is_cached_and_versioned():
    assert load_structures() is load_structures("v1") and VOCAB.version == "v1"
    for bad in ("v999", "../vocab_v1", "1"):
        with pytest.raises(ValueError, match="structure vocabulary"):
            load_structures(bad)


def test_entries_are_well_formed():
    assert len(ENTRIES) == len(VOCAB.entries) > 150
    for e in ENTRIES:
        assert e.side in SIDES and e.category in CATEGORIES, e.label
        assert e.phrase.startswith("the ") and e.structure and e.structure == e.structure.lower()
    ribs = [e for e in ENTRIES if e.structure == "rib"]
    assert sorted((e.side, e.index) for e in ribs) == sorted(
        (s, i) for s in ("left", "right") for i in range(1, 13))
    vertebrae = {e.index for e in ENTRIES if e.structure == "vertebra"}
    assert vertebrae == {f"C{i}" for i in range(1, 8)} | {f"T{i}" for i in range(1, 13)} | {
        f"L{i}" for i in range(1, 6)} | {"S1"}


def test_display_phrases():
    phrases = {e.label: e.phrase for e in ENTRIES}
    assert phrases["adrenal_gland_left"] == "the left adrenal gland"
    assert phrases["rib_left_8"] == "the left eighth rib"
    assert phrases["rib_right_12"] == "the right twelfth rib"
    assert phrases["vertebrae_L2"] == "the L2 vertebral body"
    assert VOCAB.entries["vertebrae_L2"].index == "L2" and VOCAB.entries["rib_left_8"].index == 8
    assert VOCAB.entries["autochthon_right"].category == "muscle"
    assert VOCAB.entries["kidney_cyst_left"].category == "lesion"
    for e in ENTRIES:  # the leading article is optional
        assert canonical_label(e.phrase.removeprefix("the "), VOCAB) == e.label, e.phrase


def test_leading_zeros_and_glued_indices():
    for name, label in [("T01", "vertebrae_T1"), ("Vertebra_L05", "vertebrae_L5"),
                        ("rib_left_08", "rib_left_8"), ("Rib 012 R", "rib_right_12"),
                        ("vertebraeL2", "vertebrae_L2"), ("T10", "vertebrae_T10")]:
        assert canonical_label(name, VOCAB) == label, name


def test_no_phrase_contradicts_its_side():
    """Read as plain words (not through name_key): a phrase names its own side or none."""
    for e in ENTRIES:
        words = _words(e.phrase)
        if e.side == "none":
            assert not words & {"left", "right"}, e.label
        else:
            assert e.side in words and OPPOSITE[e.side] not in words, e.label
            assert name_key(e.phrase)[1] == e.side


def test_totalsegmentator_v2_has_all_117_classes_as_canonical_labels():
    ts = VOCAB.label_sets["totalsegmentator_v2"]
    assert len(ts) == 117 and all(ts[n] == n for n in ts)
    assert {"adrenal_gland_left", "rib_left_8", "vertebrae_L2", "autochthon_right",
            "iliopsoas_left", "kidney_cyst_left", "costal_cartilages", "vertebrae_S1"} <= set(ts)
    assert all(n in VOCAB.entries for n in ts)


def test_phantom_labels_map_to_themselves():
    for name in LABELS.values():
        assert canonical_label(name, VOCAB) == name
    assert safe_label_names(LABELS) == LABELS


def test_every_name_of_every_entry_maps_back():
    for e in ENTRIES:
        for name in (e.label, e.phrase, *e.synonyms):
            for variant in (name, name.upper(), name.lower(), name.title(), f"  {name}\t"):
                assert canonical_label(variant, VOCAB) == e.label, (variant, e.label)
            for sep in SEPARATORS:
                spaced = re.sub(r"[ _]", sep, name)
                assert canonical_label(spaced, VOCAB) == e.label, (spaced, e.label)


def test_label_sets_resolve_as_stated():
    """MSD, BraTS, AMOS, KiTS, LiTS, BTCV, TG-263, hospital spellings; None = left unknown."""
    names = {"msd_task01_braintumour", "msd_task05_prostate", "brats", "amos", "kits", "lits",
             "btcv", "tg263", "rt_targets", "hospital_spellings"}
    assert names <= set(VOCAB.label_sets)
    for set_name, mapping in VOCAB.label_sets.items():
        for raw, label in mapping.items():
            assert canonical_label(raw, VOCAB) == label, (set_name, raw)
    assert len(VOCAB.label_sets["amos"]) == 15 and len(VOCAB.label_sets["btcv"]) == 13
    for target in ("GTV", "PTV_70", "CTV"):  # targets are not structures
        assert canonical_label(target, VOCAB) is None


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["entries"][1]["synonyms"].append("Lung_R"), "names side"),
    (lambda d: d["entries"][1].update(phrase="the right lung"), "names side"),
    (lambda d: d["entries"][2]["synonyms"].append("liver"), "also names"),
    (lambda d: d["label_sets"]["amos"].update({"arota": "spleen"}), "label set amos"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), "listed twice"),
    (lambda d: d["entries"][0].update(side="both"), "bad side"),
    (lambda d: d["entries"][0].update(label="Body Outline"), "snake_case"),
])
def test_inconsistent_vocabulary_is_refused(edit, message):
    doc = copy.deepcopy(_doc())
    assert doc["entries"][1]["label"] == "lung_left" and doc["entries"][2]["label"] == "lung_right"
    vocab_from_dict(copy.deepcopy(doc))
    edit(doc)
    with pytest.raises(ValueError, match=message):
        vocab_from_dict(doc)


# ----------------------------------------------------------------------------- sides


def _partner(label: str) -> str | None:
    e = VOCAB.entries[label]
    swapped = re.sub(rf"(^|_){e.side}(_|$)", rf"\g<1>{OPPOSITE[e.side]}\g<2>", label)
    return swapped if swapped in VOCAB.entries else None


@st.composite
def side_variants(draw):
    """(entry, side, raw name) for a sided entry: its label's words with a side word moved
    to the front or back, in any case and with any separators."""
    e = draw(st.sampled_from(SIDED))
    side = draw(st.sampled_from(["left", "right"]))
    words = [w for w in e.label.split("_") if w not in ("left", "right")]
    words = [draw(st.sampled_from([w, w.upper(), w.lower(), w.capitalize()])) for w in words]
    sep = draw(st.sampled_from(SEPARATORS))
    side_word = draw(st.sampled_from(SIDE_FORMS[side]))
    if draw(st.booleans()):
        name = side_word + draw(st.sampled_from(SEPARATORS)) + sep.join(words)
    else:
        name = sep.join(words) + draw(st.sampled_from(SEPARATORS)) + side_word
    return e, side, name


@SETTINGS
@given(side_variants())
def test_side_variants_map_to_their_side_and_never_the_opposite(case):
    e, side, name = case
    got = canonical_label(name, VOCAB)
    expected = e.label if side == e.side else _partner(e.label)
    assert got == expected, name
    assert got is None or VOCAB.entries[got].side == side


def test_opposite_side_never_maps_to_this_side():
    """Every sided entry, every spelling of the other side, before and after its words."""
    for e in SIDED:
        words = " ".join(w for w in e.label.split("_") if w not in ("left", "right"))
        other = OPPOSITE[e.side]
        for form in SIDE_FORMS[other]:
            for name in (f"{form} {words}", f"{words}_{form}", f"{form}-{e.structure}"):
                got = canonical_label(name, VOCAB)
                assert got != e.label and (got is None or VOCAB.entries[got].side == other), name


def test_hospital_side_spellings_of_paired_organs():
    for organ, label in [("Lung", "lung"), ("Kidney", "kidney"), ("Parotid", "parotid_gland"),
                         ("Femur_Head", "femoral_head"), ("OpticNrv", "optic_nerve"),
                         ("Adrenal", "adrenal_gland")]:
        for side in ("left", "right"):
            for form in SIDE_FORMS[side]:
                for name in (f"{organ}_{form}", f"{form} {organ}", f"{organ.upper()} {form}"):
                    assert canonical_label(name, VOCAB) == f"{label}_{side}", name
    assert canonical_label("LtLung", VOCAB) == "lung_left"
    assert canonical_label("RtKidney", VOCAB) == "kidney_right"
    assert canonical_label("Lung_L+R", VOCAB) is None  # two sides: not a known name


# ----------------------------------------------------------------------------- the gate

KNOWN_NAMES = sorted({n for e in ENTRIES for n in (e.label, e.phrase, *e.synonyms)})


@st.composite
def canaried_names(draw):
    """A raw name carrying a PHI canary, alone or glued to a known name and random text."""
    canary = draw(st.sampled_from(CANARIES))
    parts = [canary]
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from(KNOWN_NAMES)))
    if draw(st.booleans()):
        parts.append(draw(st.text(max_size=12)))
    parts = draw(st.permutations(parts))
    return canary, draw(st.sampled_from(SEPARATORS)).join(parts)


def test_canaries_are_not_part_of_any_key():
    for canary in CANARIES:
        glued = name_key(canary)[0]
        assert not any(glued in base for base, _ in VOCAB.table), canary


@SETTINGS
@given(canaried_names(), st.integers(1, 999))
def test_phi_canaries_never_survive_the_gate(case, value):
    canary, raw = case
    out = safe_label_names({value: raw}, allow_unknown=False)
    assert out == {value: f"structure_{value}"}
    for piece in re.split(r"[\W_]+", canary):
        if len(piece) >= 3:
            assert piece.lower() not in out[value].lower()


@SETTINGS
@given(st.text(max_size=80), st.integers(0, 65535))
def test_any_text_becomes_a_vocabulary_label_or_the_neutral_label(raw, value):
    out = safe_label_names({value: raw}, allow_unknown=False)[value]
    known = canonical_label(raw, VOCAB)
    assert out == (known if known is not None else f"structure_{value}")
    assert out in VOCAB.entries or out == f"structure_{value}"


@SETTINGS
@given(canaried_names(), st.integers(1, 10_000))
def test_opt_in_keeps_unknown_names_cleaned_and_capped(case, value):
    canary, raw = case
    out = safe_label_names({value: raw}, allow_unknown=True)[value]
    assert len(out) <= MAX_RAW_LABEL_CHARS and out == " ".join(out.split())
    assert out.isprintable()
    if len(" ".join(raw.split())) <= MAX_RAW_LABEL_CHARS and raw.isprintable():
        assert out == " ".join(raw.split())  # the risk the flag names: the canary is kept


def test_opt_in_still_canonicalizes_known_names_and_drops_empty_ones():
    names = {1: "LUNG LEFT", 2: " \x00\t\udcff ", 3: "DOE^JOHN 1970-01-01\n", 4: "x" * 300}
    assert safe_label_names(names, allow_unknown=True) == {
        1: "lung_left", 2: "structure_2", 3: "DOE^JOHN 1970-01-01", 4: "x" * 64}
    assert safe_label_names(names) == {1: "lung_left", 2: "structure_2", 3: "structure_3",
                                       4: "structure_4"}
    assert safe_label_names({5: None, 6: ""}) == {5: "structure_5", 6: "structure_6"}


@SETTINGS
@given(st.dictionaries(st.integers(0, 999), st.one_of(st.text(max_size=30),
                                                      st.sampled_from(KNOWN_NAMES)),
                       max_size=12), st.booleans())
def test_the_gate_is_deterministic(names, allow_unknown):
    first = safe_label_names(names, allow_unknown)
    before = dict(names)
    reordered = dict(reversed(list(names.items())))
    assert safe_label_names(reordered, allow_unknown) == first
    assert safe_label_names(names, allow_unknown, vocab_from_dict(_doc())) == first
    assert names == before and set(first) == set(names)
