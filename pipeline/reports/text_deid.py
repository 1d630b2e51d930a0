"""De-identification of free-text reports: two passes, both before any other code sees the text.

Pass 1, :func:`scrub`, runs on raw text the moment it is read (``tables.load_reports``,
``tables.read_report_file``). It is the project's own fixed set of patterns, applied in the
order of :data:`PATTERNS`, each match replaced by a fixed token:

    [EMAIL]    e-mail addresses
    [URL]      http(s)://... and www....
    [DATE]     12/31/2019, 31.12.19, 2019-12-31, 20191231, Dec 31, 2019, 31 December 2019,
               December 2019, 3rd of March, 12/31 (month/day)
    [PHONE]    (415) 555-1234, 415.555.1234, +1 415 555 1234, 555-1234 after tel/phone/fax
    [ID]       SSN-like 123-45-6789; values after MRN/ID/accession/#; digit runs of 5 or
               more; alphanumeric tokens of 6 or more characters with 3 or more digits
    [ADDRESS]  house number + street + street suffix (+ unit); PO boxes; state + ZIP
    [NAME]     capitalised words after a title (Dr., Mr., Mrs., Ms., Prof.), after
               "Patient:"/"Name:", and after signed/dictated/reviewed/discussed with

The IU collection's own "XXXX" runs carry no digits and are left alone. The result is
deterministic (the same text gives the same output on every run and machine).

The maintained filter the issue names, philter-lite, does not run offline: its
``detect_phi`` always part-of-speech tags the text with NLTK's perceptron tagger, whose data
is not shipped with any package and is fetched from the NLTK data server at first use; its
name filters (the ``set`` and ``regex_context`` filters) depend on those tags. It is therefore
not a dependency; docs/howto.md ("Reports") records this.

Pass 2, :func:`scrub_known`, runs in the unit worker with the identifiers that the study's
DICOM header holds (:class:`Known`): every part of the patient's name as a whole word, any
case → [NAME]; each ID, with or without its separators → [ID]. Nothing here logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOKENS = ("[NAME]", "[ID]", "[DATE]", "[PHONE]", "[ADDRESS]", "[EMAIL]", "[URL]")

_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
          r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_DAY = r"(?:[12][0-9]|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:19|20)[0-9]{2}"
_DATE = "|".join((
    r"(?<![0-9.,/])\b[0-9]{1,2}[/.\-][0-9]{1,2}[/.\-](?:[0-9]{4}|[0-9]{2})\b(?![.,/]?[0-9])",
    r"\b[0-9]{4}[/.\-][0-9]{1,2}[/.\-][0-9]{1,2}(?:[T ][0-9:.]+)?\b",  # 2019-12-31(T10:00)
    rf"\b{_YEAR}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])\b",  # 20191231
    rf"\b{_MONTH}\s+{_DAY}(?:\s*,\s*|\s+){_YEAR}\b",  # Dec 31, 2019
    rf"\b{_DAY}(?:\s+of)?\s+{_MONTH},?\s+{_YEAR}\b",  # 31 December 2019, 3rd of March 2019
    rf"\b{_MONTH}\s+{_YEAR}\b",  # December 2019
    rf"\b{_MONTH}\s+{_DAY}\b(?!\s*(?:mm|cm|%))",  # March 3rd
    rf"\b{_DAY}\s+of\s+{_MONTH}",  # 3rd of March
    r"(?<![0-9.,/])\b(?:0?[1-9]|1[0-2])/(?:[12][0-9]|3[01]|0?[1-9])\b(?![.,/]?[0-9])",  # 12/31
))
_PHONE = "|".join((
    r"(?:\+?1[\s.\-]?)?\(?[0-9]{3}\)?[\s.\-]?[0-9]{3}[\s.\-][0-9]{4}\b(?:\s*(?:ext|x)\.?\s*[0-9]+)?",
    r"(?:\+?1[\s.\-]?)?\([0-9]{3}\)\s*[0-9]{3}[\s.\-]?[0-9]{4}\b",
    r"(?<![0-9])\+?1?[0-9]{10}\b",
    r"(?i:\b(?:tel|phone|ph|fax|pager|cell|mobile)\b\.?\s*(?:no\.?|number|#)?\s*:?\s*)"
    r"[0-9][0-9\s.\-]{5,}[0-9]",
))
_STREET = ("(?:(?i:street|avenue|road|boulevard|lane|highway|parkway)|"
           "(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|"
           "Pl|Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|STREET|AVENUE|ROAD))")
_ADDRESS = "|".join((  # [ \t], not \s: an address never runs into the next line's header
    rf"\b[0-9]{{1,6}}[A-Za-z]?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:[A-Za-z][A-Za-z'\-]*[ \t]+){{1,4}}"
    rf"{_STREET}\b(?:\.(?=,))?"
    r"(?:,?[ \t]*(?:(?i:apt|apartment|suite|ste|unit)\b\.?|#)[ \t]*#?[ \t]*[0-9][0-9A-Za-z\-]*)?"
    r"(?:,[ \t]*[A-Z][A-Za-z]+(?:[ \t]+[A-Z][A-Za-z]+)*)?(?:,?[ \t]*[A-Z]{2}\b)?"
    r"(?:[ \t]+[0-9]{5}(?:-[0-9]{4})?)?",
    r"\b(?i:P\.?[ \t]*O\.?[ \t]*Box)[ \t]+[0-9]+",
    r"\b[A-Z]{2}[ \t]+[0-9]{5}(?:-[0-9]{4})?\b",  # state + ZIP
))
_CAP = r"(?!X{2,}\b)(?:[A-Z]\.|[A-Z][A-Za-z'\-]+)"  # IU's "XXXX" runs are not names
_TITLE = r"(?i:\b(?:dr|doctor|mr|mrs|ms|miss|mx|prof|professor)\b\.?\s+)"
_CONTEXT = "|".join((
    r"(?i:\b(?:patient|pt|name|patient\s+name|physician|radiologist|attending|resident)\s*:\s*)",
    r"(?i:\b(?:signed|dictated|transcribed|reviewed|read|verified|approved|discussed|"
    r"communicated|reported|called)(?:\s+(?:by|with|to))?\s*:?\s+)(?:(?i:dr|doctor)\.?\s+)?",
))
_ID = "|".join((
    r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",  # SSN-like
    r"(?i:\b(?:mrn|mr\s*#|id|acc(?:ession)?(?:\s*(?:no|number|#))?|medical\s+record(?:\s+number)?|"
    r"record\s*(?:no|number|#)|case\s*(?:no|number|#)|no\.|#)\s*[:#]?\s*)(?=[A-Za-z0-9\-]*[0-9])"
    r"[A-Za-z0-9][A-Za-z0-9\-]{2,}",
    r"\b(?=[A-Za-z0-9]*[A-Za-z])(?=(?:[A-Za-z]*[0-9]){3})[A-Za-z0-9]{6,}\b",  # AB123456
    r"(?<![0-9.])[0-9]{5,}(?![0-9]*\.[0-9])",  # digit runs >= 5 (not decimals)
))

#: (token, compiled pattern) in the order they are applied; earlier patterns win.
PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("[EMAIL]", re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")),
    ("[URL]", re.compile(r"(?i:\bhttps?://|\bwww\.)[^\s<>\"]+")),
    ("[DATE]", re.compile(_DATE, re.IGNORECASE)),
    ("[PHONE]", re.compile(_PHONE)),
    ("[ADDRESS]", re.compile(_ADDRESS)),
    ("[ID]", re.compile(_ID)),
)
# A title or context word followed by the name: the name words are replaced, the title kept.
_NAME_TITLE = re.compile(rf"({_TITLE})({_CAP}(?:\s+{_CAP}){{0,3}}|(?!x{{2,}}\b)[a-z][a-z'\-]+)")
_NAME_CONTEXT = re.compile(rf"({_CONTEXT})({_CAP}(?:\s+{_CAP}){{0,3}})")
_NAME_FLIPPED = re.compile(r"\b[A-Z][A-Za-z'\-]+,\s*[A-Z][A-Za-z'\-]+(?=\s*\((?:mrn|dob|id)\b)",
                           re.IGNORECASE)


def scrub(text: str) -> str:
    """Pass 1: the fixed patterns (module docstring) → fixed tokens. ``str`` in, ``str`` out."""
    if not isinstance(text, str):
        raise TypeError("scrub takes text")
    for token, pattern in PATTERNS[:3]:  # e-mail, URL, dates before names eat their words
        text = pattern.sub(token, text)
    for pattern in (_NAME_TITLE, _NAME_CONTEXT):
        text = pattern.sub(lambda m: m.group(1) + "[NAME]", text)
    text = _NAME_FLIPPED.sub("[NAME]", text)
    for token, pattern in PATTERNS[3:]:
        text = pattern.sub(token, text)
    return text


@dataclass(frozen=True)
class Known:
    """Identifiers the study's DICOM header holds, for :func:`scrub_known`.

    ``names``: parts of the patient's name (PatientName components); parts shorter than 2
    characters are ignored. ``ids``: PatientID, AccessionNumber, OtherPatientIDs, ...; values
    with fewer than 3 letters or digits are ignored (they would wipe ordinary numbers)."""

    names: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()

    @classmethod
    def from_header(cls, patient_name: str = "", ids: tuple[str, ...] = ()) -> Known:
        """A PN value ("DOE^JANE^M^^DR", "Doe, Jane") split into its parts; IDs as given."""
        parts = re.split(r"[\^,=\s]+", patient_name or "")
        more = [p for part in parts for p in re.split(r"[\-']", part) if p != part]
        return cls(names=tuple(p for p in parts + more if p), ids=tuple(i for i in ids if i))

    def __repr__(self) -> str:  # the values are identifiers: never printed
        return f"Known(names={len(self.names)}, ids={len(self.ids)})"


def _known_patterns(known: Known) -> list[tuple[str, re.Pattern]]:
    out = []
    for raw in known.ids:
        chars = re.sub(r"[^0-9A-Za-z]", "", str(raw))
        if len(chars) >= 3:  # separators optional: "12-345-678" also matches "12345678"
            body = r"[\s\-./]?".join(re.escape(c) for c in chars)
            out.append(("[ID]", re.compile(rf"(?<![0-9A-Za-z]){body}(?![0-9A-Za-z])",
                                           re.IGNORECASE)))
    names = sorted({n.strip() for n in known.names if len(n.strip()) >= 2}, key=len, reverse=True)
    for name in names:
        out.append(("[NAME]", re.compile(rf"(?<![^\W_]){re.escape(name)}(?![^\W_])",
                                         re.IGNORECASE)))
    return out


def scrub_known(text: str, known: Known) -> str:
    """Pass 2: the header's own identifiers → [ID] / [NAME] (whole words, any case)."""
    if not isinstance(text, str):
        raise TypeError("scrub_known takes text")
    for token, pattern in _known_patterns(known):
        text = pattern.sub(token, text)
    return text
