"""Report captions and report-grounded region captions, after the template captions are made.

The study's report (``pipeline.reports``: scrubbed on load, then in the worker again with the
identifiers of the DICOM header) replaces the template report caption of each of its images,
and its sentences are attached to regions:

    image caption_report       "Findings: <findings>\\nImpression: <impression>" when the study
                               has a report (caption_report_source "report"), else the template
                               (caption_report_source "template")
    region caption_region      "<sentence> <template caption>" when a sentence of the report
                               names the region's structure (caption_provenance
                               "report+template", report_sentence_id: the sentence's id in
                               ``ground(report)``), else the template ("template")

A sentence attaches to a region when one of its mentions (:func:`pipeline.reports.negation.
mentions` over the structure and finding vocabularies) is neither negated nor uncertain, names
the region's structure (the ``structure`` field of both vocabulary entries: "left lung" and
"lungs" both name the lung), and its side agrees: an unsided mention fits any region; a sided
one ("left pleural effusion") only a region on that side, never a region whose side is unknown.
The first such sentence wins; the region's template negatives take the same sentence first, so
caption and negatives keep one form. A negated finding ("no pleural effusion") is never a
positive caption: for each grounded region it gives a hard negative "<Finding phrase>.
<template caption>" (kind ``report_negated``), unless the same report also states the finding.

:func:`check_grounded` re-derives every report-derived caption from the stored image row
(the caption checker, ``pipeline.captions.check``): its sentence must be the stated sentence
of the stored report and must name the region's structure and side as above.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from pipeline.captions.structures import load_structures

REPORT = "report"
TEMPLATE = "template"
REPORT_AND_TEMPLATE = "report+template"
NEGATED_KIND = "report_negated"


class UnitReport(NamedTuple):
    """What a unit's images take from its study's report (made in the unit worker)."""

    text: str  # the image report caption: "Findings: …\nImpression: …"
    groundings: list  # pipeline.reports.ground.Grounding of every mention of every sentence


@functools.cache
def _vocabs():
    from pipeline.captions.findings import load_findings

    return load_structures(), load_findings()


def _entry(label: str):
    for vocab in _vocabs():
        if label in vocab.entries:
            return vocab.entries[label]
    return None


#: Vocabulary names that are ordinary words in report prose ("posterior", "net", "body"), not
#: a structure named: never matched in report sentences.
PROSE_WORDS = frozenset({"anterior", "posterior", "superior", "inferior", "body", "outline",
                         "external", "net", "sto", "eso", "myo", "gall", "lips", "skin",
                         "vessel", "vessels", "cancer"})


@functools.cache
def vocabulary_terms() -> dict[str, str]:
    """Lower-cased name / phrase / synonym → canonical label, over the structure and the
    finding vocabularies: what report sentences are matched against (names of category
    ``other`` and :data:`PROSE_WORDS` left out)."""
    from pipeline.captions.findings import finding_terms

    terms: dict[str, str] = {}
    structures, _ = _vocabs()
    for e in structures.entries.values():
        if e.category == "other":
            continue
        for name in (e.label.replace("_", " "), e.phrase, *e.synonyms):
            low = name.lower().removeprefix("the ").strip()
            if len(low) > 2 and low not in PROSE_WORDS:
                terms.setdefault(low, e.label)
    for name, label in finding_terms().items():
        terms.setdefault(name, label)
    return terms


def report_caption(report) -> str:
    """The image report caption of a scrubbed report: its findings and impression."""
    parts = []
    if report.findings:
        parts.append(f"Findings: {report.findings}")
    if report.impression:
        parts.append(f"Impression: {report.impression}")
    return "\n".join(parts)


def region_side(region: dict) -> str:
    """left / right from the region's label (a sided structure) or its measured laterality;
    "none" when neither says."""
    e = _entry(region.get("label") or "")
    if e is not None and e.side != "none":
        return e.side
    lat = region.get("laterality")
    return lat if lat in ("left", "right") else "none"


def fits(g, region: dict) -> bool:
    """A grounding's mention names ``region``'s structure on a compatible side."""
    mine, theirs = _entry(region.get("label") or ""), _entry(g.label)
    if mine is None or theirs is None or mine.structure != theirs.structure:
        return False
    side = theirs.side if theirs.side != "none" else g.side
    return side == "none" or side == region_side(region)


def _phrase(label: str) -> str:
    e = _entry(label)
    text = e.phrase if e is not None else label.replace("_", " ")
    text = text.removeprefix("the ")
    return text[:1].upper() + text[1:]


def ground_captions(images: list[dict], regions: list[dict], report: UnitReport | None) -> None:
    """Set the provenance columns of every image and region (in place); with a report, its
    caption and the sentences it grounds (module docstring)."""
    for im in images:
        im["caption_report_source"] = TEMPLATE if im.get("caption_report") else None
        if report is not None and report.text:
            im["caption_report"], im["caption_report_source"] = report.text, REPORT
    for r in regions:
        r["caption_provenance"] = TEMPLATE if r.get("caption_region") else None
        r["report_sentence_id"] = None
    if report is None or not regions:
        return
    stated = {g.label for g in report.groundings if not g.negated}
    absent = sorted({g.label for g in report.groundings
                     if g.negated and g.label not in stated and _is_finding(g.label)})
    for r in regions:
        if not r.get("caption_region"):
            continue
        template = r["caption_region"]
        hit = next((g for g in report.groundings
                    if not g.negated and not g.uncertain and fits(g, r)), None)
        if hit is None:
            continue
        r["caption_region"] = f"{hit.sentence} {template}"
        r["caption_provenance"], r["report_sentence_id"] = REPORT_AND_TEMPLATE, hit.sentence_id
        # the template's negatives carry the same sentence, and a negated finding takes its
        # place in another: caption and negatives have the same form (no text-only cue)
        r["negatives"] = [f"{hit.sentence} {n}" for n in r.get("negatives") or []]
        r["negatives"] += [f"{_phrase(label)}. {template}" for label in absent]
        r["negative_kinds"] = [*(r.get("negative_kinds") or []), *[NEGATED_KIND] * len(absent)]


def _is_finding(label: str) -> bool:
    return label in _vocabs()[1].entries


def unit_report(report, known) -> UnitReport | None:
    """The worker's second de-identification pass (the header's names and IDs) and the
    grounding of a study's report; None without a report."""
    if report is None:
        return None
    from pipeline.reports.ground import ground
    from pipeline.reports.tables import Report
    from pipeline.reports.text_deid import scrub_known

    clean = Report(findings=scrub_known(report.findings, known),
                   impression=scrub_known(report.impression, known))
    return UnitReport(report_caption(clean), ground(clean, vocabulary_terms()))


