"""Join annotation tables and reports to the units that discovery found (on the driver).

Tables are loaded once per build (``pipeline.labels.annotations.load_annotations``,
``pipeline.reports.tables.load_reports``: keys HMAC-ed and report text scrubbed as they are
read) and joined on keys only, never on text:

    annotation key      the file's                         keyed as
    sop                 SOPInstanceUID (header scan)       deid.pseudonym("uid", …), as discovery
    path                path relative to its source root   annotations.key_value("path", …)
    stem                file name without extensions       annotations.key_value("stem", …)

    report key          the study's (first file of the unit)
    study               StudyInstanceUID                   deid.pseudonym("uid", …)
    accession           AccessionNumber                    deid.pseudonym("accession", …)
    patient_date        PatientID | StudyDate              deid.pseudonym("patient-date", …)
    beside              a ``<folder>.txt`` next to the series folder or its parent (MIMIC-CXR)

The counts (:class:`JoinCounts`) go to the manifest's ``annotations`` / ``reports``: a table
key that matches no file is counted, so a collection named differently from its table shows
as ``unmatched`` instead of a silently unannotated corpus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.discover import FileEntry
from pipeline.ingest.units import UnitTask


@dataclass
class JoinCounts:
    """What the join found (manifest fields ``annotations`` and ``reports``)."""

    annotation_rows: int = 0  # rows read from the tables
    annotation_bad_rows: int = 0  # rows left out (non-finite, unparsable, out of range)
    annotation_keys: int = 0  # distinct images the tables name
    annotation_unmatched: int = 0  # of those, naming no file of the collection
    annotated_files: int = 0  # files that got shapes or a "no finding" entry
    shapes: int = 0  # shapes attached to files
    report_rows: int = 0
    report_bad_rows: int = 0
    reports_attached: int = 0  # units that got a report
    report_keys_unmatched: int = 0  # report keys naming no study of the collection

    def manifest(self) -> dict:
        d = asdict(self)
        return {"annotations": {k: v for k, v in d.items() if not k.startswith("report")},
                "reports": {k: v for k, v in d.items() if k.startswith("report")}}


def _file_keys(e: FileEntry, header, deid: Deidentifier) -> list[tuple[str, str]]:
    from pipeline.labels.annotations import key_value

    keys = [("path", key_value("path", e.rel, deid)), ("stem", key_value("stem", e.path.name, deid))]
    if header is not None and header.sop_uid:
        keys.insert(0, ("sop", header.sop_uid))  # keyed by discovery already
    return keys


def attach_annotations(tasks: list[UnitTask], entries, tables: list, deid: Deidentifier,
                       counts: JoinCounts, matched: set) -> None:
    """Give each DICOM unit's files their shapes (``UnitTask.annotations``); ``entries``:
    index → FileEntry of the tasks' files; the table keys that matched are added to
    ``matched``."""
    if not tables:
        return
    for t in tasks:
        if t.kind != "dicom":
            continue
        for (idx, _), h in zip(t.image_files, t.headers or [None] * len(t.image_files),
                               strict=True):
            shapes, listed = [], False
            for key in _file_keys(entries[idx], h, deid):
                for table in tables:
                    if key in table.by_key:
                        shapes += table.by_key[key]
                        listed = True
                        matched.add(key)
                    elif key in table.empty:
                        listed = True
                        matched.add(key)
            if listed:
                t.annotations = t.annotations or {}
                t.annotations[idx] = shapes
                counts.annotated_files += 1
                counts.shapes += len(shapes)


def beside_candidates(path: Path) -> list[Path]:
    """Where a ``--reports beside`` text of the study holding ``path`` may be: a
    ``<folder>.txt`` next to its series folder or that folder's parent (MIMIC-CXR)."""
    return [folder.with_name(folder.name + ".txt") for folder in (path.parent,
                                                                    path.parent.parent)]


