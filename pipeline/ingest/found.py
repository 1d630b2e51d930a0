"""What a build found, as one table: a row per walked entry, no Python object per file.

The head node of a 3–6 M-file collection cannot hold a :class:`FileEntry` (+ its
:class:`Header`) per file through discovery (~3 KB each). :class:`Found` keeps the same facts
column-wise in one Polars frame (Arrow memory: a few hundred bytes per file), grouping and
pairing run on it as frame operations (:mod:`pipeline.ingest.units`), and ``FileEntry`` objects
exist only for the files of one header-scan batch or one dispatched shard at a time
(:meth:`Found.entries`).

    column                      what                                   from
    index                       row number = FileEntry.index           the walk
    root                        which source root (FileEntry.root)     the walk
    rel                         label/path under that root (memory     the walk
                                only: no output carries it)
    file_key, size, mtime_ns,   as FileEntry                           the walk
    kind
    status, reason, error       final outcome when known               walk, scan, grouping
    group_key                   DICOM: unit key of series + geometry   the scan or the index
    header_kind … patient_date  the keyed header, as the file index    the scan or the index
                                stores it (FILE_INDEX_SCHEMA)

A file's path is its root's base folder joined with ``rel`` less the root's label (frames made
from entries, :meth:`Found.from_entries`, carry a ``path`` column instead). Arrow strings are
UTF-8: a name that is not (``os.walk`` decodes such bytes with surrogateescape) is stored as a
marked hex cell (:func:`cell`), so every name round-trips exactly; frame-side path matching
keeps such rows for an exact check in Python (:meth:`Found.match_paths`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.ingest.dicom_io import Header
from pipeline.ingest.discover import (
    FileEntry,
    iter_walk,
    root_entries,
    sources,
    subfolders,
    walk_folder,
)
from pipeline.write import FILE_INDEX_SCHEMA

HEADER_COLUMNS = ("sop_class", "modality", "rows", "cols", "frames", "samples",
                  "bits_allocated", "transfer_syntax", "instance_number", "enhanced",
                  "has_pixels", "burned_in", "sop_uid", "study_uid", "accession",
                  "patient_date")
# The header's columns (names and types as the file index stores them).
HEADER_SCHEMA = {name: dtype for name, dtype in
                  pl.from_arrow(FILE_INDEX_SCHEMA.empty_table()).schema.items()
                  if name not in ("file_key", "size_bytes", "mtime_ns", "status", "reason",
                                  "error", "group_key")}
FOUND_SCHEMA = {"index": pl.Int64, "root": pl.Int32, "rel": pl.String, "file_key": pl.String,
                "size": pl.Int64, "mtime_ns": pl.Int64, "kind": pl.String,
                "status": pl.String, "reason": pl.String, "error": pl.String,
                "group_key": pl.String, **HEADER_SCHEMA}
CHUNK_ROWS = 1 << 13  # entries gathered as Python objects before they become frame rows


_HEX = "\x00"  # marks a hex cell: no path holds a NUL


def cell(text: str) -> str:
    """``text`` as a frame cell: itself, or when it is not valid UTF-8 (lone surrogates) or
    starts with the marker, the marker and the hex of its surrogatepass bytes. :func:`uncell`
    reverses it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _HEX + text.encode("utf-8", "surrogatepass").hex()
    return _HEX + text.encode().hex() if text.startswith(_HEX) else text


def uncell(value: str) -> str:
    if value.startswith(_HEX):
        return bytes.fromhex(value[1:]).decode("utf-8", "surrogatepass")
    return value


def header_values(h: Header | None) -> dict:
    """The header's columns for one file (all None without a header)."""
    row = {"header_kind": h.kind if h else None,
           "series_uid_key": h.series_uid if h else None,
           "referenced_series_key": h.referenced_series if h else None,
           "iop": list(h.iop) if h and h.iop is not None else None,
           "ipp": list(h.ipp) if h and h.ipp is not None else None}
    for c in HEADER_COLUMNS:
        row[c] = getattr(h, c) if h else None
    return row


def header_of(cols: dict, i: int, shared: dict) -> Header:
    """The :class:`Header` of row ``i`` of ``cols`` (header columns as lists); repeated
    values (UID keys, orientation) are one object each, as a fresh scan's are."""

    def one(value):
        if isinstance(value, list):
            value = tuple(value)
            return shared.setdefault(("tuple", repr(value)), value)  # -0.0 stays -0.0
        return shared.setdefault(("str", value), value) if isinstance(value, str) else value

    return Header(kind=cols["header_kind"][i], series_uid=one(cols["series_uid_key"][i]),
                  referenced_series=one(cols["referenced_series_key"][i]),
                  iop=one(cols["iop"][i]), ipp=None if cols["ipp"][i] is None
                  else tuple(cols["ipp"][i]),
                  **{c: one(cols[c][i]) for c in HEADER_COLUMNS})


