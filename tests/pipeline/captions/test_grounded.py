"""Report sentences ground region captions only where they name the region's structure and side;
negated or uncertain mentions never do; negatives keep the caption's form."""

from __future__ import annotations

import pytest

from pipeline.captions.grounded import (
    REPORT_AND_TEMPLATE,
    UnitReport,
    check_grounded,
    fits,
    ground_captions,
    report_caption,
)
from pipeline.reports.ground import Grounding, ground
from pipeline.reports.tables import Report


def _g(sid, label, side="none", negated=False, uncertain=False, sentence=None):
    return Grounding(sid, label, side, negated, uncertain, sentence or f"Sentence {sid}.")


def _region(label, laterality=None, caption="The structure, spanning 14 mm."):
    return {"label": label, "laterality": laterality, "caption_region": caption,
            "negatives": ["N1.", "N2."], "negative_kinds": ["size_class", "label"]}


@pytest.mark.parametrize("g, region, expect", [
    (_g(0, "lung_left"), _region("lung_left"), True),  # sided label, same side
    (_g(0, "lung_right"), _region("lung_left"), False),  # the other lung
    (_g(0, "pleural_effusion"), _region("pleural_effusion", "left"), True),  # unsided mention
    (_g(0, "pleural_effusion", "left"), _region("pleural_effusion", "left"), True),
    (_g(0, "pleural_effusion", "right"), _region("pleural_effusion", "left"), False),
    (_g(0, "pleural_effusion", "left"), _region("pleural_effusion", None), False),  # unknown side
    (_g(0, "pleural_effusion", "left"), _region("pleural_effusion", "midline"), False),
    (_g(0, "liver"), _region("spleen"), False),  # another structure
    (_g(0, "liver"), _region("structure_7"), False),  # a label no vocabulary knows
])
def test_fits_needs_the_structure_and_a_compatible_side(g, region, expect):
    assert fits(g, region) is expect


def test_negated_and_uncertain_mentions_never_ground_and_the_first_fit_wins():
    region = _region("liver")
    report = UnitReport("Findings: x", [
        _g(0, "liver", negated=True, sentence="No liver abnormality."),
        _g(1, "liver", uncertain=True, sentence="Possible liver enlargement."),
        _g(2, "liver", sentence="The liver is enlarged."),
        _g(3, "liver", sentence="The liver is fatty."),
        _g(4, "pleural_effusion", negated=True, sentence="No pleural effusion."),
    ])
    image = {"caption_report": "template report"}
    ground_captions([image], [region], report)
    assert image["caption_report"] == "Findings: x" and image["caption_report_source"] == "report"
    assert region["caption_region"] == "The liver is enlarged. The structure, spanning 14 mm."
    assert region["caption_provenance"] == REPORT_AND_TEMPLATE
    assert region["report_sentence_id"] == 2
    negs = dict(zip(region["negatives"], region["negative_kinds"], strict=True))
    assert negs == {"The liver is enlarged. N1.": "size_class",
                    "The liver is enlarged. N2.": "label",
                    "Pleural effusion. The structure, spanning 14 mm.": "report_negated"}


def test_a_finding_both_stated_and_negated_is_no_negative_and_no_report_keeps_templates():
    region = _region("liver")
    report = UnitReport("Findings: x", [
        _g(0, "liver", sentence="The liver is enlarged."),
        _g(1, "pleural_effusion", negated=True), _g(2, "pleural_effusion", "right")])
    ground_captions([{}], [region], report)
    assert "report_negated" not in region["negative_kinds"]
    plain, image = _region("liver"), {"caption_report": "template report"}
    ground_captions([image], [plain], None)
    assert plain["caption_provenance"] == "template" and plain["report_sentence_id"] is None
    assert plain["negatives"] == ["N1.", "N2."]
    assert image["caption_report_source"] == "template"


def test_check_grounded_rederives_sentence_and_grounding_from_the_stored_report():
    from pipeline.captions.grounded import vocabulary_terms

    report = Report(findings="The spleen is normal. The liver is enlarged.", impression="")
    image = {"caption_report": report_caption(report)}
    sid = next(g.sentence_id for g in ground(report, vocabulary_terms()) if g.label == "liver")
    good = {"label": "liver", "caption_region": "The liver is enlarged. The liver, 14 mm.",
            "caption_provenance": REPORT_AND_TEMPLATE, "report_sentence_id": sid}
    assert check_grounded(image, good) is None
    assert check_grounded(image, dict(good, report_sentence_id=sid - 1)) == "sentence"
    moved = dict(good, label="spleen", caption_region="The spleen is normal. x",
                 report_sentence_id=sid)
    assert check_grounded(image, moved) == "sentence"
    wrong = dict(good, label="kidney_left")  # the sentence does not name this region
    assert check_grounded(image, wrong) == "grounding"
    assert check_grounded(image, dict(good, caption_provenance="template")) is None


def test_template_view_takes_the_sentence_off_and_checks_report_negatives():
    from pipeline.captions.grounded import template_view, vocabulary_terms

    report = Report(findings="The liver is enlarged. No pleural effusion.", impression="")
    image = {"caption_report": report_caption(report)}
    sid = next(g.sentence_id for g in ground(report, vocabulary_terms()) if g.label == "liver")
    region = {"label": "liver", "caption_provenance": REPORT_AND_TEMPLATE,
              "report_sentence_id": sid,
              "caption_region": "The liver is enlarged. The liver, 14 mm.",
              "negatives": ["The liver is enlarged. The spleen, 14 mm.",
                            "Pleural effusion. The liver, 14 mm."],
              "negative_kinds": ["label", "report_negated"]}
    view, problems = template_view(image, region)
    assert problems == []
    assert view["caption_region"] == "The liver, 14 mm."
    assert view["negatives"] == ["The spleen, 14 mm."] and view["negative_kinds"] == ["label"]
    bad = dict(region, negatives=["The liver is enlarged. The spleen, 14 mm.",
                                  "Ascites. The liver, 14 mm."])  # not negated by the report
    assert template_view(image, bad)[1] == ["report_negated"]
    bare = dict(region, negatives=["The spleen, 14 mm.", "Pleural effusion. The liver, 14 mm."])
    assert template_view(image, bare)[1] == ["sentence"]  # a negative without the sentence
