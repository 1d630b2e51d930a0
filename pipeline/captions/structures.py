"""The structure vocabulary: label names from files → canonical labels, and the label-name gate.

One data file, ``pipeline/captions/structures_v<N>.json`` (docs/vocabulary.md), read by one
cached loader, :func:`load_structures`. Each entry is a :class:`Structure`: a canonical
``label`` (snake_case, the phantoms' / TotalSegmentator's form, e.g. ``adrenal_gland_left``,
``rib_left_8``, ``vertebrae_L2``), the ``structure`` it names, its ``side`` (left, right, none),
an ``index`` (8 for rib 8, ``"L2"`` for a vertebra, else None), a display ``phrase`` ("the left
eighth rib") and a ``category`` (organ, vessel, bone, muscle, lesion, other).

A raw name is matched through its *key* (:func:`name_key`), computed the same way for the
vocabulary's own names (label, phrase, synonyms) and for names read from files::

    1. NFKC; a space is put at camelCase joints: "SpinalCord" → "Spinal Cord",
       "LtLung" → "Lt Lung", "LLung" → "L Lung" (upper-case run followed by Upper+lower)
    2. casefold; split into tokens on every run of non-word characters and "_"
       (so "_ - . / ^ ~ +" and spaces all separate; letters of any script stay in tokens)
    3. leading zeros of a digit run are dropped ("Rib08" → "rib8"); a leading "the" is dropped
    4. side words, anywhere: left = left, lt, l, sin, sx; right = right, rt, r, dx, dex.
       They are removed from the tokens; two different sides → no key (unknown name)
    5. key = (the remaining tokens joined without spaces, side or "none")

    "Lung_L", "LUNG LEFT", "left lung", "L Lung", "Lt Lung", "lung-left" → ("lung", "left")

A key matches only an entry registered with the *same* side: a name that says "left" can never
resolve to a right or unsided structure. No plural/singular rule is applied: plurals that mean
the same structure are listed as synonyms ("kidneys", "tumours"). Names longer than
:data:`MAX_NAME_CHARS` are unknown.

The gate, :func:`safe_label_names`, is the one place label names read from files (RTSTRUCT
ROIName, SEG SegmentLabel, names sidecars, mask file stems) pass before they reach labels,
captions, attributes or negatives: a known name becomes its canonical label, an unknown one the
neutral ``"structure_<value>"``; nothing of an unknown name is kept unless the caller opts in
(``allow_unknown``), because hospitals write patient names, dates and IDs into ROI names.
All functions are pure; the loader validates the file and raises ``ValueError`` on any
inconsistency (an ambiguous key, a phrase or synonym naming the wrong side, a label set that
does not resolve as stated).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

VOCAB_DIR = Path(__file__).resolve().parent
SIDES = ("left", "right", "none")
CATEGORIES = ("organ", "vessel", "bone", "muscle", "lesion", "other", "finding")
#: Side words (whole tokens, after casefolding) and the side they name.
SIDE_WORDS: dict[str, str] = {
    **dict.fromkeys(("left", "lt", "l", "sin", "sx"), "left"),
    **dict.fromkeys(("right", "rt", "r", "dx", "dex"), "right"),
}
#: A raw name longer than this is unknown (no vocabulary name comes close).
MAX_NAME_CHARS = 256
#: With ``allow_unknown``, an unknown name is kept to at most this many characters.
MAX_RAW_LABEL_CHARS = 64

_CAMEL_LOWER_UPPER = re.compile(r"(?<=[a-z])(?=[A-Z])")
_CAMEL_UPPER_RUN = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\W_]+")
_LEADING_ZEROS = re.compile(r"(?<![0-9])0+(?=[0-9])")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*$")
_VERSION_RE = re.compile(r"^v[0-9]+$")


@dataclass(frozen=True)
class Structure:
    """One vocabulary entry (one canonical label)."""

    label: str  # canonical label, e.g. "rib_left_8"
    structure: str  # what it is, e.g. "rib"
    side: str  # "left", "right" or "none"
    index: int | str | None  # 8 for rib 8, "L2" for a vertebra, else None
    phrase: str  # display phrase, e.g. "the left eighth rib"
    category: str  # one of CATEGORIES
    synonyms: tuple[str, ...]  # other names that mean this entry


@dataclass(frozen=True)
class StructureVocab:
    """A loaded vocabulary: entries by label, the key table, and the documented label sets."""

    version: str
    entries: Mapping[str, Structure]  # canonical label → entry
    table: Mapping[tuple[str, str], str]  # name_key → canonical label
    label_sets: Mapping[str, Mapping[str, str | None]]  # set → raw name → label (None: unmapped)


def name_key(name: str) -> tuple[str, str] | None:
    """The (base, side) key of a name (module docstring, steps 1-5); None if it has none."""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        return None
    text = unicodedata.normalize("NFKC", name)
    text = _CAMEL_UPPER_RUN.sub(" ", _CAMEL_LOWER_UPPER.sub(" ", text))
    tokens = [_LEADING_ZEROS.sub("", t) for t in _SEPARATORS.split(text.casefold()) if t]
    if tokens[:1] == ["the"]:
        tokens = tokens[1:]
    sides = {SIDE_WORDS[t] for t in tokens if t in SIDE_WORDS}
    base = "".join(t for t in tokens if t not in SIDE_WORDS)
    if len(sides) > 1 or not base:
        return None
    return base, (sides.pop() if sides else "none")


def _entry(raw: dict) -> Structure:
    e = Structure(label=raw["label"], structure=raw["structure"], side=raw["side"],
                  index=raw.get("index"), phrase=raw["phrase"], category=raw["category"],
                  synonyms=tuple(raw.get("synonyms", ())))
    if not _LABEL_RE.match(e.label):
        raise ValueError(f"structures: label {e.label!r} is not snake_case")
    if e.side not in SIDES or e.category not in CATEGORIES:
        raise ValueError(f"structures: {e.label}: bad side or category")
    if not isinstance(e.index, (int, str, type(None))) or isinstance(e.index, bool):
        raise ValueError(f"structures: {e.label}: index must be an int, a string or null")
    return e


def _register(table: dict, e: Structure) -> None:
    """Put every name of ``e`` in ``table``; a name's side must be the entry's (or, for a
    synonym of a sided entry that carries its side inside a word, like "rkid", none)."""
    for i, name in enumerate((e.label, e.phrase, *e.synonyms)):
        key = name_key(name)
        if key is None:
            raise ValueError(f"structures: {e.label}: name {name!r} has no key")
        if key[1] != e.side and not (i >= 2 and key[1] == "none"):
            raise ValueError(f"structures: {e.label}: name {name!r} names side {key[1]}")
        if table.setdefault(key, e.label) != e.label:
            raise ValueError(f"structures: {name!r} of {e.label} also names {table[key]}")


def vocab_from_dict(doc: dict) -> StructureVocab:
    """A validated :class:`StructureVocab` from the parsed JSON document (``ValueError`` if not)."""
    entries: dict[str, Structure] = {}
    table: dict[tuple[str, str], str] = {}
    for raw in doc["entries"]:
        e = _entry(raw)
        if e.label in entries:
            raise ValueError(f"structures: label {e.label} listed twice")
        entries[e.label] = e
        _register(table, e)
    sets = {name: MappingProxyType(dict(m)) for name, m in doc.get("label_sets", {}).items()}
    for set_name, mapping in sets.items():
        for raw_name, label in mapping.items():
            got = table.get(name_key(raw_name))
            if got != label:
                raise ValueError(f"structures: label set {set_name}: {raw_name!r} → {got}, "
                                 f"stated {label}")
    return StructureVocab(version=doc["version"], entries=MappingProxyType(entries),
                          table=MappingProxyType(table), label_sets=MappingProxyType(sets))


def load_structures(version: str = "v1") -> StructureVocab:
    """The validated vocabulary ``pipeline/captions/structures_<version>.json``; read once per
    process and version (the same object is returned on every later call)."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"structure vocabulary version {version!r}: expected v<number>")
    return _load(version)