def entry_rows(entries: Iterable[FileEntry], paths: bool = False) -> pl.DataFrame:
    """Frame rows of ``entries`` (with their headers); ``paths``: a ``path`` column too."""
    cols: dict[str, list] = {name: [] for name in FOUND_SCHEMA}
    if paths:
        cols["path"] = []
    for e in entries:
        row = {"index": e.index, "root": e.root, "rel": cell(e.rel), "file_key": e.file_key,
               "size": e.size, "mtime_ns": e.mtime_ns, "kind": e.kind, "status": e.status,
               "reason": e.reason, "error": e.error, "group_key": e.group_key,
               **header_values(e.header)}
        if paths:
            row["path"] = cell(str(e.path))
        for name, values in cols.items():
            values.append(row[name])
    schema = {**FOUND_SCHEMA, **({"path": pl.String} if paths else {})}
    return pl.DataFrame(cols, schema=schema)


PART_FOLDERS = 64  # subfolders of a root walked by one partition task


def partitions(root: Path, label: str, number: int, max_bytes: int | None,
               per_part: int | None = None) -> list[tuple]:
    """``root``'s subfolders (:func:`pipeline.ingest.discover.subfolders`), ``per_part``
    (default :data:`PART_FOLDERS`) at a time, in walk order: the arguments of
    :func:`walk_part` but the key."""
    tops = subfolders(root)
    per_part = per_part or PART_FOLDERS
    return [(root, label, number, tops[i:i + per_part], max_bytes)
            for i in range(0, len(tops), per_part)]


def walk_part(root: Path, label: str, number: int, tops: list[Path], deid,
              max_bytes: int | None, shallow: bool = False) -> pl.DataFrame:
    """The rows of the walk of folders ``tops`` under ``root`` (root number ``number``), in
    walk order; ``shallow``: each folder's own listing only. ``index`` is made by the caller."""
    return entry_rows(e for top in tops for e in walk_folder(
        root, label, deid, 0, max_bytes, top=top, shallow=shallow)).with_columns(
        pl.lit(number, pl.Int32).alias("root"))


