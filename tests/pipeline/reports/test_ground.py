"""Grounding: sentence ids over findings then impression, every mention of every sentence."""

from __future__ import annotations

from pipeline.reports import Grounding, Report, ground

TERMS = {"pleural effusion": "pleural_effusion", "effusion": "pleural_effusion",
         "pneumothorax": "pneumothorax", "lungs": "lung", "heart": "heart",
         "opacity": "opacity"}


def test_sentence_ids_and_every_mention():
    report = Report(findings="The heart is normal. [DATE]. No pleural effusion or pneumothorax.",
                    impression="Possible left opacity. Lungs clear.")
    got = ground(report, TERMS)
    assert got == [
        Grounding(0, "heart", "none", False, False, "The heart is normal."),
        Grounding(1, "pleural_effusion", "none", True, False,
                  "No pleural effusion or pneumothorax."),
        Grounding(1, "pneumothorax", "none", True, False, "No pleural effusion or pneumothorax."),
        Grounding(2, "opacity", "left", False, True, "Possible left opacity."),
        Grounding(3, "lung", "none", False, False, "Lungs clear."),
    ]


def test_empty_report_and_no_terms():
    assert ground(Report(findings="", impression=""), TERMS) == []
    assert ground(Report(findings="Normal study.", impression=""), TERMS) == []