@functools.cache
def _load(version: str) -> StructureVocab:
    path = VOCAB_DIR / f"structures_{version}.json"
    if not path.is_file():
        known = sorted(p.stem.split("_", 1)[1] for p in VOCAB_DIR.glob("structures_v*.json"))
        raise ValueError(f"structure vocabulary {version}: unknown; known: {', '.join(known)}")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("version") != version:
        raise ValueError(f"structures_{version}.json declares version {doc.get('version')!r}")
    return vocab_from_dict(doc)


def canonical_label(name: str, vocab: StructureVocab | None = None) -> str | None:
    """The canonical label a raw name means, or None when the vocabulary does not know it."""
    vocab = vocab if vocab is not None else load_structures()
    key = name_key(name)
    return None if key is None else vocab.table.get(key)


def neutral_label(value: int) -> str:
    """The label given to an unknown name of label value ``value``: ``"structure_<value>"``."""
    return f"structure_{int(value)}"


def _kept_raw(name: object) -> str:
    """An unknown name as kept under ``allow_unknown``: printable characters only (drops
    control characters and lone surrogates), whitespace runs → one space, at most
    :data:`MAX_RAW_LABEL_CHARS` characters."""
    text = "".join(c for c in str(name) if c.isprintable() or c.isspace())
    return " ".join(text.split())[:MAX_RAW_LABEL_CHARS].strip()


def safe_label_names(names: Mapping[int, str], allow_unknown: bool = False,
                     vocab: StructureVocab | None = None) -> dict[int, str]:
    """The label-name gate: label value → name, with every name replaced by a safe one.

    Args:
        names: label value → name as read from a file (ROIName, SegmentLabel, sidecar, stem).
        allow_unknown: keep unknown names (cleaned by :func:`_kept_raw`) instead of replacing
            them. This can copy patient names, dates and IDs into the corpus: opt-in only.
        vocab: the vocabulary; the default is ``load_structures()``.

    Returns:
        value → canonical label for known names; → ``"structure_<value>"`` for unknown names
        (or for names that are empty once cleaned), unless ``allow_unknown``. Same input, same
        output; the input is not modified.
    """
    vocab = vocab if vocab is not None else load_structures()
    out: dict[int, str] = {}
    for value, name in names.items():
        label = canonical_label(name, vocab) if isinstance(name, str) else None
        if label is None and allow_unknown:
            label = _kept_raw(name) or None
        out[value] = label if label is not None else neutral_label(value)
    return out
