"""The caption checker: re-derive every checkable attribute from the stored corpus and compare.

For each image (PNG, window, geometry) and its regions (masks), attributes are derived again
with :func:`pipeline.captions.attributes.derive_attributes`, then:

* attributes: the stored ``attributes`` struct must equal the re-derived one (classes exactly,
  numbers within 1e-6);
* region caption: must be the rendering of the re-derived attributes with one of the
  vocabulary's templates (whichever seed chose it), or — for a paraphrase written by the
  optional rewriter — must state every re-derived attribute and contradict none
  (pipeline.captions.rewrite.states_facts);
* negatives: each must be the rendering, with the caption's own template, of the re-derived
  attributes with exactly the attribute named in ``negative_kinds`` set to another value — so it
  contradicts the region in that attribute and agrees in every other — and its facts must not
  be those of another region on the same image;
* image summary and report: must be the rendering of the re-derived facts;
* projection images (CR, DX, MG, US, ...): the facts of :data:`PROJECTION_FACTS` come from the
  shard's series table (joined by ``series_key``), so the position in the image, the side from
  PatientOrientation, the size relative to the image (no mm without a header spacing), the
  view and body part of the summary are re-derived and compared like every other fact;
* blind model (:mod:`pipeline.captions.blind`): a text-only classifier trained on the region
  captions against their negatives, grouped by image, must not beat ``blind_threshold``
  balanced accuracy (judged from ``blind_min_captions`` captions on).

v2 negatives (pipeline.captions.negatives) are checked by the same rule: the negative's value is
read back from its text (a structure named in it, a number in it, a class word), and the
negative must contradict the region (:func:`pipeline.captions.negatives.contradicts`) and must
not be the same template's caption of another region on the image.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.captions.attributes import PROJECTION_FACTS, derive_attributes, load_vocab
from pipeline.captions.blind import BLIND_THRESHOLD, blind_accuracy
from pipeline.captions.describe import (
    fact_key,
    label_words,
    render_region,
    summary_and_report,
    templates_of,
    with_changed,
)
from pipeline.captions.grounded import REPORT, template_view
from pipeline.captions.negatives import contradicts
from pipeline.captions.rewrite import states_facts
from pipeline.captions.structures import load_structures
from pipeline.images.png import decode_png
from pipeline.write import committed_tables, read_manifest

IMAGE_COLUMNS = ["image_id", "series_key", "modality", "plane", "pixel_to_ras", "pixel_spacing_mm",
                 "window_min", "window_max", "slice_thickness_mm", "contrast", "body_part",
                 "caption_summary", "caption_report", "caption_version", "image"]


OPTIONAL_IMAGE_COLUMNS = ["caption_report_source"]  # absent from corpora built before reports


def _all_values(kind: str, vocab: dict) -> list:
    displays = sorted(set(vocab["label_display"].values()))
    confusers = sorted({x for v in vocab["confusers"].values() for x in v})
    return {
        "laterality": ["right", "left", "midline"],
        "label": sorted(set(displays) | set(confusers)),
        "size_class": [n for n, _, _ in vocab["size_classes_mm"]],
        "intensity_class": ["hyper", "iso", "hypo"],
        "location": displays,
    }[kind]


#: The minimum number of region captions from which the blind check is judged.
BLIND_MIN_CAPTIONS = 100


def _values_v2(kind: str, text: str, a: dict, others: list[dict], vocab: dict) -> list:
    """v2: the values of ``kind`` a negative ``text`` may state, read back from the text."""
    low = text.lower()
    if kind == "label":
        known = load_structures(vocab["structures"]).entries
        names = {*known, *(o["label"] for o in others), a["label"]}
        return sorted(n for n in names if label_words(n, vocab)[1].lower() in low)
    if kind == "size_class":
        numbers = {int(n) for n in re.findall(r"\b[0-9]+\b", text)}
        return sorted(numbers | set(vocab["size_examples_mm"].values()))
    if kind == "location":
        known = load_structures(vocab["structures"]).entries.values()
        return sorted({e.structure for e in known if e.structure in low})
    return {"laterality": ["left", "right", "midline"],
            "intensity_class": ["hyper", "iso", "hypo"]}[kind]


def _check_negative_v2(text, kind, a, template, others, vocab, modality) -> bool:
    """True when ``text`` is ``a`` with ``kind`` changed to a value that contradicts it, and is
    not this template's caption of another region on the image."""
    if text in {render_region(o, template, vocab, modality) for o in others}:
        return False
    for value in _values_v2(kind, text, a, others, vocab):
        b = with_changed(a, kind, value, vocab)
        if render_region(b, template, vocab, modality) == text:
            return contradicts(kind, a, b, template, vocab)
    return False


