"""Group discovered files into units of work and pair label sources (rules in discover.py)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.discover import CHANNEL_RE, FS_ERRORS, FileEntry, key_header

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


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _dicom_tasks(entries: list[FileEntry]) -> dict[str, UnitTask]:
    """DICOM images grouped by series and geometry: by the unit key discovery gave each file
    (:func:`pipeline.ingest.discover.key_header`), fresh from a scan or from the file index."""
    groups: dict[str, list[FileEntry]] = defaultdict(list)
    for e in entries:
        if e.kind == "dicom" and not e.status and e.header.kind == "image":
            groups[e.group_key].append(e)
    return {key: UnitTask(key, "dicom", [(m.index, m.path) for m in members])
            for key, members in groups.items()}


def _nifti_identity(e: FileEntry) -> str:
    """Patient/series identity of a NIfTI image: its relative path without channel suffix."""
    rel = e.rel
    for suffix in (".nii.gz", ".nii"):
        if rel.lower().endswith(suffix):
            rel = rel[: -len(suffix)]
    return CHANNEL_RE.sub("", rel)


def _nifti_tasks(entries, deid) -> dict[str, UnitTask]:
    tasks = {}
    for e in entries:
        if e.kind == "nifti" and not e.status:
            ident = _nifti_identity(e)
            key = deid.pseudonym("unit", f"nifti:{ident}|{e.rel}")
            tasks[key] = UnitTask(key, "nifti", [(e.index, e.path)], identity=ident)
    return tasks


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


def _names_for(label: FileEntry, by_path: dict[Path, FileEntry]) -> FileEntry | None:
    stem = SEG_SUFFIX.sub("", _stem(label.path))
    candidates = [label.path.parent / f"{stem}_seg.json"]
    if label.path.parent.name.startswith("labels"):
        candidates.append(label.path.parent.parent / "dataset.json")
    for c in candidates:
        if c in by_path:
            return by_path[c]
    return None


def _pair_nifti_labels(entries, tasks, by_path) -> None:
    image_of_path = {}
    for t in tasks.values():
        for _, p in t.image_files:
            image_of_path.setdefault(p, t)
            image_of_path.setdefault(p.parent, t)  # a DICOM series folder
    for e in entries:
        if e.kind != "nifti_label" or e.status:
            continue
        task = next((image_of_path[c] for c in _label_targets(e) if c in image_of_path), None)
        if task is None or task.label_file is not None:
            e.status, e.reason = "skipped", "unpaired_label"
            e.error = "no image volume matches this label map by the pairing rules"
            continue
        task.label_file, task.label_kind = (e.index, e.path), "nifti"
        names = _names_for(e, by_path)
        if names is not None and not names.status:
            task.names_file = (names.index, names.path)


def _pair_dicom_labels(entries, tasks) -> None:
    by_series: dict[str, UnitTask] = {}
    for t in sorted(tasks.values(), key=lambda t: -len(t.image_files)):
        if t.kind == "dicom":
            uid = entries[t.image_files[0][0]].header.series_uid
            by_series.setdefault(uid, t)
    for e in entries:
        if e.kind == "dicom" and not e.status and e.header.kind in ("rtstruct", "seg"):
            task = by_series.get(e.header.referenced_series or "")
            if task is None or task.label_file is not None:
                e.status, e.reason = "skipped", "unpaired_label"
                e.error = "its referenced image series is not in this run (or already labelled)"
                continue
            task.label_file, task.label_kind = (e.index, e.path), e.header.kind


def _settle_sidecars(entries, tasks) -> None:
    used = {t.names_file[0] for t in tasks.values() if t.names_file}
    for e in entries:
        if e.kind == "json" and not e.status and e.index not in used:
            e.status, e.reason, e.error = "skipped", "sidecar", "JSON not used as a names file"


def _resolved(path) -> Path | None:
    """``path`` resolved, or None when the operating system refuses (a symlink loop, ...)."""
    try:
        return Path(path).resolve()
    except FS_ERRORS:
        return None


def collection_tasks(entries: list[FileEntry], deid: Deidentifier, collections) -> dict:
    """Units of ``--collection NAME PATH`` roots, paired by the layout's own rules
    (pipeline/ingest/layouts/*.json). Their files are marked consumed for the generic rules."""
    from pipeline.ingest.collections import get_source

    by_path = {r: e for e in entries if (r := _resolved(e.path)) is not None}
    tasks, used = {}, set()
    for name, root in collections:
        for pair in get_source(name).pairs(root):
            image = by_path.get(_resolved(pair.image_path))
            labels = [by_path.get(_resolved(p)) for p in pair.label_paths]
            if image is None or image.status or any(lab is None for lab in labels):
                continue
            ident = _nifti_identity(image)
            key = deid.pseudonym("unit", f"nifti:{ident}|{image.rel}")
            task = UnitTask(key, "nifti", [(image.index, image.path)], identity=ident,
                            modality=pair.modality, names=pair.names or None)
            # multi-channel cases (nnU-Net channels, BraTS sequences) share one label map: every
            # channel uses it, the first one accounts for its file
            task.label_shared = any(lab.index in used for lab in labels)
            used.update(lab.index for lab in labels)
            if len(labels) == 1:
                task.label_file, task.label_kind = (labels[0].index, labels[0].path), "nifti"
            elif labels:
                task.mask_files = [(lab.index, lab.path) for lab in labels]
                task.label_file, task.label_kind = task.mask_files[0], "masks"
            for e in [image, *labels]:
                if not e.kind.startswith("consumed:"):
                    e.kind = "consumed:" + e.kind
            tasks[key] = task
    return tasks


def _restore_kinds(entries) -> None:
    for e in entries:
        if e.kind.startswith("consumed:"):
            e.kind = e.kind.split(":", 1)[1]


def group_units(entries: list[FileEntry], deid: Deidentifier, collections=()) -> list[UnitTask]:
    """Units sorted by ``unit_key`` (path-independent, so sharding does not leak order).

    ``collections``: (layout name, root) pairs whose files pair by their layout's rules."""
    shared: dict = {}
    for e in entries:  # headers scanned without the key (library callers): keyed now
        key_header(e, deid, shared)
    named = collection_tasks(entries, deid, collections) if collections else {}
    tasks = {**_dicom_tasks(entries), **_nifti_tasks(entries, deid), **named}
    by_path = {e.path: e for e in entries}
    _pair_nifti_labels(entries, tasks, by_path)
    _pair_dicom_labels(entries, tasks)
    _settle_sidecars(entries, tasks)
    _restore_kinds(entries)
    for t in tasks.values():
        t.image_files.sort(key=lambda f: f[0])
        if t.kind == "dicom":
            t.headers = [entries[i].header for i, _ in t.image_files]
    return [tasks[k] for k in sorted(tasks)]
