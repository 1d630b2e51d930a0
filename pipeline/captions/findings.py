"""The finding vocabulary: class names of annotation tables and finding words of reports →
canonical finding labels.

One data file, ``pipeline/captions/findings_v<N>.json``, with the schema of the structure
vocabulary (:mod:`pipeline.captions.structures`; category ``finding``, side ``none``: a
finding's side comes from where its region lies, never from its name) and read by the same
validating parser. Names match through :func:`pipeline.captions.structures.name_key`, so case,
separators and a leading "the" do not matter; plurals are listed as synonyms. Its label sets
(``vindr``, ``rsna``, ``nih``, ``siim``) state what each collection's class names resolve to and
are checked at load. docs/vocabulary.md ("Findings") gives the mapping choices (RSNA's "Lung
Opacity", VinDr's "Nodule/Mass").
"""

from __future__ import annotations

import functools
import json
import re

from pipeline.captions.structures import VOCAB_DIR, StructureVocab, name_key, vocab_from_dict

#: Class names that list an image as annotated with nothing on it (compared by name key).
NO_FINDING_NAMES = ("No finding", "No findings", "Normal")
_VERSION_RE = re.compile(r"^v[0-9]+$")


def load_findings(version: str = "v1") -> StructureVocab:
    """The validated finding vocabulary ``findings_<version>.json``; read once per process and
    version. ``ValueError`` on a bad or unknown version or an inconsistent file."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError("finding vocabulary version: expected v<number>")
    return _load(version)


@functools.cache
def _load(version: str) -> StructureVocab:
    path = VOCAB_DIR / f"findings_{version}.json"
    if not path.is_file():
        raise ValueError("finding vocabulary: unknown version")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("version") != version:
        raise ValueError("finding vocabulary: the file declares another version")
    vocab = vocab_from_dict(doc)
    if any(e.category != "finding" or e.side != "none" for e in vocab.entries.values()):
        raise ValueError("finding vocabulary: every entry must be category finding, side none")
    return vocab


def canonical_finding(name: str, vocab: StructureVocab | None = None) -> str | None:
    """The canonical finding label a raw class name means, or None when unknown."""
    vocab = vocab if vocab is not None else load_findings()
    key = name_key(name)
    return None if key is None else vocab.table.get(key)


def is_no_finding(name: str) -> bool:
    """Whether a class name says "nothing here" (:data:`NO_FINDING_NAMES`)."""
    key = name_key(name)
    return key is not None and key in _no_finding_keys()


@functools.cache
def _no_finding_keys() -> frozenset:
    return frozenset(name_key(n) for n in NO_FINDING_NAMES)


def finding_terms(version: str = "v1") -> dict[str, str]:
    """Every name of every entry, lower-cased and without a leading "the" (the label with
    spaces for underscores, the phrase, the synonyms) → canonical label: the terms a report
    sentence is matched against (a fresh dict on every call)."""
    return dict(_terms(version))


@functools.cache
def _terms(version: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in load_findings(version).entries.values():
        for name in (e.label.replace("_", " "), e.phrase, *e.synonyms):
            term = " ".join(name.lower().split())
            term = term[4:] if term.startswith("the ") else term
            out.setdefault(term, e.label)
    return out
