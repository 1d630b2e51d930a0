"""Table layouts for :mod:`pipeline.labels.annotations`: the SPEC grammar, reading a table, and
vetting each row into a :class:`RowShape` (raw key and class, still unkeyed).

SPEC: comma-separated ``item=value`` pairs; a comma-separated piece without ``=`` continues the
previous item's value (so ``box=xywh:X,Y,W,H`` is one item)::

    key=KIND:COL              KIND: sop | path | stem (required)
    class=COL | class=@NAME   per-row class column, or one class for every row (required)
    reader=COL                optional reader / radiologist id
    frame=COL                 optional 0-based frame of a multi-frame file
    target=COL                optional: "0" = image listed with no finding, "1" = has one
    box=xyxy:C,C,C,C | box=xywh:C,C,C,C | point=CX,CY | polygon=COL | mask=siim:COL
                              exactly one geometry; polygon: one cell "x y x y ..." (spaces,
                              commas or semicolons); mask=siim: SIIM relative RLE, "-1" = empty
    COL: a column name (header names are compared with surrounding spaces stripped), or #N,
         the 0-based column position (for headers that hold commas, as NIH's "Bbox [x,y,w,h]")

A row is *empty* (the image is listed, nothing is there) when target is 0, when its class is a
"no finding" name, or when its geometry cells are all empty and it names no finding (SIIM: the
mask is "-1"). Otherwise every value must vet, or the row is bad (counted, never shown).
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.captions.findings import is_no_finding

KEY_KINDS = ("sop", "path", "stem")
GEOMETRIES = {"box": ("xyxy", "xywh"), "point": ("point",), "polygon": ("polygon",),
              "mask": ("siim",)}
#: A coordinate must lie in [0, MAX_COORD] (DICOM Rows/Columns are at most 65535).
MAX_COORD = 65536.0
MAX_FRAME = 1_000_000
MAX_CLASS_CHARS = 256
MAX_CELL_CHARS = 4_000_000  # a polygon or RLE cell longer than this is bad
MSG_COLUMNS = "annotation table: its columns do not fit the format"
_NUMBER_SPLIT = re.compile(r"[\s,;]+")

Col = str | int


@dataclass(frozen=True)
class Spec:
    """A parsed SPEC (module docstring)."""

    key_kind: str  # one of KEY_KINDS
    key: Col  # column of the image key
    geometry: str  # "xyxy" | "xywh" | "point" | "polygon" | "siim"
    coords: tuple[Col, ...]  # the geometry's columns (4, 2, 1 or 1)
    class_col: Col | None = None  # per-row class column, or
    class_const: str | None = None  # one class for every row
    reader: Col | None = None
    frame: Col | None = None
    target: Col | None = None


@dataclass(frozen=True)
class RowShape:
    """One vetted row: raw key and class (never leave the package), stored-frame geometry."""

    key: str
    class_name: str
    reader: str | None
    kind: str  # "box" | "point" | "polygon" | "mask"
    coords: tuple[float, ...]
    frame: int = 0
    rle: tuple | None = None


@dataclass(frozen=True)
class BadRow:
    """A row that did not vet (nothing of it is kept)."""


@dataclass(frozen=True)
class EmptyRow:
    """A row that lists its image with no finding."""

    key: str


BAD = BadRow()


def _col(token: str) -> Col:
    token = token.strip()
    if re.fullmatch(r"#[0-9]{1,4}", token):
        return int(token[1:])
    if not token:
        raise ValueError("annotation SPEC: an empty column name")
    return token


def _items(text: str) -> dict[str, list[str]]:
    items: dict[str, list[str]] = {}
    last = None
    for piece in text.split(","):
        if "=" in piece:
            name, value = piece.split("=", 1)
            last = name.strip()
            if last in items:
                raise ValueError("annotation SPEC: an item is given twice")
            items[last] = [value]
        elif last is None:
            raise ValueError("annotation SPEC: expected item=value")
        else:
            items[last].append(piece)
    return items


def _geometry(name: str, values: list[str]) -> tuple[str, tuple[Col, ...]]:
    first = values[0]
    if name in ("box", "mask"):
        how, _, col = first.partition(":")
        values = [col, *values[1:]]
        if how.strip() not in GEOMETRIES[name]:
            raise ValueError("annotation SPEC: box=xyxy:|xywh: or mask=siim: expected")
        geometry = how.strip()
    else:
        geometry = name
    need = {"xyxy": 4, "xywh": 4, "point": 2, "polygon": 1, "siim": 1}[geometry]
    if len(values) != need:
        raise ValueError("annotation SPEC: wrong number of geometry columns")
    return geometry, tuple(_col(v) for v in values)


def parse_spec(text: str) -> Spec:
    """The :class:`Spec` of a SPEC string; ``ValueError`` (fixed message) when it is not one."""
    items = _items(text if isinstance(text, str) else "")
    known = {"key", "class", "reader", "frame", "target", *GEOMETRIES}
    if set(items) - known:
        raise ValueError("annotation SPEC: unknown item (known: key, class, reader, frame, "
                         "target, box, point, polygon, mask)")
    geoms = [g for g in GEOMETRIES if g in items]
    if "key" not in items or "class" not in items or len(geoms) != 1:
        raise ValueError("annotation SPEC: key=, class= and exactly one geometry are required")
    for name in ("key", "class", "reader", "frame", "target"):
        if name in items and len(items[name]) != 1:
            raise ValueError("annotation SPEC: a column name holds a comma; use #N")
    kind, _, key_col = items["key"][0].partition(":")
    if kind.strip() not in KEY_KINDS:
        raise ValueError("annotation SPEC: key=sop:|path:|stem: expected")
    cls = items["class"][0].strip()
    if cls.startswith("@") and not cls[1:].strip():
        raise ValueError("annotation SPEC: class=@ needs a name")
    geometry, coords = _geometry(geoms[0], items[geoms[0]])
    opt = {n: _col(items[n][0]) if n in items else None for n in ("reader", "frame", "target")}
    return Spec(key_kind=kind.strip(), key=_col(key_col), geometry=geometry, coords=coords,
                class_col=None if cls.startswith("@") else _col(cls),
                class_const=cls[1:].strip() or None if cls.startswith("@") else None, **opt)


def read_frame(path: Path) -> pl.DataFrame:
    """The table at ``path`` with every column as text (null = empty cell): Parquet
    (``.parquet``, ``.pq``), a ``.zip`` holding one CSV, else CSV (gzip read as such)."""
    suffix = path.name.lower().rsplit(".", 1)[-1]
    try:
        if suffix in ("parquet", "pq"):
            return pl.read_parquet(path).with_columns(pl.all().cast(pl.String))
        if suffix == "zip":
            with zipfile.ZipFile(path) as z:
                members = [n for n in z.namelist() if not n.endswith("/")]
                if len(members) != 1:
                    raise ValueError("annotation table: a .zip must hold exactly one CSV")
                data = z.read(members[0])
            return pl.read_csv(io.BytesIO(data), infer_schema=False, encoding="utf8-lossy",
                               truncate_ragged_lines=True)
        return pl.read_csv(path, infer_schema=False, encoding="utf8-lossy",
                           truncate_ragged_lines=True)
    except (pl.exceptions.PolarsError, OSError, zipfile.BadZipFile, UnicodeError):
        raise ValueError("annotation table: the file could not be read as CSV or Parquet") from None


def _index(df: pl.DataFrame, col: Col) -> int:
    names = [c.strip() for c in df.columns]
    if isinstance(col, int):
        if col < len(names):
            return col
    elif col.strip() in names:
        return names.index(col.strip())
    raise ValueError(MSG_COLUMNS)


def table_rows(df: pl.DataFrame, spec: Spec) -> tuple[list, list[str]]:
    """Every data row vetted: (one RowShape, BadRow or EmptyRow per row, raw keys of the
    empty rows)."""
    roles = {"key": spec.key, "class": spec.class_col, "reader": spec.reader,
             "frame": spec.frame, "target": spec.target,
             **{("geom", i): c for i, c in enumerate(spec.coords)}}
    columns = {r: df.to_series(_index(df, c)).to_list() for r, c in roles.items() if c is not None}
    rows: list[RowShape | BadRow | EmptyRow] = []
    for i in range(df.height):
        rows.append(_vet(spec, {r: values[i] for r, values in columns.items()}))
    return rows, [r.key for r in rows if isinstance(r, EmptyRow)]


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _vet(spec: Spec, cell: dict) -> RowShape | BadRow | EmptyRow:
    """One row → a shape, an empty listing, or bad (module docstring)."""
    key = _text(cell["key"])
    cls = spec.class_const or _text(cell.get("class"))
    if not key or len(cls) > MAX_CLASS_CHARS:
        return BAD
    if spec.target is not None and _text(cell["target"]) not in ("0", "1"):
        return BAD
    geom = [_text(cell[("geom", i)]) for i in range(len(spec.coords))]
    blank = not any(geom) or (spec.geometry == "siim" and geom[0] == "-1")
    if _text(cell.get("target")) == "0" or (cls and is_no_finding(cls)):
        return EmptyRow(key)
    if blank:
        named = spec.class_const is None and cls
        return BAD if named or _text(cell.get("target")) == "1" else EmptyRow(key)
    frame = _frame(cell.get("frame"))
    shape = _shape(spec.geometry, geom)
    if not cls or frame is None or shape is None:
        return BAD
    kind, coords, rle = shape
    return RowShape(key=key, class_name=cls, reader=_text(cell.get("reader")) or None,
                    kind=kind, coords=coords, frame=frame, rle=rle)


def coord(value: object) -> float | None:
    """A coordinate from a cell or JSON number: finite, in [0, MAX_COORD], else None."""
    if isinstance(value, bool):
        return None
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v) and 0.0 <= v <= MAX_COORD else None


def _frame(value: object) -> int | None:
    if not _text(value):
        return 0
    v = coord(value)
    return int(v) if v is not None and v == int(v) and v <= MAX_FRAME else None


def box_xyxy(values: list, xywh: bool) -> tuple[float, ...] | None:
    """Four coordinates (XYXY, or XYWH converted) → an XYXY box with x0 < x1, y0 < y1."""
    v = [coord(x) for x in values]
    if len(v) != 4 or any(x is None for x in v):
        return None
    x0, y0, a, b = v
    x1, y1 = (x0 + a, y0 + b) if xywh else (a, b)
    if not (x0 < x1 <= MAX_COORD and y0 < y1 <= MAX_COORD):
        return None
    return (x0, y0, x1, y1)


def polygon(values: list) -> tuple[float, ...] | None:
    """x y x y ... (at least three vertices) → coordinates, or None."""
    v = [coord(x) for x in values]
    if len(v) < 6 or len(v) % 2 or any(x is None for x in v):
        return None
    return tuple(v)


def _shape(geometry: str, geom: list[str]) -> tuple[str, tuple, tuple | None] | None:
    if geometry in ("xyxy", "xywh"):
        box = box_xyxy(geom, geometry == "xywh")
        return None if box is None else ("box", box, None)
    if geometry == "point":
        xy = (coord(geom[0]), coord(geom[1]))
        return None if None in xy else ("point", xy, None)
    if len(geom[0]) > MAX_CELL_CHARS:
        return None
    parts = [p for p in _NUMBER_SPLIT.split(geom[0]) if p]
    if geometry == "polygon":
        poly = polygon(parts)
        return None if poly is None else ("polygon", poly, None)
    counts = siim_counts(parts)
    return None if counts is None else ("mask", (), ("siim", counts))


def siim_counts(parts: list[str]) -> tuple[int, ...] | None:
    """SIIM RLE tokens → (start, length, ...) ints: an even count, starts ≥ 0, lengths > 0, runs
    ending inside a MAX_COORD² image; else None."""
    if not parts or len(parts) % 2 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    counts = tuple(int(p) for p in parts)
    if any(n <= 0 for n in counts[1::2]) or sum(counts) > MAX_COORD * MAX_COORD:
        return None
    return counts
