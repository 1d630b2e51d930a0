"""Captions from checked facts: region captions, hard negatives, image summary and report.

``describe_image`` is a pure function of an images-table row, its decoded pixels and its
region rows: it derives attributes (pipeline.captions.attributes), renders one caption per region from a
template chosen by a seeded hash of the region id (phrasing variety, deterministic), and writes
negatives that reuse the SAME template with exactly one attribute changed to a value that is
false for the region (laterality, label → a plausible confuser, size class, intensity,
location). A negative that would describe another true region of the image is discarded.
Templates and vocabulary: ``pipeline/captions/vocab_<version>.json``; the version is stored in
``caption_version``.

v1 picks the changed value from fixed confuser lists. v2 (the default) names each structure by
the structure vocabulary's display phrase ("the left adrenal gland"), states a measured side
only for unpaired lesions, and draws each negative's value from per-structure priors
(:mod:`pipeline.captions.negatives`), so that negatives read like positives.

Projection images (an image row with ``projection``: CR, DX, MG, US, ...) are captioned with the
``projection_*`` templates: the position in the image, a side only when PatientOrientation gave
one, mm only when the header gave a pixel spacing; the summary names the view and body part
only when ViewPosition / BodyPartExamined did ("Frontal (PA) chest radiograph showing ...").
"""

from __future__ import annotations

import hashlib
import re

from pipeline.captions.attributes import (
    CAPTION_VERSION,
    derive_attributes,
    load_vocab,
    organ_name,
    structure_of,
)
from pipeline.captions.negatives import body_scale_mm, is_sided, sampled_values, with_changed
from pipeline.geometry import body_mask, to_uint8

NEGATIVE_KINDS = ("laterality", "label", "size_class", "intensity_class", "location")


def _pick(key: str, n: int, seed: int) -> int:
    return int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()[:8], 16) % n


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def label_words(label: str, vocab: dict) -> tuple[str, str]:
    """(phrase with its article, noun phrase) naming ``label``: "the left adrenal gland",
    "left adrenal gland"; v1 and unknown labels: the display words."""
    entry = structure_of(label, vocab)
    noun = entry.phrase.removeprefix("the ") if entry is not None else label
    return f"the {noun}", noun


def _intensity_words(a: dict, vocab: dict, modality: str) -> dict:
    table = vocab["projection_intensity_words" if a.get("image_position") else "intensity_words"]
    return table.get(modality, table["*"])


def render_region(a: dict, template: str, vocab: dict, modality: str) -> str:
    """One caption from attributes ``a`` and a template string."""
    words = _intensity_words(a, vocab, modality)
    side = vocab["laterality_words"].get(a["laterality"] or "", "")
    if is_sided(a["label"], vocab):  # the phrase names the structure's own side
        side = ""
    phrase, noun = label_words(a["label"], vocab)
    loc = f"{a['location_relation']} the {a['location']}" if a.get("location") else ""
    diameter = a.get("diameter_text") or (
        "" if a["max_diameter_mm"] is None else f"{a['max_diameter_mm']:.0f}")
    text = template.format(
        size=a["size_class"], Size=_cap(a["size_class"]), intensity=words[a["intensity_class"]],
        label=a["label"], Label=_cap(a["label"]), location=loc, side=side,
        phrase=phrase, Phrase=_cap(phrase), noun=noun, Noun=_cap(noun),
        diameter=diameter, shape=vocab["shape_words"][a["shape_class"]],
        position=a.get("image_position") or "")
    text = " ".join(text.replace(" ,", ",").split()).replace(", .", ".").replace(" :", ":")
    return re.sub(r",([:.,])", r"\1", text)  # an empty {side} before ":" / "." / ","


def templates_of(a: dict, vocab: dict) -> list[str]:
    """The templates a region's caption is drawn from: lesion or organ; on a projection image
    (``image_position`` set) the projection ones, with mm only when a diameter in mm exists."""
    kind = "region_templates" if a["is_lesion"] else "organ_templates"
    if a.get("image_position"):
        mm = "_mm" if a["max_diameter_mm"] is not None else ""
        return vocab[f"projection_{kind}{mm}"]
    return vocab[kind]


