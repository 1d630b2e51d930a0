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

from collections.abc import Iterator

import polars as pl
import pyarrow as pa

from pipeline.ingest.discover import FileEntry
from pipeline.ingest.found import Found
from pipeline.write import FILE_INDEX_SCHEMA

CONTENT_REASONS = frozenset({"not_medical", "unreadable", "truncated", "encoding", "recursion",
                             "size_budget"})
_SCANNED = (pl.col("kind") == "dicom") & pl.col("status").is_null() \
    & pl.col("header_kind").is_null()


def to_scan(found: Found) -> pl.Series:
    """Indexes of the DICOM rows that have neither a header nor a verdict yet."""
    return found.frame.lazy().filter(_SCANNED).select("index").collect()["index"]


def _kept() -> pl.Expr:
    return (pl.col("kind") == "dicom") & (
        pl.col("header_kind").is_not_null()
        | (pl.col("status").is_not_null() & pl.col("reason").is_in(list(CONTENT_REASONS))))


def index_batches(found: Found, rows: int = 65536) -> Iterator[pa.RecordBatch]:
    """The file index of a run (see module doc), ``rows`` rows of the table at a time: its
    DICOM rows with a header, or with a verdict that comes from the file's bytes alone, as
    ``FILE_INDEX_SCHEMA`` record batches."""
    for part in found.frame.iter_slices(rows):
        kept = part.lazy().filter(_kept()).rename({"size": "size_bytes"})
        table = kept.select(FILE_INDEX_SCHEMA.names).collect().to_arrow()
        yield from table.cast(FILE_INDEX_SCHEMA).to_batches()


def index_table(found: Found) -> pa.Table:
    """:func:`index_batches` as one table."""
    return pa.Table.from_batches(list(index_batches(found)), FILE_INDEX_SCHEMA)


def index_rows(entries: list[FileEntry]) -> list[dict]:
    """:func:`index_table` of a list of entries, as rows (tests, small runs)."""
    return index_table(Found.from_entries(entries)).to_pylist()


def reuse_found(found: Found, index) -> int:
    """Give every DICOM row whose file the index holds unchanged (same file key, size and
    modification time) the header, unit key and verdict the index holds → how many rows.
    ``index``: the index as a table or as record batches
    (:func:`pipeline.write.open_file_index`), joined a batch at a time; None: no index."""
    if index is None:
        return 0
    batches = index.to_batches() if isinstance(index, pa.Table) else index
    todo = (found.frame.lazy().filter(_SCANNED).select("index", "file_key", "size", "mtime_ns")
            .collect())
    hits = []
    for batch in batches:
        held = pl.from_arrow(batch).rename({"size_bytes": "size"})
        hits.append(todo.join(held, on=["file_key", "size", "mtime_ns"], how="inner")
                    .drop("file_key", "size", "mtime_ns"))
    hits = pl.concat(hits) if hits else None
    if hits is None or not hits.height:
        return 0
    found.update(hits)
    return hits.height


def reuse(entries: list[FileEntry], index: pa.Table | None) -> int:
    """:func:`reuse_found` on a list of entries (filled in place) → how many were reused."""
    found = Found.from_entries(entries)
    n = reuse_found(found, index)
    found.copy_outcomes_to(entries)
    return n
