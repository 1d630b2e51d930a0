"""Section headers (variants, MIMIC preamble, no header) and sentence splitting."""

from __future__ import annotations

import pytest

from pipeline.reports.sections import sentences, split_sections

MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  [NAME] with cough

 COMPARISON:  [DATE]

 FINDINGS:

 The lungs are clear.  No pleural effusion or
 pneumothorax.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


@pytest.mark.parametrize("text", [
    "FINDINGS: Lungs clear. IMPRESSION: Normal chest.",
    "Findings: Lungs clear.\nImpression: Normal chest.",
    "FINDINGS - Lungs clear. IMPRESSION - Normal chest.",
    "Findings\nLungs clear.\nImpressions:\nNormal chest.",
    "findings:Lungs clear.\n\nconclusion: Normal chest.",
    "INDICATION: cough.\nFINDINGS: Lungs clear.\nIMPRESSION \u2014 Normal chest.",
    "HISTORY: [NAME], cough. FINDINGS: Lungs clear. IMPRESSION: Normal chest.",
])
def test_header_variants(text):
    got = split_sections(text)
    assert got["findings"] == "Lungs clear."
    assert got["impression"] == "Normal chest."


def test_mimic_layout_preamble_and_dropped_sections():
    got = split_sections(MIMIC)
    assert got["findings"] == "The lungs are clear. No pleural effusion or pneumothorax."
    assert got["impression"] == "No acute cardiopulmonary process."
    assert got["indication"] == "[NAME] with cough" and got["comparison"] == "[DATE]"
    assert got["examination"] == "CHEST (PA AND LAT)"


def test_text_without_headers_is_findings():
    assert split_sections("Heart size normal. Lungs clear.") == {
        "findings": "Heart size normal. Lungs clear."}
    assert split_sections("   \n ") == {}


def test_header_words_inside_prose_are_not_headers():
    text = "FINDINGS: The findings are stable. No history of surgery."
    assert split_sections(text) == {"findings": "The findings are stable. No history of surgery."}


def test_repeated_section_is_joined():
    got = split_sections("FINDINGS: A lung. IMPRESSION: B. FINDINGS: C heart.")
    assert got["findings"] == "A lung. C heart." and got["impression"] == "B."


@pytest.mark.parametrize("text, want", [
    ("Heart normal. Lungs clear.", ["Heart normal.", "Lungs clear."]),
    ("No effusion vs. atelectasis. Dr. [NAME] was called.",
     ["No effusion vs. atelectasis.", "Dr. [NAME] was called."]),
    ("1. No acute process. 2. Stable 1.5 cm nodule.", ["No acute process.", "Stable 1.5 cm nodule."]),
    ("[DATE]. XXXX. The XXXX are clear. [NAME] [ID].", ["The XXXX are clear."]),
    ("No effusion. heart is normal.", ["No effusion.", "heart is normal."]),
    ("Heart size normal.No effusion.", ["Heart size normal.", "No effusion."]),
    ("Line one\nLine two", ["Line one", "Line two"]),
    ("", []),
])
def test_sentences(text, want):
    assert sentences(text) == want