def _same_attributes(stored: dict | None, derived: dict | None) -> bool:
    if stored is None or derived is None:
        return stored is None and derived is None
    for k, v in derived.items():
        s = stored.get(k)
        if isinstance(v, float) and s is not None:
            if abs(float(s) - v) > 1e-6:
                return False
        elif s != v:
            return False
    return True


def _check_negative(text, kind, a, template, others, vocab, modality) -> bool:
    """True when ``text`` is ``a`` with exactly ``kind`` changed to a false value."""
    if vocab.get("priors"):
        return _check_negative_v2(text, kind, a, template, others, vocab, modality)
    other_facts = {fact_key(o) for o in others}
    for value in _all_values(kind, vocab):
        if value == a.get(kind):
            continue
        b = with_changed(a, kind, value, vocab)
        if render_region(b, template, vocab, modality) == text:
            return fact_key(b) not in other_facts
    return False


def _check_region(region, a, others, vocab, modality, tally, problems) -> None:
    tally["regions"] += 1
    if _same_attributes(region.get("attributes"), a):
        tally["attributes_agree"] += 1
    else:
        problems.append({"region_id": region["region_id"], "what": "attributes",
                         "stored": region.get("attributes"), "derived": a})
    if a is None:
        return
    caption = region["caption_region"] or ""
    matches = [t for t in templates_of(a, vocab) if render_region(a, t, vocab, modality) == caption]
    if matches or states_facts(caption, a, modality, vocab):  # template, or a guarded paraphrase
        tally["captions_agree"] += 1
    else:
        problems.append({"region_id": region["region_id"], "what": "caption",
                         "caption": region["caption_region"]})
    for text, kind in zip(region["negatives"] or [], region["negative_kinds"] or [], strict=True):
        tally["negatives"] += 1
        if any(_check_negative(text, kind, a, t, others, vocab, modality)
               for t in (matches or templates_of(a, vocab))):
            tally["negatives_contradict"] += 1
        else:
            problems.append({"region_id": region["region_id"], "what": f"negative ({kind})",
                             "negative": text})


def _check_image(image, regions, vocab, tally, problems, seed: int | None = None) -> None:
    """``seed``: the build's caption seed (manifest); None (older manifests): any seed.
    Report-grounded captions (``pipeline.captions.grounded``) are checked for their sentence,
    then as the template made them; a report caption is the stored report, not a template."""
    pixels = decode_png(image)
    views = [template_view(image, r) for r in regions]
    for r, (_, wrong) in zip(regions, views, strict=True):
        problems += [{"region_id": r["region_id"], "what": f"report sentence ({w})"}
                     for w in wrong]
    regions = [v for v, _ in views]
    attrs = derive_attributes(image, pixels, regions, vocab)
    captions = []
    for k, (region, a) in enumerate(zip(regions, attrs, strict=True)):
        others = [o for j, o in enumerate(attrs) if j != k and o]
        _check_region(region, a, others, vocab, image["modality"], tally, problems)
        captions.append(region["caption_region"])
    tally["images"] += 1
    seeds = [seed] if seed is not None else range(len(vocab["summary_templates"]) * 8)
    for seed_guess in seeds:
        summary, report = summary_and_report(image, attrs, captions, vocab, seed_guess)
        if image.get("caption_report_source") == REPORT:
            report = image["caption_report"]  # the study's report, checked per sentence
        if summary == image["caption_summary"] and report == image["caption_report"]:
            tally["image_captions_agree"] += 1
            return
    problems.append({"image_id": image["image_id"], "what": "summary/report",
                     "summary": image["caption_summary"]})


