"""Grounding: every mention of a vocabulary term in every sentence of a report.

Sentence ids run 0, 1, ... over the findings sentences, then the impression sentences
(:func:`sections.sentences`), so a caption can name the sentence it came from. Each mention
of each sentence is one :class:`Grounding` (a sentence naming two structures gives two); the
build attaches a non-negated, certain grounding to the regions of its label and side, and
keeps a negated one as a verified negative for that region.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.reports.negation import mentions_in_doc, pipeline_for
from pipeline.reports.sections import sentences
from pipeline.reports.tables import Report


@dataclass(frozen=True)
class Grounding:
    """One mention in one sentence of a report."""

    sentence_id: int  # 0.. over findings then impression sentences
    label: str  # canonical label of the term
    side: str  # "left" | "right" | "none"
    negated: bool
    uncertain: bool
    sentence: str  # the de-identified sentence


def report_sentences(report: Report) -> list[str]:
    """The sentences of a report in sentence-id order."""
    return sentences(report.findings) + sentences(report.impression)


def ground(report: Report, terms: Mapping[str, str]) -> list[Grounding]:
    """Every mention (``negation.mentions``) of every sentence, in sentence then text order."""
    nlp = pipeline_for(terms)
    sents = report_sentences(report)
    out = []
    for i, (sentence, doc) in enumerate(zip(sents, nlp.pipe(sents), strict=True)):
        out += [Grounding(sentence_id=i, label=m.label, side=m.side, negated=m.negated,
                          uncertain=m.uncertain, sentence=sentence) for m in mentions_in_doc(doc)]
    return out