def attach_reports(tasks: list[UnitTask], tables: list, beside: bool, counts: JoinCounts,
                   matched: set, found: dict[Path, int] | None = None) -> None:
    """Give each DICOM unit its study's report: ``UnitTask.report`` (a table's, text already
    scrubbed), else with ``beside`` the ``.txt`` file beside its study (``report_file``,
    read and scrubbed by the unit's worker: a 227k-report collection is not read here).
    ``found``: path → index of the candidate texts discovery found (:func:`beside_candidates`;
    an object-storage source's files are not on this machine, so they are looked up there)."""
    if not tables and not beside:
        return
    found = found or {}
    for t in tasks:
        if t.kind != "dicom" or not t.headers:
            continue
        h = t.headers[0]
        keys = [("study", h.study_uid), ("accession", h.accession),
                ("patient_date", h.patient_date)]
        for key in keys:
            hit = next((tb.by_key[key] for tb in tables if key[1] and key in tb.by_key), None)
            if hit is not None:
                t.report = hit
                matched.add(key)
                break
        if t.report is None and beside:
            t.report_file = next(((found[c], c) for c in beside_candidates(t.image_files[0][1])
                                  if c in found), None)
        counts.reports_attached += t.report is not None or t.report_file is not None


@dataclass
class Tables:
    """The loaded tables of a build (keyed, scrubbed): what :func:`attach_tables` joins."""

    annotations: list
    reports: list
    beside: bool  # look for a .txt report beside each study folder
    counts: JoinCounts


def load_tables(cfg, deid: Deidentifier) -> Tables:
    """Read ``cfg.annotations`` and ``cfg.reports`` (before any other work: a table whose
    columns do not fit its format is a ``ValueError`` with a fixed message, before discovery)."""
    counts, annotations, reports, beside = JoinCounts(), [], [], False
    if cfg.annotations:
        from pipeline.labels.annotations import load_annotations

        for path, fmt in cfg.annotations:
            table = load_annotations(path, fmt, deid, cfg.annotation_merge)
            counts.annotation_rows += table.n_rows
            counts.annotation_bad_rows += table.n_bad_rows
            annotations.append(table)
    for path, key, text in cfg.reports:
        if str(path) == "beside":
            beside = True
            continue
        from pipeline.reports.tables import load_reports

        table = load_reports(path, deid, key, text or None)
        counts.report_rows += table.n_rows
        counts.report_bad_rows += table.n_bad_rows
        reports.append(table)
    return Tables(annotations, reports, beside, counts)


class Join:
    """The join of a build's tables to its units, a batch of tasks at a time (so the driver
    never holds every unit's task at once); :meth:`counts` once every unit went through."""

    def __init__(self, tables: Tables, deid: Deidentifier):
        self.tables, self.deid = tables, deid
        self.running = replace(tables.counts)
        self.annotation_keys: set = set()  # table keys that named a file
        self.report_keys: set = set()

    def __call__(self, tasks: list[UnitTask], entries, texts: dict[Path, int]) -> None:
        """Join to ``tasks`` (in place); ``entries``: index → FileEntry of their files;
        ``texts``: the ``--reports beside`` candidates found (path → index)."""
        tb = self.tables
        attach_annotations(tasks, entries, tb.annotations, self.deid, self.running,
                           self.annotation_keys)
        attach_reports(tasks, tb.reports, tb.beside, self.running, self.report_keys, texts)

    def counts(self) -> JoinCounts:
        out = replace(self.running)
        tb = self.tables
        if tb.annotations:
            every = set().union(*(set(t.by_key) | set(t.empty) for t in tb.annotations))
            out.annotation_keys = len(every)
            out.annotation_unmatched = len(every - self.annotation_keys)
        every = set().union(*(set(t.by_key) for t in tb.reports)) if tb.reports else set()
        out.report_keys_unmatched = len(every - self.report_keys)
        return out


def attach_tables(tasks: list[UnitTask], entries: list[FileEntry], tables: Tables | None,
                  deid: Deidentifier) -> JoinCounts:
    """Join the loaded tables to ``tasks`` (in place), all at once; the counts for the
    manifest (library callers and tests; a build joins by batch, :class:`Join`)."""
    if tables is None:
        return JoinCounts()
    join = Join(tables, deid)
    texts = {e.path: e.index for e in entries if e.reason == "not_medical"}
    join(tasks, entries, texts)
    return join.counts()
