"""Group discovered files into units of work and pair label sources (rules in discover.py).

Planning runs on the table of everything found (:class:`pipeline.ingest.found.Found`), not on
an object per file: DICOM images group by their unit key as one frame operation, and only the
few rows pairing looks at one by one (NIfTI volumes and label maps, RTSTRUCT/SEG, names files,
a collection layout's files) become ``FileEntry`` objects. A planned :class:`Unit` holds file
indexes only; :func:`unit_tasks` makes the :class:`UnitTask` a worker reads (paths, headers)
when its shard is dispatched.

    step                  rows                               result
    DICOM series          dicom, no verdict, header image    one Unit per group_key, in the
                                                             order its first file was found
    NIfTI volumes         nifti, no verdict                  one Unit each
    --collection layouts  rows under a layout's root         Units by the layout's pairs
    NIfTI label maps      nifti_label, no verdict            label of the first Unit whose
                                                             image (or its folder) a pairing
                                                             rule names; else unpaired_label
    RTSTRUCT / SEG        dicom, header rtstruct | seg       label of the largest Unit of the
                                                             series they reference; else
                                                             unpaired_label
    sidecars              json not used as a names file      skipped (sidecar)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.discover import CHANNEL_RE, FS_ERRORS, FileEntry, key_header
from pipeline.ingest.found import Found

SEG_SUFFIX = re.compile(r"_seg(\.nii(\.gz)?)?$", re.IGNORECASE)


@dataclass
class UnitTask:
    """What a worker needs for one unit. Paths stay in memory; rows never carry them."""

    unit_key: str
    kind: str  # dicom | nifti
    image_files: list[tuple[int, Path]]  # (file index, path)
    label_file: tuple[int, Path] | None = None
    label_kind: str | None = None  # nifti | rtstruct | seg | masks
    mask_files: list[tuple[int, Path]] = field(default_factory=list)  # label_kind "masks"
    names: dict[int, str] | None = None  # label names given by a collection layout
    label_shared: bool = False  # label file accounted for by another unit (multi-channel)
    names_file: tuple[int, Path] | None = None
    identity: str = ""  # NIfTI pseudonym input
    modality: str | None = None  # collection-provided modality for NIfTI
    headers: list | None = None  # discovery's pipeline.ingest.dicom_io.Header per image file
    # From --annotations (pipeline/run/attach.py): file index → its shapes
    # (pipeline.labels.annotations.Shape); an empty list: listed with no finding
    annotations: dict[int, list] | None = None
    report: object | None = None  # pipeline.reports.tables.Report of the study (scrubbed text)
    report_file: tuple[int, Path] | None = None  # --reports beside: its .txt, read by the worker

    def paths(self) -> list[Path]:
        """Every file the unit reads (images, label map or masks, names file, report)."""
        files = [*self.image_files, *self.mask_files, self.label_file, self.names_file,
                 self.report_file]
        return [p for f in files if f is not None for _, p in [f]]

    def localized(self, local: dict[Path, Path]) -> UnitTask:
        """This unit reading ``local[path]`` for each of its paths (the fetched copies of a
        remote source's objects, :func:`pipeline.ingest.remote.local_copies`)."""

        def at(f):
            return None if f is None else (f[0], local[f[1]])

        return replace(self, image_files=[at(f) for f in self.image_files],
                       mask_files=[at(f) for f in self.mask_files],
                       label_file=at(self.label_file), names_file=at(self.names_file),
                       report_file=at(self.report_file))


@dataclass(slots=True)
class Unit:
    """A planned unit: indexes into :class:`~pipeline.ingest.found.Found` only (fields as
    :class:`UnitTask`'s); :func:`unit_tasks` makes the task when its shard is dispatched."""

    unit_key: str
    kind: str  # dicom | nifti
    images: np.ndarray  # file indexes, ascending
    label: int | None = None
    label_kind: str | None = None
    masks: tuple[int, ...] = ()
    names: dict[int, str] | None = None
    label_shared: bool = False
    names_file: int | None = None
    identity: str = ""
    modality: str | None = None

    def files(self) -> np.ndarray:
        """File indexes the unit accounts for: its images, then its label (or masks) and
        names file (as :func:`pipeline.run.shards.unit_files` of its task)."""
        more = [] if self.label_shared else list(self.masks) or (
            [self.label] if self.label is not None else [])
        if self.names_file is not None:
            more.append(self.names_file)
        return np.concatenate([self.images, np.asarray(more, dtype=np.int64)])


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_identity(e: FileEntry) -> str:
    """Patient/series identity of a NIfTI image: its relative path without channel suffix."""
    rel = e.rel
    for suffix in (".nii.gz", ".nii"):
        if rel.lower().endswith(suffix):
            rel = rel[: -len(suffix)]
    return CHANNEL_RE.sub("", rel)


def _label_targets(label: FileEntry) -> list[Path]:
    """Where the image of a NIfTI label map may live, by the pairing rules."""
    stem = SEG_SUFFIX.sub("", _stem(label.path))
    here = label.path.parent
    out = [here / f"{stem}.nii.gz", here / f"{stem}.nii", here / stem]
    if here.name == "labelsTr" or here.name == "labelsTs":
        images = here.parent / here.name.replace("labels", "images")
        out += [images / f"{stem}_0000.nii.gz", images / f"{stem}.nii.gz",
                images / f"{stem}_0000.nii", images / f"{stem}.nii"]
    return out


def _names_candidates(label: FileEntry) -> list[Path]:
    stem = SEG_SUFFIX.sub("", _stem(label.path))
    out = [label.path.parent / f"{stem}_seg.json"]
    if label.path.parent.name.startswith("labels"):
        out.append(label.path.parent.parent / "dataset.json")
    return out


def _resolved(path) -> Path | None:
    """``path`` resolved, or None when the operating system refuses (a symlink loop, ...)."""
    try:
        return Path(path).resolve()
    except FS_ERRORS:
        return None


class _Plan:
    """One grouping pass over ``found`` (see module doc); :meth:`units` is its result."""

    def __init__(self, found: Found, deid: Deidentifier):
        self.found, self.deid = found, deid
        self.units: list[Unit] = []  # dicom, then nifti, then layout units: pairing's order
        self.consumed: set[int] = set()  # rows a collection layout paired
        self.outcomes: dict[int, tuple[str, str, str]] = {}

    def rows(self, where: pl.Expr, *columns: str) -> pl.DataFrame:
        """``columns`` of the rows matching ``where`` that no collection layout took (only
        those columns are copied)."""
        if self.consumed:
            where = where & ~pl.col("index").is_in(list(self.consumed))
        return self.found.frame.lazy().filter(where).select("index", *columns).collect()

    def entries(self, where: pl.Expr) -> list[FileEntry]:
        return self.found.entries(self.rows(where)["index"])

    def unpaired(self, e: FileEntry, error: str) -> None:
        self.outcomes[e.index] = ("skipped", "unpaired_label", error)

    # -- units ---------------------------------------------------------------------------------

    def dicom(self) -> None:
        """DICOM images grouped by the unit key discovery gave each file
        (:func:`pipeline.ingest.discover.key_header`), fresh from a scan or from the index."""
        images = self.rows((pl.col("kind") == "dicom") & pl.col("status").is_null()
                           & (pl.col("header_kind") == "image"), "group_key", "series_uid_key")
        groups = images.group_by("group_key", maintain_order=True).agg(
            pl.col("index"), pl.col("series_uid_key").first())
        self.series = groups["series_uid_key"].to_list()  # of each DICOM unit's first file
        if groups.height:
            flat = groups["index"].explode().to_numpy().astype(np.int64)
            ends = np.cumsum(groups["index"].list.len().to_numpy())[:-1]
            for key, idx in zip(groups["group_key"].to_list(), np.split(flat, ends),
                                strict=True):
                self.units.append(Unit(key, "dicom", idx))
        self.n_dicom = len(self.units)

    def nifti(self) -> None:
        for e in self.entries((pl.col("kind") == "nifti") & pl.col("status").is_null()):
            ident = _nifti_identity(e)
            key = self.deid.pseudonym("unit", f"nifti:{ident}|{e.rel}")
            self.units.append(Unit(key, "nifti", np.asarray([e.index]), identity=ident))

    def collections(self, collections) -> None:
        """Units of ``--collection NAME PATH`` roots, paired by the layout's own rules
        (pipeline/ingest/layouts/*.json). Their files are taken out of the generic rules."""
        from pipeline.ingest.collections import get_source

        roots = {Path(root) for _, root in collections}
        under = [r for r, base in enumerate(self.found.bases) if base in roots]
        where = pl.col("root").is_in(under) if self.found.bases else pl.lit(True)
        by_path = {r: e for e in self.entries(where) if (r := _resolved(e.path)) is not None}
        used: set[int] = set()
        for name, root in collections:
            for pair in get_source(name).pairs(root):
                image = by_path.get(_resolved(pair.image_path))
                labels = [by_path.get(_resolved(p)) for p in pair.label_paths]
                if image is None or image.status or any(lab is None for lab in labels):
                    continue
                ident = _nifti_identity(image)
                key = self.deid.pseudonym("unit", f"nifti:{ident}|{image.rel}")
                unit = Unit(key, "nifti", np.asarray([image.index]), identity=ident,
                            modality=pair.modality, names=pair.names or None)
                # multi-channel cases (nnU-Net channels, BraTS sequences) share one label map:
                # every channel uses it, the first one accounts for its file
                unit.label_shared = any(lab.index in used for lab in labels)
                used.update(lab.index for lab in labels)
                if len(labels) == 1:
                    unit.label, unit.label_kind = labels[0].index, "nifti"
                elif labels:
                    unit.masks = tuple(lab.index for lab in labels)
                    unit.label, unit.label_kind = unit.masks[0], "masks"
                self.consumed.update(e.index for e in [image, *labels])
                self.units.append(unit)

    # -- labels ----------------------------------------------------------------------------------

    def _where_images(self, wanted: set[str]) -> dict[str, Unit]:
        """Path → the first unit (pairing's order) with an image at that path or in that
        folder, for the paths in ``wanted`` only."""
        at: dict[str, Unit] = {}
        if not wanted:
            return at
        dicom = {u.unit_key: i for i, u in enumerate(self.units[:self.n_dicom])}
        images = self.rows((pl.col("kind") == "dicom") & pl.col("status").is_null()
                           & (pl.col("header_kind") == "image"), "group_key",
                           *self.found.path_columns())
        hits = self.found.match_paths(images, wanted)
        if hits:
            mine = images.filter(pl.col("index").is_in([i for i, _, _ in hits]))
            unit_of = dict(mine.select("index", "group_key").rows())
            for u, _, p, d in sorted((dicom[unit_of[i]], i, p, d) for i, p, d in hits):
                at.setdefault(p, self.units[u])
                at.setdefault(d, self.units[u])
        rest = self.units[self.n_dicom:]
        for u, e in zip(rest, self.found.entries([u.images[0] for u in rest]), strict=True):
            at.setdefault(str(e.path), u)
            at.setdefault(str(e.path.parent), u)
        return at

    def nifti_labels(self) -> None:
        labels = self.entries((pl.col("kind") == "nifti_label") & pl.col("status").is_null())
        targets = {e.index: [str(t) for t in _label_targets(e)] for e in labels}
        at = self._where_images({t for ts in targets.values() for t in ts})
        wanted = {str(c) for e in labels for c in _names_candidates(e)}
        names: dict[str, tuple[int, bool]] = {}  # path → (index, usable: no verdict)
        if wanted:
            json = (self.found.frame.lazy()
                    .filter(pl.col("rel").str.ends_with(".json") | self.found.hex_cell())
                    .select("index", "status", *self.found.path_columns())
                    .collect())
            usable = dict(json.select("index", pl.col("status").is_null()).rows())
            for i, p, _ in self.found.match_paths(json, wanted):
                if p in wanted:  # the file itself, not a file in a folder of that name
                    names[p] = (i, usable[i])
        for e in labels:
            unit = next((at[t] for t in targets[e.index] if t in at), None)
            if unit is None or unit.label is not None:
                self.unpaired(e, "no image volume matches this label map by the pairing rules")
                continue
            unit.label, unit.label_kind = e.index, "nifti"
            first = next((names[str(c)] for c in _names_candidates(e) if str(c) in names), None)
            if first is not None and first[1]:
                unit.names_file = first[0]

    def dicom_labels(self) -> None:
        by_series: dict[str, Unit] = {}
        for i in sorted(range(self.n_dicom), key=lambda i: -len(self.units[i].images)):
            by_series.setdefault(self.series[i], self.units[i])
        rows = self.rows((pl.col("kind") == "dicom") & pl.col("status").is_null()
                         & pl.col("header_kind").is_in(["rtstruct", "seg"]), "header_kind",
                         "referenced_series_key")
        for index, kind, ref in zip(rows["index"].to_list(), rows["header_kind"].to_list(),
                                    rows["referenced_series_key"].to_list(), strict=True):
            unit = by_series.get(ref or "")
            if unit is None or unit.label is not None:
                self.outcomes[index] = ("skipped", "unpaired_label", "its referenced image "
                                        "series is not in this run (or already labelled)")
                continue
            unit.label, unit.label_kind = index, kind

    def sidecars(self) -> None:
        used = [u.names_file for u in self.units if u.names_file is not None]
        rows = self.rows((pl.col("kind") == "json") & pl.col("status").is_null()
                         & ~pl.col("index").is_in(used))
        for index in rows["index"].to_list():
            self.outcomes[index] = ("skipped", "sidecar", "JSON not used as a names file")


def plan_units(found: Found, deid: Deidentifier, collections=()) -> list[Unit]:
    """Units sorted by ``unit_key`` (path-independent, so sharding does not leak order); rows
    that pairing settles (unpaired labels, sidecars) get their outcome in ``found``.

    ``collections``: (layout name, root) pairs whose files pair by their layout's rules."""
    plan = _Plan(found, deid)
    if collections:
        plan.collections(collections)
    named = plan.units
    plan.units = []
    plan.dicom()
    plan.nifti()
    plan.units += named
    plan.nifti_labels()
    plan.dicom_labels()
    plan.sidecars()
    found.settle(plan.outcomes)
    return sorted(plan.units, key=lambda u: u.unit_key)


def unit_entries(units: list[Unit], found: Found) -> dict[int, FileEntry]:
    """Index → entry of every file ``units`` account for (and their label files)."""
    files = [u.files() for u in units]
    files += [np.asarray([u.label], np.int64) for u in units if u.label is not None]
    flat = np.unique(np.concatenate(files)) if files else np.zeros(0, np.int64)
    return {e.index: e for e in found.entries(flat)}


def unit_tasks(units: list[Unit], found: Found,
               by_index: dict[int, FileEntry] | None = None) -> list[UnitTask]:
    """The tasks of ``units``: paths and, for DICOM, headers from ``found`` (or from
    ``by_index``, :func:`unit_entries` of them)."""
    if by_index is None:
        by_index = unit_entries(units, found)

    def at(i):
        return None if i is None else (int(i), by_index[int(i)].path)

    tasks = []
    for u in units:
        images = [at(i) for i in u.images]
        task = UnitTask(u.unit_key, u.kind, images, label_file=at(u.label),
                        label_kind=u.label_kind, mask_files=[at(i) for i in u.masks],
                        names=u.names, label_shared=u.label_shared,
                        names_file=at(u.names_file), identity=u.identity, modality=u.modality)
        if u.kind == "dicom":
            task.headers = [by_index[i].header for i, _ in images]
        tasks.append(task)
    return tasks


def group_units(entries: list[FileEntry], deid: Deidentifier, collections=()) -> list[UnitTask]:
    """:func:`plan_units` on a list of entries (their index = their position), as tasks; the
    outcomes pairing settles are set on ``entries`` (library callers and tests)."""
    shared: dict = {}
    for e in entries:  # headers scanned without the key (library callers): keyed now
        key_header(e, deid, shared)
    found = Found.from_entries(entries)
    units = plan_units(found, deid, collections)
    found.copy_outcomes_to(entries)
    return unit_tasks(units, found)