def template_for(region_id: str, a: dict, vocab: dict, seed: int) -> str:
    ts = templates_of(a, vocab)
    return ts[_pick(region_id, len(ts), seed)]


def _alternatives(kind: str, a: dict, vocab: dict, true_labels: set[str]) -> list:
    if kind == "laterality":
        return {"right": ["left"], "left": ["right"]}.get(a["laterality"], [])
    if kind == "label":
        pool = vocab["confusers"].get(a["label"], vocab["confusers"]["*"])
        return [x for x in pool if x != a["label"] and x not in true_labels]
    if kind == "size_class":
        names = [n for n, _, _ in vocab["size_classes_mm"]]
        i = names.index(a["size_class"])
        return [names[j] for j in sorted(range(len(names)), key=lambda j: -abs(j - i)) if j != i]
    if kind == "intensity_class":
        return {"hyper": ["hypo"], "hypo": ["hyper"], "iso": ["hyper", "hypo"]}[a["intensity_class"]]
    if kind == "location" and a.get("location"):
        organs = sorted({v for v in vocab["label_display"].values() if v != a["location"]}
                        - {x for x in vocab["label_display"].values() if "nodule" in x or "mass" in x})
        return [o for o in organs if o not in true_labels and o != "body"]
    return []


def fact_key(a: dict) -> tuple:
    """The facts a caption states, as a tuple: equal keys describe the same finding."""
    return (a["label"], a["laterality"], a["size_class"], a["intensity_class"], a.get("location"))


LABEL_PLACEHOLDERS = ("{label}", "{Label}", "{phrase}", "{Phrase}", "{noun}", "{Noun}")
PLACEHOLDERS = {"laterality": ("{side}",), "label": LABEL_PLACEHOLDERS,
                "size_class": ("{size}", "{Size}", "{diameter}"), "intensity_class": ("{intensity}",),
                "location": ("{location}",)}


def _candidates(a: dict, template: str, vocab: dict, true_labels: set, seed: int, key: str):
    """(kind, value) pairs, round-robin over kinds: first choices of every kind, then seconds."""
    per_kind = []
    for kind in NEGATIVE_KINDS:
        if not any(p in template for p in PLACEHOLDERS[kind]):
            continue
        options = _alternatives(kind, a, vocab, true_labels)
        if kind in ("label", "location") and options:
            start = _pick(f"{key}|{kind}", len(options), seed)
            options = options[start:] + options[:start]
        per_kind.append([(kind, v) for v in options])
    for rank in range(max((len(o) for o in per_kind), default=0)):
        for options in per_kind:
            if rank < len(options):
                yield options[rank]


def shows(kind: str, a: dict, template: str, vocab: dict) -> bool:
    """Whether ``template`` states attribute ``kind`` of ``a`` (a paired structure's side is
    stated by its phrase)."""
    if kind == "laterality" and is_sided(a["label"], vocab):
        return any(p in template for p in LABEL_PLACEHOLDERS)
    return any(p in template for p in PLACEHOLDERS[kind])


def _side_unknown(kind: str, a: dict, vocab: dict) -> bool:
    """A projection image's region without a known side (no PatientOrientation): a side
    negative would not be false, only unverifiable, so none is made."""
    return (kind == "laterality" and a.get("image_position") is not None
            and a["laterality"] is None and not is_sided(a["label"], vocab))


def _sampled_negatives(a: dict, template: str, others: list[dict], vocab: dict, modality: str,
                       seed: int, key: str, contrast=None,
                       scale: float = 0.0) -> tuple[list[str], list[str]]:
    """v2: the drawn values of every kind the template states (pipeline.captions.negatives);
    a text that is the positive, or this template's caption of another region, is dropped."""
    taken = {render_region(o, template, vocab, modality) for o in [a, *others]}
    present = {o["label"] for o in others}
    texts, kinds = [], []
    for kind in NEGATIVE_KINDS:
        if not shows(kind, a, template, vocab) or _side_unknown(kind, a, vocab):
            continue
        for value in sampled_values(kind, a, template, present, vocab, seed, key, contrast,
                                    scale):
            text = render_region(with_changed(a, kind, value, vocab), template, vocab, modality)
            if text not in taken and text not in texts:
                texts.append(text)
                kinds.append(kind)
    return texts, kinds


