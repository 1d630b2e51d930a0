"""The file index: what the header scan learned, kept in the output so a resume scans only
what changed.

:func:`index_columns` turns the scanned entries of a run into the columns of
``pipeline.write.FILE_INDEX_SCHEMA`` (keyed identifiers only: discovery keys the UIDs at scan
time, :func:`pipeline.ingest.discover.key_header`). :func:`reuse` gives the entries of the next
run whose file is unchanged (same file key, size and modification time) the header and verdict
the index holds, so that :func:`pipeline.ingest.discover.scan_headers` reads only new and
changed files; files no longer found simply are not written to the next index.

Kept: a read header (whatever its verdict) and the verdicts that come from the file's bytes
alone (:data:`CONTENT_REASONS`). Not kept, so scanned again: files the operating system
refused (``filesystem``) and files whose batch the isolation killed (timeouts, memory).
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.ingest.dicom_io import Header
from pipeline.ingest.discover import FileEntry
from pipeline.write import FILE_INDEX_SCHEMA

CONTENT_REASONS = frozenset({"not_medical", "unreadable", "truncated", "encoding", "recursion",
                             "size_budget"})
_HEADER_COLUMNS = ("sop_class", "modality", "rows", "cols", "frames", "samples",
                   "bits_allocated", "transfer_syntax", "instance_number", "enhanced",
                   "has_pixels", "burned_in", "sop_uid", "study_uid", "accession",
                   "patient_date")


def _kept(e: FileEntry) -> bool:
    if e.kind != "dicom":
        return False
    return e.header is not None or (e.status is not None and e.reason in CONTENT_REASONS)


def index_columns(entries: list[FileEntry]) -> dict[str, list]:
    """The file index's columns for the scanned DICOM entries of a run (see module doc): one
    list per column (a row dict per file would cost the driver ~1 KB per file at its peak)."""
    cols: dict[str, list] = {f.name: [] for f in FILE_INDEX_SCHEMA}
    for e in entries:
        if not _kept(e):
            continue
        h = e.header
        verdict = e.status is not None
        row = {"file_key": e.file_key, "size_bytes": e.size, "mtime_ns": e.mtime_ns,
               "group_key": e.group_key, "status": e.status if verdict else None,
               "reason": e.reason if verdict else None, "error": e.error if verdict else None,
               "header_kind": h.kind if h else None,
               "series_uid_key": h.series_uid if h else None,
               "referenced_series_key": h.referenced_series if h else None,
               "iop": list(h.iop) if h and h.iop is not None else None,
               "ipp": list(h.ipp) if h and h.ipp is not None else None}
        for c in _HEADER_COLUMNS:
            row[c] = getattr(h, c) if h else None
        for name, values in cols.items():
            values.append(row[name])
    return cols


def index_rows(entries: list[FileEntry]) -> list[dict]:
    """:func:`index_columns` as rows (tests, small runs)."""
    cols = index_columns(entries)
    return [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def _header(cols: dict, i: int, shared: dict) -> Header:
    """The :class:`Header` of index row ``i``; repeated values (UID keys, orientation) are one
    object each, as a fresh scan's are."""

    def one(value):
        if isinstance(value, list):
            value = tuple(value)
            return shared.setdefault(("tuple", repr(value)), value)  # -0.0 stays -0.0
        return shared.setdefault(("str", value), value) if isinstance(value, str) else value

    return Header(kind=cols["header_kind"][i], series_uid=one(cols["series_uid_key"][i]),
                  referenced_series=one(cols["referenced_series_key"][i]),
                  iop=one(cols["iop"][i]), ipp=None if cols["ipp"][i] is None
                  else tuple(cols["ipp"][i]),
                  **{c: one(cols[c][i]) for c in _HEADER_COLUMNS})


def reuse(entries: list[FileEntry], index: pa.Table | None, batch_rows: int = 65536) -> int:
    """Fill the header and verdict of every DICOM entry whose file the index holds unchanged
    (same file key, size and modification time) → how many were taken from the index. The
    index is read ``batch_rows`` rows at a time (bounded Python objects at any moment)."""
    if index is None or index.num_rows == 0:
        return 0
    todo = {e.file_key: e for e in entries
            if e.kind == "dicom" and not e.status and e.header is None}
    shared: dict = {}
    n = 0
    for batch in index.to_batches(max_chunksize=batch_rows):
        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        for i, key in enumerate(cols["file_key"]):
            e = todo.get(key)
            if e is None or cols["size_bytes"][i] != e.size or cols["mtime_ns"][i] != e.mtime_ns:
                continue
            if cols["header_kind"][i] is not None:
                e.header = _header(cols, i, shared)
                e.group_key = cols["group_key"][i]
            if cols["status"][i] is not None:
                e.status, e.reason, e.error = (cols["status"][i], cols["reason"][i],
                                               cols["error"][i])
            n += 1
    return n