def _stored_groundings(image: dict) -> tuple:
    return _groundings_of(image.get("caption_report") or "")


@functools.lru_cache(maxsize=256)
def _groundings_of(caption_report: str) -> tuple:
    """The groundings of a stored report caption, once per text (the checker asks for each
    region of an image, and a study's images share one report)."""
    from pipeline.reports.ground import ground
    from pipeline.reports.sections import split_sections
    from pipeline.reports.tables import Report

    parts = split_sections(caption_report)
    report = Report(findings=parts.get("findings", ""), impression=parts.get("impression", ""))
    return tuple(ground(report, vocabulary_terms()))


def template_view(image: dict, region: dict) -> tuple[dict, list[str]]:
    """(the region as the template made it, problems): for a ``report+template`` region, the
    report sentence taken off its caption and its template negatives, and its
    ``report_negated`` negatives checked against the stored report and left out; the problems
    are check names (:func:`check_grounded`'s, and ``report_negated`` for a negative that
    is not "<phrase>. <template>" of a finding the stored report negates and does not state)."""
    if region.get("caption_provenance") != REPORT_AND_TEMPLATE:
        return region, []
    problem = check_grounded(image, region)
    if problem is not None:
        return region, [problem]
    groundings = _stored_groundings(image)
    sentence = next(g.sentence for g in groundings
                    if g.sentence_id == region.get("report_sentence_id"))
    template = region["caption_region"][len(sentence) + 1:]
    stated = {g.label for g in groundings if not g.negated}
    allowed = {f"{_phrase(g.label)}. {template}" for g in groundings
               if g.negated and g.label not in stated and _is_finding(g.label)}
    negatives, kinds, problems = [], [], []
    for text, kind in zip(region.get("negatives") or [], region.get("negative_kinds") or [],
                          strict=True):
        if kind == NEGATED_KIND:
            if text not in allowed:
                problems.append(NEGATED_KIND)
        elif text.startswith(sentence + " "):
            negatives.append(text[len(sentence) + 1:])
            kinds.append(kind)
        else:
            problems.append("sentence")
    return {**region, "caption_region": template, "negatives": negatives,
            "negative_kinds": kinds}, problems


def check_grounded(image: dict, region: dict) -> str | None:
    """None when a stored region caption's report provenance holds, else the failed check's
    name: ``sentence`` (not the stated sentence of the stored report), ``grounding`` (the
    sentence does not name the region's structure and side, or only negated/uncertain)."""
    if region.get("caption_provenance") != REPORT_AND_TEMPLATE:
        return None
    sid = region.get("report_sentence_id")
    mine = [g for g in _stored_groundings(image) if g.sentence_id == sid]
    if not mine or not (region.get("caption_region") or "").startswith(mine[0].sentence):
        return "sentence"
    if not any(not g.negated and not g.uncertain and fits(g, region) for g in mine):
        return "grounding"
    return None
