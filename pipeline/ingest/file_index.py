"""The file index: what the header scan learned, kept in the output so a resume scans only
what changed.

:func:`index_table` turns the scanned rows of a run (:class:`pipeline.ingest.found.Found`)
into ``pipeline.write.FILE_INDEX_SCHEMA`` (keyed identifiers only: discovery keys the UIDs at
scan time, :func:`pipeline.ingest.discover.key_header`). :func:`reuse_found` gives the rows of
the next run whose file is unchanged (same file key, size and modification time) the header
and verdict the index holds (one join), so that the header scan reads only new and changed
files; files no longer found simply are not written to the next index.

Kept: a read header (whatever its verdict) and the verdicts that come from the file's bytes
alone (:data:`CONTENT_REASONS`). Not kept, so scanned again: files the operating system
refused (``filesystem``) and files whose batch the isolation killed (timeouts, memory).
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from pipeline.ingest.discover import FileEntry
from pipeline.ingest.found import FOUND_SCHEMA, Found
from pipeline.write import FILE_INDEX_SCHEMA

CONTENT_REASONS = frozenset({"not_medical", "unreadable", "truncated", "encoding", "recursion",
                             "size_budget"})
_SCANNED = (pl.col("kind") == "dicom") & pl.col("status").is_null() \
    & pl.col("header_kind").is_null()


def to_scan(found: Found) -> pl.Series:
    """Indexes of the DICOM rows that have neither a header nor a verdict yet."""
    return found.frame.filter(_SCANNED)["index"]


def index_table(found: Found) -> pa.Table:
    """The file index of a run (see module doc): its DICOM rows with a header, or with a
    verdict that comes from the file's bytes alone, as ``FILE_INDEX_SCHEMA``."""
    kept = (pl.col("kind") == "dicom") & (
        pl.col("header_kind").is_not_null()
        | (pl.col("status").is_not_null() & pl.col("reason").is_in(list(CONTENT_REASONS))))
    rows = found.frame.filter(kept).rename({"size": "size_bytes"})
    return rows.select(FILE_INDEX_SCHEMA.names).to_arrow().cast(FILE_INDEX_SCHEMA)


def index_columns(entries: list[FileEntry]) -> dict[str, list]:
    """:func:`index_table` of a list of entries, one list per column (tests, small runs)."""
    return index_table(Found.from_entries(entries)).to_pydict()


def index_rows(entries: list[FileEntry]) -> list[dict]:
    """:func:`index_columns` as rows (tests, small runs)."""
    return index_table(Found.from_entries(entries)).to_pylist()


def reuse_found(found: Found, index: pa.Table | None) -> int:
    """Give every DICOM row whose file the index holds unchanged (same file key, size and
    modification time) the header, unit key and verdict the index holds → how many rows."""
    if index is None or index.num_rows == 0:
        return 0
    held = pl.from_arrow(index).rename({"size_bytes": "size"}).unique("file_key", keep="first")
    todo = found.frame.filter(_SCANNED).select("index", "file_key", "size", "mtime_ns")
    hits = todo.join(held, on=["file_key", "size", "mtime_ns"], how="inner")
    hits = hits.drop("file_key", "size", "mtime_ns")
    found.update(hits.cast({k: v for k, v in FOUND_SCHEMA.items() if k in hits.columns}))
    return hits.height


def reuse(entries: list[FileEntry], index: pa.Table | None) -> int:
    """:func:`reuse_found` on a list of entries (filled in place) → how many were reused."""
    found = Found.from_entries(entries)
    n = reuse_found(found, index)
    found.copy_outcomes_to(entries)
    return n