def _blind(rows: list, threshold: float | None, min_captions: int) -> dict:
    """The blind-model part of the report: its result, the threshold and ``ok`` (None when
    not judged: no threshold, or fewer than ``min_captions`` captions with negatives)."""
    result = blind_accuracy(rows)
    acc = result["balanced_accuracy"]
    judged = threshold is not None and acc is not None and result["captions"] >= min_captions
    return {**result, "threshold": threshold, "min_captions": min_captions,
            "ok": (acc <= threshold) if judged else None}


def _projection_facts(files: dict) -> dict[str, dict]:
    """series_key → its :data:`PROJECTION_FACTS` from a shard's series table (none when the
    table or the columns are absent: a corpus built before projection images existed)."""
    if "series" not in files:
        return {}
    names = set(pq.ParquetFile(files["series"]).schema_arrow.names)
    columns = [c for c in PROJECTION_FACTS if c in names]
    if not columns:
        return {}
    rows = pq.read_table(files["series"], columns=["series_key", *columns]).to_pylist()
    return {r.pop("series_key"): r for r in rows}


def verify_captions(corpus: str | Path, max_problems: int = 50, manifest: dict | None = None,
                    blind_threshold: float | None = BLIND_THRESHOLD,
                    blind_min_captions: int = BLIND_MIN_CAPTIONS) -> dict:
    """Check every committed shard of ``corpus`` (the files of ``manifest``, by default its
    manifest.json); returns counts, rates, the first problems and ``blind`` (the text-only
    classifier's balanced accuracy: :mod:`pipeline.captions.blind`). ``ok`` is False on any
    disagreement, or when the blind classifier's balanced accuracy exceeds
    ``blind_threshold`` (None: reported, never judged) on at least ``blind_min_captions``
    captions."""
    corpus = Path(corpus)
    manifest = read_manifest(corpus) if manifest is None else manifest
    tally = dict.fromkeys(("images", "image_captions_agree", "regions", "attributes_agree",
                           "captions_agree", "negatives", "negatives_contradict"), 0)
    problems: list[dict] = []
    blind_rows: list[tuple] = []
    for files in committed_tables(corpus, manifest).values():
        if "images" not in files:
            continue
        names = set(pq.ParquetFile(files["images"]).schema_arrow.names)
        images = pq.read_table(files["images"], columns=IMAGE_COLUMNS + [
            c for c in OPTIONAL_IMAGE_COLUMNS if c in names]).to_pylist()
        facts = _projection_facts(files)
        regions = pq.read_table(files["regions"]).to_pylist() if "regions" in files else []
        by_image: dict[str, list] = {}
        for r in regions:
            by_image.setdefault(r["image_id"], []).append(r)
            blind_rows.append((r["image_id"], r["caption_region"], r["negatives"]))
        for image in images:
            image.update(facts.get(image["series_key"], {}))
            vocab = load_vocab(image["caption_version"] or "v1")
            _check_image(image, by_image.get(image["image_id"], []), vocab, tally, problems,
                         manifest.get("caption_seed"))
    rate = lambda a, b: 1.0 if tally[b] == 0 else tally[a] / tally[b]  # noqa: E731
    blind = _blind(blind_rows, blind_threshold, blind_min_captions)
    return {**tally,
            "caption_agreement": rate("captions_agree", "regions"),
            "attribute_agreement": rate("attributes_agree", "regions"),
            "negative_contradiction": rate("negatives_contradict", "negatives"),
            "image_caption_agreement": rate("image_captions_agree", "images"),
            "blind": blind, "ok": not problems and blind["ok"] is not False,
            "problems": problems[:max_problems]}
