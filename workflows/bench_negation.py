"""python -m workflows.bench_negation [--limit N]

Negation agreement on the 3,955 Indiana University chest X-ray reports that the
``torchxrayvision`` package ships (``data/NLMCXR_reports.tgz``; CC BY-NC-ND: read in place,
never copied, no report text printed). Each report's FINDINGS and IMPRESSION go through
``pipeline.reports`` (scrub → sentences → mentions with negspacy's NegEx) and, independently,
through medspacy's ConText on the same sentences with the same term patterns. Prints JSON:
reports, sentences, mentions, % agreement and Cohen's kappa on ``negated`` (scikit-learn),
disagreements by kind, the regex-oracle count of positive "no/without/negative for/free of
<term>" mentions, and seconds. medspacy is not a dependency of the project (its wheels pin
packages this project cannot take); install it without its dependencies:
``pip install --no-deps medspacy==1.0.0 PyRuSH==1.0.13 PyFastNER quicksectx loguru pysbd==0.3.4``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from pipeline.reports import Report
from pipeline.reports.ground import report_sentences
from pipeline.reports.negation import mentions_in_doc, pipeline_for

#: Chest-report finding words added to the build's terms (chest_terms).
FINDING_TERMS = {
    "pleural effusion": "pleural_effusion", "effusion": "pleural_effusion",
    "effusions": "pleural_effusion", "pneumothorax": "pneumothorax",
    "consolidation": "consolidation", "opacity": "opacity", "opacities": "opacity",
    "airspace disease": "opacity", "infiltrate": "opacity", "edema": "edema",
    "cardiomegaly": "cardiomegaly", "atelectasis": "atelectasis", "nodule": "nodule",
    "nodules": "nodule", "mass": "mass", "pneumonia": "pneumonia", "granuloma": "granuloma",
    "fracture": "fracture", "emphysema": "emphysema", "scoliosis": "scoliosis",
}
_NEG_CUE = r"(?:no|without|negative for|free of)"


def iu_archive() -> Path | None:
    """The IU reports archive inside the installed torchxrayvision, found without importing it
    (its ``__init__`` imports torch); None when the package is not installed."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "NLMCXR_reports.tgz"
    return path if path.is_file() else None


@functools.cache
def iu_reports() -> tuple[tuple[str, str, str], ...]:
    """(report id, findings, impression) of every IU report, in archive order ("" if absent)."""
    archive = iu_archive()
    if archive is None:
        return ()
    out = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            root = ET.parse(tar.extractfile(member)).getroot()
            texts = {a.get("Label"): (a.text or "") for a in root.iter("AbstractText")}
            out.append((Path(member.name).stem, texts.get("FINDINGS", ""),
                        texts.get("IMPRESSION", "")))
    return tuple(out)


def chest_terms() -> dict[str, str]:
    """The terms the build grounds report sentences with
    (``pipeline.captions.grounded.vocabulary_terms``: the structure and finding vocabularies),
    plus :data:`FINDING_TERMS` for chest findings the vocabularies do not name (granuloma,
    fracture, ...): a superset, so every mention the build can attach is checked."""
    from pipeline.captions.grounded import vocabulary_terms

    terms = dict(vocabulary_terms())
    for term, label in FINDING_TERMS.items():
        terms.setdefault(term, label)
    return terms


def context_pipeline(terms: dict[str, str]):
    """medspacy's ConText behind the same EntityRuler patterns (the independent check)."""
    import medspacy  # noqa: F401  (registers "medspacy_context")
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
    ruler.add_patterns([{"label": v, "pattern": k} for k, v in terms.items()])
    nlp.add_pipe("medspacy_context")
    return nlp


def oracle_violations(sentence: str, spans: list[tuple[int, int, bool]]) -> int:
    """Positive mentions directly after "no", "without", "negative for", "free of"."""
    bad = 0
    for start, _end, negated in spans:
        if not negated and re.search(rf"\b{_NEG_CUE}\s+$", sentence[:start], re.IGNORECASE):
            bad += 1
    return bad


def compare(reports, terms: dict[str, str]) -> dict:
    """Ours vs ConText on every mention of every sentence of ``reports`` ((id, f, i) rows)."""
    from sklearn.metrics import cohen_kappa_score

    ours_nlp, ctx_nlp = pipeline_for(terms), context_pipeline(terms)
    ours, theirs, kinds, n_sent, n_oracle = [], [], Counter(), 0, 0
    for _rid, findings, impression in reports:
        sents = report_sentences(Report(findings=findings, impression=impression))
        n_sent += len(sents)
        for sent, doc, cdoc in zip(sents, ours_nlp.pipe(sents), ctx_nlp.pipe(sents), strict=True):
            ms = mentions_in_doc(doc)
            n_oracle += oracle_violations(sent, [(m.start, m.end, m.negated) for m in ms])
            cneg = {(e.start_char, e.end_char): bool(e._.is_negated) for e in cdoc.ents}
            for m in ms:
                theirs_neg = cneg.get((m.start, m.end), False)
                ours.append(m.negated)
                theirs.append(theirs_neg)
                if m.negated != theirs_neg:
                    kinds["ours_negated_context_positive" if m.negated
                          else "ours_positive_context_negated"] += 1
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / max(len(ours), 1)
    kappa = float(cohen_kappa_score(ours, theirs)) if len(set(ours + theirs)) > 1 else 1.0
    return {"n_sentences": n_sent, "n_mentions": len(ours), "n_negated": sum(ours),
            "agreement": round(agree, 4), "kappa": round(kappa, 4),
            "disagreements": dict(kinds), "oracle_positive_after_negation_cue": n_oracle}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="first N reports only (0: all)")
    args = ap.parse_args(argv)
    if iu_archive() is None:
        raise SystemExit("torchxrayvision is not installed: pip install torchxrayvision")
    t0 = time.perf_counter()
    reports = iu_reports()[: args.limit or None]
    # The text goes through scrub + section parsing exactly as load_reports does it.
    from pipeline.reports.text_deid import scrub

    clean = [(rid, " ".join(scrub(f).split()), " ".join(scrub(i).split()))
             for rid, f, i in reports]
    out = {"n_reports": len(clean), **compare(clean, chest_terms()),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
