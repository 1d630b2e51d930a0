"""Report sections and sentences (pure functions over de-identified text).

:func:`split_sections` finds section headers: a header word or phrase of :data:`HEADERS`, any
case, at the start of the text, of a line, or after a sentence end, followed by ":", "-",
"—" or the end of its line ("FINDINGS:", "Impression -", "IMPRESSION" alone on a line).
Variants map to one section name ("impressions", "conclusion" → ``impression``). Text before
the first header (MIMIC-CXR's "FINAL REPORT" preamble, an exam name) is ``preamble``; text
with no header at all is ``findings``. A section that occurs twice is joined.

:func:`sentences` splits on ".", "!", "?" followed by white space and a letter (IU reports
often start a sentence in lower case), a digit or "["; on a full stop glued to the next
sentence after a lower-case word ("normal.No"); and on line breaks. Abbreviations (Dr., vs.,
e.g.) do not end a sentence. List numbers ("1.", "2)") are stripped, and a
sentence with no word other than de-identification tokens or "XXXX" runs is dropped.
"""

from __future__ import annotations

import re

#: header (lower case, single spaces) → section name
HEADERS: dict[str, str] = {
    "findings": "findings", "finding": "findings",
    "impression": "impression", "impressions": "impression",
    "conclusion": "impression", "conclusions": "impression",
    "indication": "indication", "indications": "indication",
    "reason for exam": "indication", "reason for examination": "indication",
    "history": "history", "clinical history": "history", "clinical information": "history",
    "comparison": "comparison", "comparisons": "comparison",
    "technique": "technique", "examination": "examination", "exam": "examination",
    "procedure": "technique", "notification": "notification",
    "recommendation": "recommendation", "recommendations": "recommendation",
    "addendum": "addendum", "wet read": "wet_read", "final report": "preamble",
}
_HEADER_WORDS = "|".join(sorted((h.replace(" ", r"\s+") for h in HEADERS), key=len, reverse=True))
_HEADER = re.compile(
    rf"(?:^|(?<=\n)|(?<=[.!?])[ \t]+)[ \t]*({_HEADER_WORDS})[ \t]*(?::|[-\u2013\u2014](?=\s)|[ \t]*(?=\n|$))",
    re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_ABBREV = {"dr", "mr", "mrs", "ms", "prof", "st", "vs", "approx", "e.g", "i.e", "cf", "fig", "no"}
_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Za-z0-9\[])|(?<=[a-z]{2}\.)(?=[A-Z][a-z])|\s*\n\s*")
_LIST_MARK = re.compile(r"^\(?[0-9]{1,2}[.)](?![0-9])\s*")
_FILLER = re.compile(r"\[(?:NAME|ID|DATE|PHONE|ADDRESS|EMAIL|URL)\]|\bX{2,}\b")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def split_sections(text: str) -> dict[str, str]:
    """Section name → its text (white space collapsed), per the module docstring."""
    hits = list(_HEADER.finditer(text))
    if not hits:
        body = _clean(text)
        return {"findings": body} if body else {}
    out: dict[str, str] = {}
    spans = [("preamble", 0, hits[0].start())] + [
        (HEADERS[_SPACES.sub(" ", m.group(1).lower())], m.end(),
         hits[i + 1].start() if i + 1 < len(hits) else len(text)) for i, m in enumerate(hits)]
    for name, start, end in spans:
        body = _clean(text[start:end])
        if body:
            out[name] = f"{out[name]} {body}" if name in out else body
    return out


def _ends_in_abbreviation(piece: str) -> bool:
    last = piece.rstrip().rsplit(None, 1)[-1].lower() if piece.strip() else ""
    return last.endswith(".") and last[:-1].lstrip("(") in _ABBREV


def sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, in order (module docstring for the rules)."""
    pieces, start = [], 0
    for m in _BOUNDARY.finditer(text):
        piece = text[start:m.start()]
        if "\n" not in m.group() and _ends_in_abbreviation(piece):
            continue  # "Dr. [NAME]" stays one sentence
        pieces.append(piece)
        start = m.end()
    pieces.append(text[start:])
    out = []
    for piece in pieces:
        s = _clean(_LIST_MARK.sub("", piece.strip()))
        if re.search(r"[A-Za-z]", _FILLER.sub(" ", s)):
            out.append(s)
    return out
