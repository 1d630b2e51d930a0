"""Mentions of vocabulary terms in one sentence, with side, negation and uncertainty.

Terms are found by spaCy's ``EntityRuler`` on a blank English pipeline (no downloaded model):
each lower-cased phrase of ``terms`` is a pattern matched on lower-cased tokens, the longest
match wins ("pleural effusion" over "effusion"), and the entity label is the canonical label.

Negation is NegEx as negspacy implements it, with its ``en_clinical`` term set plus the
post-negations radiology reports use (:data:`EXTRA_FOLLOWING`: "is not seen", "has resolved").
A cue of :data:`NOT_EXCLUDED` ("cannot exclude", "not ruled out") in the same clause (between
",", ";", ":", "but") undoes a negation: "cannot exclude pneumothorax" is not a verified
negative. A mention that is not negated is ``uncertain`` when a hedge cue (:data:`HEDGES`:
"may", "possible", "suggest", "versus") or a NOT_EXCLUDED cue stands in its clause; a negated
one never is ("no opacity to suggest pneumonia" denies both).

``side`` comes from a side word inside the matched phrase, else from the nearest side word
within :data:`SIDE_WINDOW` tokens before or after it in the same clause: left/right
(lt, rt), and "bilateral", "bilaterally", "both" → ``none``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import spacy
from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)
from negspacy.termsets import termset
from spacy.language import Language

SIDE_WORDS = {"left": "left", "lt": "left", "right": "right", "rt": "right",
              "bilateral": "none", "bilaterally": "none", "both": "none"}
SIDE_WINDOW = 4
#: Post-negations added to negspacy's ``en_clinical`` set (findings reported as absent).
EXTRA_FOLLOWING = ["not seen", "is not seen", "are not seen", "not identified", "not present",
                   "not visualized", "not appreciated", "not evident", "is absent", "are absent",
                   "has resolved", "have resolved", "resolved", "excluded", "is excluded"]
#: Pre-negations added to the set.
EXTRA_PRECEDING = ["clear of", "negative for", "no evidence for", "no radiographic evidence of",
                   "without evidence of", "no definite", "no acute", "no focal", "resolved",
                   "resolving"]
#: Hedge cues (lower-case token sequences) that make a mention uncertain.
HEDGES = (("may",), ("might",), ("could",), ("possible",), ("possibly",), ("probable",),
          ("probably",), ("likely",), ("questionable",), ("question",), ("suspicious",),
          ("suggestive",), ("suggests",), ("suggest",), ("concerning",), ("versus",), ("vs",),
          ("vs.",), ("equivocal",), ("borderline",), ("differential",))
#: Hedges that also undo a negation ("cannot exclude X" is not a verified negative).
NOT_EXCLUDED = (("can", "not", "exclude"), ("can", "not", "be", "excluded"), ("not", "excluded"),
                ("not", "entirely", "excluded"), ("not", "completely", "excluded"),
                ("can", "not", "rule", "out"), ("not", "ruled", "out"), ("rule", "out"),
                ("r/o",), ("to", "exclude"))
_CLAUSE_BREAKS = {",", ";", ":", "but", "however", "although", "though", "whereas"}


@dataclass(frozen=True)
class Mention:
    """One term found in a sentence."""

    label: str  # canonical label the term maps to
    side: str  # "left" | "right" | "none"
    negated: bool  # NegEx: the finding is stated absent
    uncertain: bool  # a hedge cue in the same clause
    start: int = 0  # character offsets of the matched phrase in the sentence
    end: int = 0


@Language.component("report_one_sentence")
def _one_sentence(doc):
    """The caller passes one sentence: the whole doc is one (NegEx needs boundaries)."""
    for t in doc:
        t.is_sent_start = t.i == 0
    return doc


@functools.lru_cache(maxsize=8)
def _pipeline(items: tuple[tuple[str, str], ...]):
    nlp = spacy.blank("en")
    nlp.add_pipe("report_one_sentence")
    ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
    ruler.add_patterns([{"label": label, "pattern": phrase} for phrase, label in items])
    ts = termset("en_clinical")
    ts.remove_patterns({"following_negations": ["free"]})  # "lungs are free of X": X, not lungs
    ts.add_patterns({"following_negations": EXTRA_FOLLOWING,
                     "preceding_negations": EXTRA_PRECEDING + ["free of"]})
    nlp.add_pipe("negex", config={"neg_termset": ts.get_patterns()})
    return nlp


def pipeline_for(terms: Mapping[str, str]):
    """The cached spaCy pipeline for ``terms`` (phrase → label), phrases lower-cased."""
    items = tuple(sorted((str(k).lower().strip(), str(v)) for k, v in terms.items()
                         if str(k).strip()))
    return _pipeline(items)


def _clause(doc, i: int) -> tuple[int, int]:
    """Token range [lo, hi) of the clause around token ``i``."""
    lo = i
    while lo > 0 and doc[lo - 1].lower_ not in _CLAUSE_BREAKS:
        lo -= 1
    hi = i
    while hi < len(doc) and doc[hi].lower_ not in _CLAUSE_BREAKS:
        hi += 1
    return lo, hi


def _has(words: list[str], cues) -> bool:
    return any(tuple(words[i:i + len(c)]) == c for c in cues for i in range(len(words)))


def _side(doc, ent, lo: int, hi: int) -> str:
    inside = [SIDE_WORDS[t.lower_] for t in ent if t.lower_ in SIDE_WORDS]
    if inside:
        return inside[0]
    best = None
    for t in doc[max(lo, ent.start - SIDE_WINDOW):min(hi, ent.end + SIDE_WINDOW)]:
        if t.lower_ in SIDE_WORDS and not (ent.start <= t.i < ent.end):
            dist = ent.start - t.i if t.i < ent.start else t.i - ent.end + 1.5
            if best is None or dist < best[0]:
                best = (dist, SIDE_WORDS[t.lower_])
    return best[1] if best else "none"


def mentions_in_doc(doc) -> list[Mention]:
    """The mentions of a processed doc (one sentence), in text order."""
    out = []
    for ent in doc.ents:
        lo, hi = _clause(doc, ent.start)
        words = [t.lower_ for t in doc[lo:hi]]
        negated = bool(ent._.negex) and not _has(words, NOT_EXCLUDED)
        uncertain = not negated and _has(words, HEDGES + NOT_EXCLUDED)
        out.append(Mention(label=ent.label_, side=_side(doc, ent, lo, hi),
                           negated=negated, uncertain=uncertain,
                           start=ent.start_char, end=ent.end_char))
    return out


def mentions(sentence: str, terms: Mapping[str, str]) -> list[Mention]:
    """Every term of ``terms`` (lower-case phrase → label) in ``sentence``, module docstring."""
    return mentions_in_doc(pipeline_for(terms)(sentence))