def negatives_for(a: dict, template: str, others: list[dict], vocab: dict, modality: str,
                  seed: int, key: str, minimum: int = 3,
                  contrast: bool | None = None,
                  scale: float = 0.0) -> tuple[list[str], list[str]]:
    """v1: one negative per kind the template can state (in NEGATIVE_KINDS order), then further
    values until there are ``minimum``; never another region's truth, never the positive.
    v2 (a vocabulary with ``priors``): :func:`_sampled_negatives` (``contrast``: the image's;
    ``scale``: its body scale, :func:`pipeline.captions.negatives.body_scale_mm`).
    """
    if vocab.get("priors"):
        return _sampled_negatives(a, template, others, vocab, modality, seed, key, contrast,
                                  scale)
    true_labels = {o["label"] for o in others} | {a["label"]}
    other_facts = {fact_key(o) for o in others}
    positive = render_region(a, template, vocab, modality)
    texts, kinds = [], []
    for kind, value in _candidates(a, template, vocab, true_labels, seed, key):
        if kind in kinds and len(texts) >= minimum:
            continue
        b = with_changed(a, kind, value, vocab)
        text = render_region(b, template, vocab, modality)
        if fact_key(b) in other_facts or text == positive or text in texts:
            continue
        texts.append(text)
        kinds.append(kind)
    return texts, kinds


def _findings(attrs: list[dict], captions: list[str]) -> list[str]:
    lesions = [c for a, c in zip(attrs, captions, strict=True) if a and a["is_lesion"]]
    return lesions


def _body(image: dict, attrs: list[dict], vocab: dict) -> str:
    if image.get("body_part"):
        part = image["body_part"].upper()
        return vocab["body_part_words"].get(part.replace(" ", ""), part.lower())
    for a in attrs:
        if a and organ_name(a["label"], vocab) in vocab["body_regions"]:
            return vocab["body_regions"][organ_name(a["label"], vocab)]
    return "body"


def _image_phrase(image: dict, vocab: dict) -> str:
    """"frontal (PA) chest radiograph": the view and body part only when the header named
    them (ViewPosition, BodyPartExamined), then the modality's noun."""
    view = vocab["view_words"].get(image.get("view_position") or "", "")
    part = (image.get("body_part") or "").upper().replace(" ", "")
    body = vocab["body_part_words"].get(part, part.lower()) if part else ""
    nouns = vocab["projection_nouns"]
    return " ".join(w for w in (view, body, nouns.get(image["modality"], nouns["*"])) if w)


def _projection_texts(image: dict, findings: str, items: str, contrast: str,
                      vocab: dict, seed: int) -> tuple[str, str]:
    """The summary and report of a projection image: the view, spacing and contrast the header
    gave; ``items``: the numbered findings text."""
    ts = vocab["projection_summary_templates"]
    t = ts[_pick(image["image_id"], len(ts), seed)]
    summary = t.format(Image=_cap(_image_phrase(image, vocab)), findings=findings)
    report = vocab["projection_report_template"].format(
        modality=image["modality"], view=image.get("view_position") or "not recorded",
        spacing="from the header" if image.get("spacing_known") else "not recorded",
        contrast=contrast, findings=items)
    return summary, report


