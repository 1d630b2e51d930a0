"""Discovery: walk source roots, account for every regular file, and group DICOM into series.

``walk`` (cheap, driver): every entry under each root becomes a :class:`FileEntry`; files
that are not candidates (archives, links outside the root, non-medical files) get their final
status here. ``scan_headers`` (a batch function run by the executor): DICOM headers of
candidate files. Grouping follows in :mod:`pipeline.ingest.units` (``group_units``): DICOM
images grouped by series and geometry, NIfTI volumes paired with their label maps,
RTSTRUCT/SEG paired with the series they reference, each as a ``UnitTask``.

Pairing rules (documented in docs/architecture.md):
* ``X_seg.nii.gz`` (or ``X_seg.nii``) is the label map of ``X.nii.gz`` or of the DICOM series
  in folder ``X/``; ``X_seg.json`` beside it names its labels.
* Medical Segmentation Decathlon / nnU-Net raw layout: ``imagesTr/CASE_0000.nii.gz`` (or
  ``CASE.nii.gz``) ↔ ``labelsTr/CASE.nii.gz``, names from ``dataset.json`` at the task root.
* RTSTRUCT and SEG objects: paired with the series whose SeriesInstanceUID they reference.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import IngestError
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.dicom_io import Header, read_header

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".7z", ".rar", ".gz")
NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
SEG_RE = re.compile(r"_seg\.nii(\.gz)?$", re.IGNORECASE)
CHANNEL_RE = re.compile(r"_\d{4}$")
NOT_DICOM_SUFFIXES = (".txt", ".md", ".csv", ".json", ".xml", ".html", ".py", ".icc", ".dump",
                      ".png", ".jpg", ".jpeg", ".pdf", ".yaml", ".yml", ".log")


@dataclass(slots=True)
class FileEntry:
    """One filesystem entry. ``rel`` is the path relative to its root, kept in memory only."""

    index: int
    path: Path
    rel: str
    file_key: str
    size: int
    kind: str  # candidate kinds: dicom, nifti, nifti_label, json; else final: skip/quarantine
    status: str | None = None  # final status when known at walk time
    reason: str | None = None
    error: str | None = None
    header: Header | None = None


def _is_archive(name: str) -> bool:
    low = name.lower()
    return low.endswith(ARCHIVE_SUFFIXES) and not NIFTI_RE.search(low)


def _classify(path: Path) -> tuple[str, str | None]:
    name = path.name
    if NIFTI_RE.search(name):
        return ("nifti_label" if SEG_RE.search(name) or path.parent.name == "labelsTr"
                else "nifti"), None
    if _is_archive(name):
        return "skip", "archive"
    if name.lower().endswith(".json"):
        return "json", None
    if name.lower().endswith(NOT_DICOM_SUFFIXES):
        return "skip", "not_medical"
    return "dicom", None


def _entry(index, path, root, deid) -> FileEntry:
    rel = f"{root.name}/{path.relative_to(root).as_posix()}"
    key = deid.pseudonym("file", rel)
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root.resolve()):
            return FileEntry(index, path, rel, key, 0, "skip", "skipped", "symlink_outside_root",
                             "symbolic link leads outside the source root")
        if not target.is_file():
            return FileEntry(index, path, rel, key, 0, "skip", "skipped", "not_regular",
                             "link to something that is not a regular file")
    elif not path.is_file():
        return FileEntry(index, path, rel, key, 0, "skip", "skipped", "not_regular",
                         "not a regular file")
    kind, reason = _classify(path)
    size = path.stat().st_size
    if kind == "skip":
        return FileEntry(index, path, rel, key, size, kind, "skipped", reason,
                         "archives are not extracted" if reason == "archive"
                         else "not a DICOM or NIfTI file")
    return FileEntry(index, path, rel, key, size, kind)


def walk(roots, deid: Deidentifier) -> list[FileEntry]:
    """Every non-directory entry under ``roots``, in a deterministic order.

    Directory symlinks are not descended into; file symlinks are recorded (and followed only
    when they stay inside their root).
    """
    entries: list[FileEntry] = []
    for root in [Path(r) for r in roots]:
        if not root.exists():
            raise ValueError(f"source {root}: no such file or directory")
        if root.is_file():
            entries.append(_entry(len(entries), root, root.parent, deid))
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            here = Path(dirpath)
            for name in sorted(filenames) + sorted(d for d in dirnames if (here / d).is_symlink()):
                entries.append(_entry(len(entries), here / name, root, deid))
    return entries


def scan_headers(batch: list[FileEntry]) -> list[FileEntry]:
    """Batch stage: read DICOM headers; unreadable files become quarantined/skipped entries."""
    for e in batch:
        if e.kind != "dicom" or e.status:
            continue
        try:
            e.header = read_header(e.path)
        except IngestError as err:
            e.status = "skipped" if err.reason == "unreadable" and "not a DICOM" in err.problem \
                else "quarantined"
            e.reason = "not_medical" if e.status == "skipped" else err.reason
            e.error = err.problem
        else:
            if e.header.kind == "other":
                e.status, e.reason = "skipped", "unsupported_sop"
                e.error = f"SOP class {e.header.sop_class or 'unknown'} is not an image"
            elif e.header.kind == "image" and not e.header.has_pixels:
                e.status, e.reason, e.error = "quarantined", "no_pixel_data", "no pixel data"
    return batch
