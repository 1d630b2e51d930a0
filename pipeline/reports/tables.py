"""Report tables and report files → de-identified :class:`Report` objects under keyed ids.

Formats: CSV, Parquet, JSON lines (``.csv``, ``.parquet``/``.pq``, ``.jsonl``/``.ndjson``/
``.json``), every cell read as text. ``key`` names how a row finds its study:

    study:COLUMN               StudyInstanceUID      → deid.pseudonym("uid", uid)
    accession:COLUMN           AccessionNumber       → deid.pseudonym("accession", value)
    patient_date:PID,DATE      PatientID + StudyDate → deid.pseudonym("patient-date", "PID|YYYYMMDD")

``text`` names the text: one column holding the whole report (its sections are parsed), or
``findings=COL,impression=COL`` (either may be left out). Left out, a column named ``report``
or ``text`` is the whole report, else columns ``findings`` / ``impression`` are used.

:func:`text_deid.scrub` runs on each text cell before anything else looks at it; only the
FINDINGS and IMPRESSION sections are kept. The raw text is kept in no object, and no error
quotes a cell, a column name or the path: a wrong layout raises ``ValueError`` with a fixed
message; an empty or unparsable row is counted in ``n_bad_rows``.

``read_report_file`` reads one ``.txt`` report (MIMIC-CXR lays one out per study, beside its
images) the same way.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field

from pipeline.reports.sections import split_sections
from pipeline.reports.text_deid import scrub

REPORT_KEY_KINDS = ("study", "accession", "patient_date")
KEPT_SECTIONS = ("findings", "impression")
_DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%Y/%m/%d", "%Y.%m.%d", "%m/%d/%Y", "%d.%m.%Y",
                 "%d-%b-%Y", "%d %b %Y", "%b %d %Y", "%B %d %Y", "%d %B %Y")
_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "json",
            ".ndjson": "json", ".json": "json"}


@dataclass(frozen=True)
class Report:
    """The kept, de-identified sections of one report."""

    findings: str  # scrubbed FINDINGS section ("" when absent)
    impression: str  # scrubbed IMPRESSION section ("" when absent)

    @property
    def text(self) -> str:
        """Findings then impression, as the report caption uses them."""
        return " ".join(s for s in (self.findings, self.impression) if s)


@dataclass
class ReportTable:
    """Reports by (key kind, keyed id), and the row accounting of the table they came from."""

    by_key: dict[tuple[str, str], Report] = field(default_factory=dict)
    n_rows: int = 0  # data rows read
    n_bad_rows: int = 0  # rows with no usable key or no findings/impression text
    n_duplicates: int = 0  # rows whose key an earlier row already had (the first one is kept)

    def get(self, kind: str, keyed: str) -> Report | None:
        return self.by_key.get((kind, keyed))


def normalise_date(value: str) -> str:
    """A date in a common form (20190314, 2019-03-14, 03/14/2019, 14.03.2019, 14 Mar 2019,
    2019-03-14T10:00) → "YYYYMMDD"; ``ValueError`` (fixed message) when none fits."""
    text = re.sub(r"\s+", " ", str(value).strip().replace(",", " "))
    text = re.split(r"[T ](?=[0-9]{1,2}:)", text)[0]
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    raise ValueError("report key: the date is in no known form") from None


def report_key(kind: str, raw: str, deid) -> str:
    """The keyed id of a report, computed as the build computes it for the study (module
    docstring). For ``patient_date``, ``raw`` is ``"PatientID|date"`` (date in any form of
    :func:`normalise_date`)."""
    raw = str(raw).strip()
    if kind == "study":
        return deid.pseudonym("uid", raw)
    if kind == "accession":
        return deid.pseudonym("accession", raw)
    if kind == "patient_date":
        pid, sep, date = raw.rpartition("|")
        if not sep or not pid.strip():
            raise ValueError("report key: patient_date needs PatientID|date")
        return deid.pseudonym("patient-date", f"{pid.strip()}|{normalise_date(date)}")
    raise ValueError("report key kind must be one of: study, accession, patient_date")


def parse_key_spec(key: str) -> tuple[str, tuple[str, ...]]:
    """"study:COL" | "accession:COL" | "patient_date:PIDCOL,DATECOL" → (kind, columns)."""
    kind, sep, cols = str(key).partition(":")
    columns = tuple(c.strip() for c in cols.split(",") if c.strip())
    want = {"study": 1, "accession": 1, "patient_date": 2}
    if not sep or kind not in want or len(columns) != want[kind]:
        raise ValueError("--reports key must be study:COLUMN, accession:COLUMN or "
                         "patient_date:PATIENT_COLUMN,DATE_COLUMN")
    return kind, columns


def parse_text_spec(text: str | None, columns: list[str]) -> dict[str, str]:
    """The text columns: {"report": col} or {"findings": col, "impression": col} (module
    docstring); ``ValueError`` with a fixed message when the table lacks them."""
    if text is None:
        whole = [c for c in ("report", "text") if c in columns]
        spec = ({"report": whole[0]} if whole else
                {s: s for s in KEPT_SECTIONS if s in columns})
    elif "=" in text:
        spec = {}
        for part in text.split(","):
            name, _, col = part.partition("=")
            if name.strip() not in KEPT_SECTIONS or not col.strip():
                raise ValueError("--reports text must be COLUMN or "
                                 "findings=COLUMN,impression=COLUMN")
            spec[name.strip()] = col.strip()
    else:
        spec = {"report": text.strip()}
    if not spec or any(c not in columns for c in spec.values()):
        raise ValueError("--reports: the table has no such text column")
    return spec


def _read_frame(path):
    import pandas as pd

    fmt = _FORMATS.get(os.path.splitext(str(path))[1].lower())
    try:
        if fmt == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if fmt == "parquet":
            return pd.read_parquet(path)
        if fmt == "json":
            return pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError, UnicodeDecodeError):
        raise ValueError("--reports: the table could not be read") from None
    raise ValueError("--reports: table format must be .csv, .parquet or .jsonl")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def report_from_text(raw: str) -> Report:
    """Scrub, then keep the findings and impression sections of a whole report."""
    sections = split_sections(scrub(raw))
    return Report(findings=sections.get("findings", ""), impression=sections.get("impression", ""))


def _row_report(row: dict, spec: dict[str, str]) -> Report:
    if "report" in spec:
        return report_from_text(_cell(row[spec["report"]]))
    parts = {s: " ".join(scrub(_cell(row[col])).split()) for s, col in spec.items()}
    return Report(findings=parts.get("findings", ""), impression=parts.get("impression", ""))


def _row_key(row: dict, kind: str, columns: tuple[str, ...], deid) -> str | None:
    values = [_cell(row[c]).strip() for c in columns]
    if not all(values):
        return None
    try:
        return report_key(kind, "|".join(values), deid)
    except ValueError:
        return None


def load_reports(path, deid, key: str, text: str | None = None) -> ReportTable:
    """Read a report table (module docstring) → :class:`ReportTable`."""
    kind, key_columns = parse_key_spec(key)
    frame = _read_frame(path)
    columns = [str(c) for c in frame.columns]
    spec = parse_text_spec(text, columns)
    if any(c not in columns for c in key_columns):
        raise ValueError("--reports: the table has no such key column")
    table = ReportTable()
    for row in frame.to_dict("records"):
        table.n_rows += 1
        report = _row_report(row, spec)  # scrubbed before anything else reads the row
        keyed = _row_key(row, kind, key_columns, deid)
        if keyed is None or not (report.findings or report.impression):
            table.n_bad_rows += 1
        elif (kind, keyed) in table.by_key:
            table.n_duplicates += 1
        else:
            table.by_key[(kind, keyed)] = report
    del frame
    return table


def read_report_file(path) -> Report:
    """One ``.txt`` report (UTF-8, undecodable bytes replaced) → its scrubbed sections."""
    try:
        with open(path, "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        raise ValueError("report file could not be read") from None
    return report_from_text(raw)