def summary_and_report(image: dict, attrs: list[dict], captions: list[str], vocab: dict,
                       seed: int) -> tuple[str, str]:
    """The image's one-sentence summary and its structured report paragraph."""
    lesions = [a for a in attrs if a and a["is_lesion"]]
    organs = sorted({label_words(a["label"], vocab)[1] for a in attrs if a and not a["is_lesion"]})
    if lesions:
        findings = " and ".join(f"a {a['size_class']} {label_words(a['label'], vocab)[1]}" + (
            f" on the {a['laterality']}" if a["laterality"] in ("left", "right")
            and not is_sided(a["label"], vocab) else "") for a in lesions)
    elif organs:
        findings = "no focal lesion; visible structures: " + ", ".join(organs)
    else:
        findings = "no labelled structure"
    contrast = {True: "intravenous contrast", False: "none recorded"}.get(image.get("contrast"),
                                                                         "not recorded")
    items = _findings(attrs, captions) or [findings[0].upper() + findings[1:] + "."]
    body_text = " ".join(f"({i}) {c}" for i, c in enumerate(items, 1))
    if organs and lesions:
        body_text += " Visible structures: " + ", ".join(organs) + "."
    if image.get("projection"):
        return _projection_texts(image, findings, body_text, contrast, vocab, seed)
    body = _body(image, attrs, vocab)
    ts = vocab["summary_templates"]
    t = ts[_pick(image["image_id"], len(ts), seed)]
    summary = t.format(Plane=_cap(image["plane"]), plane=image["plane"],
                       Modality=image["modality"], modality=image["modality"], body=body,
                       findings=findings)
    report = vocab["report_template"].format(
        modality=image["modality"], plane=image["plane"],
        thickness=f"{float(image['slice_thickness_mm']):.1f}", contrast=contrast,
        findings=body_text)
    return summary, report


def describe_image(image: dict, pixels, regions: list[dict], seed: int = 0,
                   version: str = CAPTION_VERSION, body=None, masks: list | None = None) -> None:
    """Fill caption columns of ``image`` and of its ``regions`` (in place). ``pixels``: the
    image's (H, W) uint8/uint16 array (may be None when ``regions`` is empty); ``body``: its
    body mask and ``masks``: the regions' (H, W) bool masks, when already computed."""
    vocab = load_vocab(version)
    if body is None and regions and vocab.get("priors"):  # v2 size negatives need the body
        body = body_mask(to_uint8(pixels))
    scale = body_scale_mm(body, image["pixel_spacing_mm"])
    if image.get("projection") and not image.get("spacing_known"):
        scale = 0.0  # no mm on this image: no size negative drawn in mm
    attrs = derive_attributes(image, pixels, regions, vocab, trust_rows=True, body=body,
                              masks=masks)
    captions = []
    for k, (region, a) in enumerate(zip(regions, attrs, strict=True)):
        region["caption_version"] = vocab["version"]
        region["attributes"] = a
        if a is None:
            region["caption_region"], region["negatives"], region["negative_kinds"] = None, [], []
            captions.append(None)
            continue
        template = template_for(region["region_id"], a, vocab, seed)
        region["caption_region"] = render_region(a, template, vocab, image["modality"])
        others = [o for j, o in enumerate(attrs) if j != k and o]
        region["negatives"], region["negative_kinds"] = negatives_for(
            a, template, others, vocab, image["modality"], seed, region["region_id"],
            contrast=image.get("contrast"), scale=scale)
        captions.append(region["caption_region"])
    image["caption_summary"], image["caption_report"] = summary_and_report(
        image, attrs, captions, vocab, seed)
    image["caption_version"] = vocab["version"]


def describe_all(images: list[dict], regions: list[dict], seed: int = 0,
                 pixels: dict | None = None, bodies: dict | None = None) -> None:
    """Caption every image and region (in place); ``pixels`` maps image_id → decoded PNG and
    ``bodies`` image_id → body mask, where the caller has them."""
    from pipeline.images.png import decode_png

    by_image: dict[str, list[dict]] = {}
    for r in regions:
        by_image.setdefault(r["image_id"], []).append(r)
    for image in images:
        iid = image["image_id"]
        px = (pixels or {}).get(iid)
        describe_image(image, decode_png(image) if px is None else px,
                       by_image.get(iid, []), seed, body=(bodies or {}).get(iid))