@dataclass
class Found:
    """Every entry a build found (see module doc). ``bases[r]`` and ``labels[r]``: root
    ``r``'s folder and the label its files' ``rel`` starts with."""

    frame: pl.DataFrame
    bases: tuple[Path, ...] = ()
    labels: tuple[str, ...] = ()

    @classmethod
    def walk(cls, roots, deid, max_bytes: int | None = None, chunk: int = CHUNK_ROWS,
             map_parts=None) -> Found:
        """Walk ``roots`` (:func:`pipeline.ingest.discover.iter_walk`) into a table, ``chunk``
        entries at a time. ``map_parts``: run the walk of a folder root's subfolders as
        partitions (``map_parts(parts) → frames``, in order, of :func:`walk_part` over
        :func:`partitions`; the build's Ray tasks): the same rows in the same order."""
        if map_parts is None:
            _, bases, labels = sources(roots)
            frames, buf = [], []
            for e in iter_walk(roots, deid, max_bytes):
                buf.append(e)
                if len(buf) >= chunk:
                    frames.append(entry_rows(buf))
                    buf = []
            frames.append(entry_rows(buf))
            return cls(pl.concat(frames, rechunk=False), tuple(bases), tuple(labels))
        roots, bases, labels = sources(roots)
        frames = []
        for number, (root, base, label) in enumerate(zip(roots, bases, labels, strict=True)):
            if isinstance(root, str) or root.is_file():  # an object listing, or one file
                frames.append(entry_rows(root_entries(root, base, label, deid, 0, max_bytes))
                              .with_columns(pl.lit(number, pl.Int32).alias("root")))
                continue
            frames.append(walk_part(root, label, number, [root], deid, max_bytes, True))
            frames += map_parts(partitions(root, label, number, max_bytes))
        frame = pl.concat(frames, rechunk=False)
        frame = frame.with_columns(pl.int_range(frame.height, dtype=pl.Int64).alias("index"))
        return cls(frame, tuple(bases), tuple(labels))

    @classmethod
    def from_entries(cls, entries: list[FileEntry]) -> Found:
        """The table of ``entries`` (``index`` must be their position), paths kept as given."""
        return cls(entry_rows(entries, paths=True))

    def __len__(self) -> int:
        return self.frame.height

    def path_expr(self) -> pl.Expr:
        """Each row's path as a string, for matching in the frame; a row whose name is a hex
        cell gets a value no path equals (:meth:`match_paths` checks those rows itself)."""
        if "path" in self.frame.columns:
            return pl.col("path")
        base = {r: str(b).rstrip("/") + "/" for r, b in enumerate(self.bases)}
        cut = {r: len(label) + 1 for r, label in enumerate(self.labels)}
        return pl.concat_str(
            pl.col("root").replace_strict(base, return_dtype=pl.String),
            pl.col("rel").str.slice(pl.col("root").replace_strict(cut, return_dtype=pl.Int64)))

    def path_columns(self) -> list[str]:
        """The columns a row's path comes from (:meth:`paths`, :meth:`path_expr`)."""
        return ["path"] if "path" in self.frame.columns else ["root", "rel"]

    def hex_cell(self) -> pl.Expr:
        """True for rows whose name is stored as a hex cell."""
        return pl.col("path" if "path" in self.frame.columns else "rel").str.starts_with(_HEX)

    def paths(self, rows: pl.DataFrame) -> list[Path]:
        """The paths of ``rows`` (a slice of the frame), exactly (hex cells decoded)."""
        if "path" in rows.columns:
            return [Path(uncell(p)) for p in rows["path"].to_list()]
        return [self.bases[r] / uncell(rel)[len(self.labels[r]) + 1:]
                for r, rel in zip(rows["root"].to_list(), rows["rel"].to_list(), strict=True)]

    def match_paths(self, rows: pl.DataFrame, wanted: set[str]) -> list[tuple[int, str, str]]:
        """(index, path, parent folder) of the ``rows`` whose path or parent folder is in
        ``wanted`` (path strings), in row order: matched in the frame, hex-cell rows in
        Python."""
        if not wanted or not rows.height:
            return []
        plain = [w for w in wanted if cell(w) == w]
        path = self.path_expr()
        parent = path.str.replace(r"/[^/]*$", "")
        kept = rows.filter(path.is_in(plain) | parent.is_in(plain) | self.hex_cell())
        out = []
        for i, p in zip(kept["index"].to_list(), self.paths(kept), strict=True):
            if str(p) in wanted or str(p.parent) in wanted:
                out.append((i, str(p), str(p.parent)))
        return out

    def entries(self, indices) -> list[FileEntry]:
        """``FileEntry`` objects (header included) for the rows at ``indices``, in that order."""
        rows = self.frame[np.asarray(indices, dtype=np.int64)]
        paths = self.paths(rows)
        cols = rows.to_dict(as_series=False)
        shared: dict = {}
        out = []
        for j, path in enumerate(paths):
            h = (header_of(cols, j, shared) if cols["header_kind"][j] is not None else None)
            out.append(FileEntry(cols["index"][j], path, uncell(cols["rel"][j]),
                                 cols["file_key"][j],
                                 cols["size"][j], cols["kind"][j], cols["status"][j],
                                 cols["reason"][j], cols["error"][j], h, cols["mtime_ns"][j],
                                 cols["group_key"][j], cols["root"][j]))
        return out

    def update(self, rows: pl.DataFrame) -> None:
        """Set the non-null values of ``rows`` (an ``index`` column and any others of the
        frame) on the rows with those indexes. Column by column (a row's index is its
        position): one column is made anew at a time, not the whole frame, as a join would."""
        if not rows.height:
            return
        where = np.full(self.frame.height, -1, dtype=np.int64)
        where[rows["index"].to_numpy()] = np.arange(rows.height)
        take = pl.Series("take", where).replace(-1, None)
        for name in rows.columns:
            if name == "index" or rows[name].null_count() == rows.height:
                continue
            fresh = rows[name].cast(self.frame.schema[name]).gather(take)
            self.frame = self.frame.with_columns(pl.coalesce(fresh, pl.col(name)).alias(name))

    def settle(self, outcomes: dict[int, tuple[str, str, str]]) -> None:
        """Give rows their final (status, reason, error)."""
        if outcomes:
            idx = list(outcomes)
            self.update(pl.DataFrame(
                {"index": idx, "status": [outcomes[i][0] for i in idx],
                 "reason": [outcomes[i][1] for i in idx], "error": [outcomes[i][2] for i in idx]},
                schema={k: FOUND_SCHEMA[k] for k in ("index", "status", "reason", "error")}))

    def file_keys(self, indices) -> list[str]:
        return self.frame["file_key"].gather(np.asarray(indices, dtype=np.int64)).to_list()

    def copy_outcomes_to(self, entries: list[FileEntry]) -> None:
        """Write the rows' status, reason, error, group key and header back onto ``entries``
        (the list this table was made from: :meth:`from_entries`)."""
        for e, fresh in zip(entries, self.entries(range(len(entries))), strict=True):
            e.status, e.reason, e.error = fresh.status, fresh.reason, fresh.error
            e.group_key, e.header = fresh.group_key, fresh.header
