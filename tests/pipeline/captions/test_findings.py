"""Tests for pipeline.captions.findings: the finding vocabulary file, its loader and lookups."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.captions.findings import (
    canonical_finding,
    finding_terms,
    is_no_finding,
    load_findings,
)
from pipeline.captions.structures import VOCAB_DIR, load_structures, vocab_from_dict

CANARY = "DOE^JANE 1234567"


def test_loads_once_and_every_entry_is_an_unsided_finding():
    vocab = load_findings()
    assert vocab is load_findings("v1")
    assert len(vocab.entries) >= 17
    assert all(e.category == "finding" and e.side == "none" for e in vocab.entries.values())
    assert load_structures().entries  # the structure vocabulary still loads beside it


def test_collections_class_names_resolve_as_their_label_sets_state():
    sets = load_findings().label_sets
    assert set(sets) == {"vindr", "rsna", "nih", "siim"}
    assert len([v for v in sets["vindr"].values() if v]) == 14 and len(sets["nih"]) == 8
    for mapping in sets.values():
        for name, label in mapping.items():
            assert canonical_finding(name) == label, name


@pytest.mark.parametrize("name,label", [
    ("Lung Opacity", "lung_opacity"), ("opacities", "lung_opacity"),
    ("airspace disease", "consolidation"), ("Effusion", "pleural_effusion"),
    ("the pleural effusions", "pleural_effusion"), ("enlarged heart", "cardiomegaly"),
    ("cardiac enlargement", "cardiomegaly"), ("collapse", "atelectasis"),
    ("ILD", "interstitial_lung_disease"), ("Nodule/Mass", "nodule_mass"), ("NODULE", "nodule"),
    ("Infiltrate", "infiltration"), ("pneumothoraces", "pneumothorax")])
def test_radiologists_words_resolve(name, label):
    assert canonical_finding(name) == label


@pytest.mark.parametrize("name", [CANARY, "", "left pleural effusion", "No finding", "x" * 300])
def test_unknown_sided_and_no_finding_names_do_not_resolve(name):
    assert canonical_finding(name) is None


def test_no_finding_names():
    assert is_no_finding("No finding") and is_no_finding(" no_findings ") and is_no_finding("NORMAL")
    assert not is_no_finding("Nodule") and not is_no_finding(CANARY)


def test_rsna_lung_opacity_is_not_pneumonia():
    # RSNA's "Lung Opacity" is an opacity suggestive of pneumonia, not a diagnosis: it maps to
    # the opacity, never to pneumonia (docs/vocabulary.md, Findings)
    assert canonical_finding("Lung Opacity") != canonical_finding("Pneumonia")


def test_finding_terms_cover_names_lower_cased_without_the():
    terms = finding_terms()
    assert terms["opacity"] == "lung_opacity" and terms["effusions"] == "pleural_effusion"
    assert terms["enlarged heart"] == "cardiomegaly" and terms["collapse"] == "atelectasis"
    assert terms["ild"] == "interstitial_lung_disease" and terms["nodule/mass"] == "nodule_mass"
    assert all(t == t.lower() and not t.startswith("the ") for t in terms)
    vocab = load_findings()
    for e in vocab.entries.values():
        assert terms[e.phrase.lower()] == e.label
        assert all(terms[s.lower()] == e.label for s in e.synonyms)
    terms["opacity"] = "changed"
    assert finding_terms()["opacity"] == "lung_opacity"


def test_finding_terms_drop_a_leading_the(monkeypatch):
    import pipeline.captions.findings as findings

    doc = json.loads((VOCAB_DIR / "findings_v1.json").read_text())
    doc["entries"][0]["phrase"] = "The  Enlarged Aorta"
    monkeypatch.setattr(findings, "load_findings", lambda version="v1": vocab_from_dict(doc))
    findings._terms.cache_clear()
    try:
        terms = findings.finding_terms("v1")
    finally:
        findings._terms.cache_clear()
    assert terms["enlarged aorta"] == doc["entries"][0]["label"]
    assert not any(t.startswith("the ") for t in terms)


def test_inconsistent_files_are_refused():
    doc = json.loads((VOCAB_DIR / "findings_v1.json").read_text())
    bad = copy.deepcopy(doc)
    bad["entries"][0]["synonyms"].append(bad["entries"][1]["phrase"])  # one name, two labels
    with pytest.raises(ValueError):
        vocab_from_dict(bad)
    bad = copy.deepcopy(doc)
    bad["label_sets"]["rsna"]["Lung Opacity"] = "pneumonia"
    with pytest.raises(ValueError):
        vocab_from_dict(bad)
    with pytest.raises(ValueError):
        load_findings("v99")
    with pytest.raises(ValueError):
        load_findings("../x")
