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
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from stat import S_ISLNK, S_ISREG

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import IngestError
from pipeline.ingest.deid import MODALITIES, Deidentifier
from pipeline.ingest.dicom_io import Header, read_header
from pipeline.ingest.dicom_values import is_uid
from pipeline.ingest.remote import REMOTE_BASE, holds_name, local_copies, virtual_root

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".7z", ".rar", ".gz")
NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
SEG_RE = re.compile(r"_seg\.nii(\.gz)?$", re.IGNORECASE)
CHANNEL_RE = re.compile(r"_\d{4}$")
NOT_DICOM_SUFFIXES = (".txt", ".md", ".csv", ".json", ".xml", ".html", ".py", ".icc", ".dump",
                      ".png", ".jpg", ".jpeg", ".pdf", ".yaml", ".yml", ".log")
# What a path operation may raise: OSError (vanished, permission, ELOOP, ENAMETOOLONG, ...),
# RuntimeError (``Path.resolve`` on a symlink loop before Python 3.13) and UnicodeError (a name
# that is not UTF-8 reaching an encoder). Only path operations are guarded with it: a
# RecursionError (a RuntimeError) while parsing a header is the ``recursion`` reason.
FS_ERRORS = (OSError, RuntimeError, UnicodeError)


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
    header: Header | None = None  # UIDs keyed (:func:`key_header`) once discovery has them
    mtime_ns: int = 0  # modification time (an object store's LastModified): resume's change test
    group_key: str | None = None  # DICOM: the unit key of its series and geometry (keyed)
    root: int = 0  # which source root it was found under (its ``rel`` starts with that label)


def _is_archive(name: str) -> bool:
    low = name.lower()
    return low.endswith(ARCHIVE_SUFFIXES) and not NIFTI_RE.search(low)


def _classify(path: Path) -> str:
    """Candidate kind from the name: nifti, nifti_label, json, dicom; or archive / skip."""
    name = path.name
    if NIFTI_RE.search(name):
        return "nifti_label" if SEG_RE.search(name) or path.parent.name == "labelsTr" else "nifti"
    if _is_archive(name):
        return "archive"
    if name.lower().endswith(".json"):
        return "json"
    if name.lower().endswith(NOT_DICOM_SUFFIXES):
        return "skip"
    return "dicom"


def file_key(deid: Deidentifier, rel: str) -> str:
    """Keyed id of a file: HMAC of the raw bytes of ``rel`` (what ``os.walk`` decoded with
    surrogateescape), so a name that is not UTF-8 has an id too."""
    try:
        raw = os.fsencode(rel)
    except UnicodeError:  # a lone surrogate that did not come from the file system
        raw = rel.encode("utf-8", "surrogatepass")
    return deid.pseudonym("file", raw)


def _final(index, path, rel, key, size, status, err: IngestError) -> FileEntry:
    """An entry whose outcome is known at walk time (row message: the error's literal)."""
    return FileEntry(index, path, rel, key, size, "skip", status, err.reason, err.message)


def _target(path: Path) -> os.stat_result | None:
    """What a symbolic link points to (``stat``), None when it points nowhere."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _classified(index, path: Path, root: Path, rel: str, key: str,
                max_bytes: int | None = None) -> FileEntry:
    """The entry for ``path``. Every path operation here may raise (FS_ERRORS): the caller
    makes that a ``filesystem`` entry. (``Path.is_file`` is not used: it answers False for
    errors it swallows, and a vanished file would pass for something that is not a file.)"""
    st = path.lstat()
    if S_ISLNK(st.st_mode):
        if not path.resolve().is_relative_to(root.resolve()):
            return _final(index, path, rel, key, 0, "skipped", IngestError(
                "symlink_outside_root", "symbolic link leads outside the source root"))
        st = _target(path)
        if st is None or not S_ISREG(st.st_mode):
            return _final(index, path, rel, key, 0, "skipped", IngestError(
                "not_regular", "link to something that is not a regular file"))
    elif not S_ISREG(st.st_mode):
        return _final(index, path, rel, key, 0, "skipped",
                      IngestError("not_regular", "not a regular file"))
    return _candidate(index, path, rel, key, st.st_size, st.st_mtime_ns, max_bytes)


def _candidate(index, path, rel, key, size: int, mtime_ns: int,
               max_bytes: int | None) -> FileEntry:
    """The entry of a regular file (or object) by its name and size: archives and files that
    are not medical get their final status; a candidate larger than ``max_bytes`` (bigger than
    any file the series budget lets through: it is neither read nor, remote, fetched) is a
    ``size_budget`` row."""
    kind = _classify(path)
    if kind == "archive":
        return _final(index, path, rel, key, size, "skipped",
                      IngestError("archive", "archives are not extracted"))
    if kind == "skip":
        return _final(index, path, rel, key, size, "skipped",
                      IngestError("not_medical", "not a DICOM or NIfTI file"))
    if max_bytes is not None and size > max_bytes:
        return _final(index, path, rel, key, size, "quarantined",
                      IngestError("size_budget", "file larger than the series byte budget"))
    return FileEntry(index, path, rel, key, size, kind, mtime_ns=mtime_ns)


def refused(index: int, path: Path, rel: str, key: str) -> FileEntry:
    """An entry the operating system refused an operation on: a ``filesystem`` row."""
    return _final(index, path, rel, key, 0, "quarantined", IngestError("filesystem"))


def root_labels(roots: list[Path]) -> list[str]:
    """The name each root's files are keyed under: the root folder's name, lengthened by its
    parents' names only as far as needed to tell roots apart (``tests/data`` and
    ``datasets/data``; a lone root is just its name), so two roots never give two files one
    key, and a collection moved elsewhere keeps its keys."""
    parts = [Path(os.path.abspath(r)).parts[1:] or ("",) for r in roots]
    labels = []
    for i, mine in enumerate(parts):
        others = {q for j, q in enumerate(parts) if j != i and q != mine}
        n = 1
        while n < len(mine) and any(q[-n:] == mine[-n:] for q in others):
            n += 1
        labels.append("/".join(mine[-n:]))
    return labels


def _entry(index, path: Path, root: Path, label: str, deid: Deidentifier,
           max_bytes: int | None = None) -> FileEntry:
    rel = f"{label}/{path.relative_to(root).as_posix()}"
    key = file_key(deid, rel)
    try:
        return _classified(index, path, root, rel, key, max_bytes)
    except FS_ERRORS:
        return refused(index, path, rel, key)


def _is_link(path: Path) -> bool:
    try:
        return path.is_symlink()
    except FS_ERRORS:
        return False  # os.walk descends and reports the folder through its onerror


def _base(root) -> Path:
    """The folder a root's files are keyed under: the root, or the folder of a root that is
    one file; for a remote root its virtual path (:mod:`pipeline.ingest.remote`)."""
    if isinstance(root, str):
        return virtual_root(root).parent if storage.is_file(root) else virtual_root(root)
    return root.parent if root.is_file() else root


def _remote_entries(uri: str, base: Path, label: str, deid: Deidentifier, start: int,
                    max_bytes: int | None = None) -> Iterator[FileEntry]:
    """The objects under remote root ``uri`` (or the one object it names) as entries, from
    one listing (no object is read here; :mod:`pipeline.ingest.remote`): virtual paths, the
    object's size and LastModified (resume's change test). An object whose name no path can
    hold (an empty, ``.`` or ``..`` segment) is a ``filesystem`` row."""
    fs, path = storage.resolve(uri)
    one = fs.get_file_info(path)
    infos = [one] if one.type == pafs.FileType.File else storage.list_files(uri, recursive=True)
    scheme = uri.partition("://")[0].lower()
    prefix = "/".join(base.relative_to(REMOTE_BASE).parts[1:]) + "/"  # bucket/prefix/
    for n, info in enumerate(infos):
        obj = f"{scheme}://{info.path}"
        path = virtual_root(obj)
        rel = f"{label}/{info.path.removeprefix(prefix)}"  # the object's own name, as listed
        key, index = file_key(deid, rel), start + n
        if not holds_name(obj) or not info.path.startswith(prefix):
            yield refused(index, path, rel, key)
            continue
        yield _candidate(index, path, rel, key, info.size, info.mtime_ns or 0, max_bytes)


def sources(roots) -> tuple[list, list[Path], list[str]]:
    """The roots as :func:`walk` takes them (a remote root as its URI, others as paths), the
    folder each root's files are keyed under and its label (:func:`root_labels`). Raises
    ValueError for a root that does not exist."""
    roots = [str(r) if storage.is_remote(r) else Path(r) for r in roots]
    for root in roots:
        if not (storage.exists(root) if isinstance(root, str) else root.exists()):
            raise ValueError(f"source {root}: no such file or directory")
    bases = [_base(r) for r in roots]
    return roots, bases, root_labels(bases)


def iter_walk(roots, deid: Deidentifier, max_bytes: int | None = None) -> Iterator[FileEntry]:
    """Every non-directory entry under ``roots``, in a deterministic order, one at a time
    (``index`` counts from 0, ``root`` numbers the root). A remote root (``s3://``,
    ``gs://``) is listed, not read (:func:`_remote_entries`). A candidate file larger than
    ``max_bytes`` is a ``size_budget`` row here, before anything reads it.

    Directory symlinks are not descended into; file symlinks are recorded (and followed only
    when they stay inside their root). A folder that cannot be listed is one ``filesystem``
    entry (the files in it cannot be counted).
    """
    roots, bases, labels = sources(roots)
    n = 0
    for number, (root, base, label) in enumerate(zip(roots, bases, labels, strict=True)):
        for e in root_entries(root, base, label, deid, n, max_bytes):
            e.root = number
            n += 1
            yield e


def root_entries(root, base: Path, label: str, deid: Deidentifier, start: int = 0,
                 max_bytes: int | None = None) -> Iterator[FileEntry]:
    """The entries of one root as :func:`sources` gives it (``index`` from ``start``): an
    object listing, one file, or a folder's walk."""
    if isinstance(root, str):
        return _remote_entries(root, base, label, deid, start, max_bytes)
    if root.is_file():
        return iter([_entry(start, root, base, label, deid, max_bytes)])
    return walk_folder(root, label, deid, start, max_bytes)


def walk_folder(root: Path, label: str, deid: Deidentifier, start: int,
                 max_bytes: int | None, top: Path | None = None,
                 shallow: bool = False) -> Iterator[FileEntry]:
    """The entries under folder ``top`` (default: ``root``), keyed relative to ``root``, in
    :func:`iter_walk`'s order; ``shallow``: ``top``'s own listing only (its files and links),
    not its subfolders (:func:`subfolders` lists those)."""
    unlisted: list[Path] = []  # folders os.walk could not list, reported in walk order
    n = start
    top = root if top is None else top

    def refuse(path: Path) -> FileEntry:
        rel = f"{label}/{path.relative_to(root).as_posix()}"
        return refused(n, path, rel, file_key(deid, rel))

    for dirpath, dirnames, filenames in os.walk(
            top, followlinks=False,
            onerror=lambda err: unlisted.append(Path(err.filename) if err.filename is not None
                                                else top)):
        while unlisted:
            yield refuse(unlisted.pop(0))
            n += 1
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames) + sorted(d for d in dirnames if _is_link(here / d)):
            yield _entry(n, here / name, root, label, deid, max_bytes)
            n += 1
        if shallow:
            dirnames.clear()
    while unlisted:
        yield refuse(unlisted.pop(0))
        n += 1


def subfolders(folder: Path) -> list[Path]:
    """The folders :func:`iter_walk` descends into from ``folder``, in its order (sorted, no
    symbolic links); none when ``folder`` cannot be listed (its walk reports it)."""
    def is_dir(entry) -> bool:
        try:
            return entry.is_dir()
        except OSError:  # as os.walk: not a folder it descends into
            return False

    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if is_dir(e))
    except FS_ERRORS:
        return []
    return [folder / d for d in names if not os.path.islink(folder / d)]


def walk(roots, deid: Deidentifier, max_bytes: int | None = None) -> list[FileEntry]:
    """:func:`iter_walk` as a list (tests, small collections; a build keeps the entries as
    one table, :class:`pipeline.ingest.found.Found`)."""
    return list(iter_walk(roots, deid, max_bytes))


def openable(path) -> bool:
    """True when the operating system lets this process open ``path`` for reading now
    (non-blocking, so a fifo swapped in since discovery cannot hang the caller)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (*FS_ERRORS, ValueError):
        return False
    os.close(fd)
    return True


def as_filesystem(err: IngestError, path) -> IngestError:
    """``err``, or a ``filesystem`` error when ``path`` cannot even be opened now (vanished
    since discovery, permission, loop): a reader reports such a file as unreadable, and the
    operating system's own message for it is the path."""
    if err.reason == "filesystem" or openable(path):
        return err
    return IngestError("filesystem", None, path)


def _settle(e: FileEntry, status: str, err: IngestError) -> None:
    e.status, e.reason, e.error = status, err.reason, err.message


def _scan_one(e: FileEntry, path: Path) -> None:
    """Read the header of ``e`` from ``path`` (the file, or the fetched copy of its object)."""
    try:
        e.header = read_header(path)
    except IngestError as err:
        err = as_filesystem(err, path)
        if err.reason == "unreadable" and (err.detail or "").startswith("not a DICOM"):
            _settle(e, "skipped", IngestError("not_medical", "not a DICOM file"))
        else:
            _settle(e, "quarantined", err)
    except (OSError, UnicodeEncodeError):
        _settle(e, "quarantined", IngestError("filesystem"))
    else:
        if e.header.kind == "other":
            _settle(e, "skipped", IngestError("unsupported_sop", "SOP class is not an image"))
        elif e.header.kind == "image" and not e.header.has_pixels:
            _settle(e, "quarantined", IngestError("no_pixel_data", "no pixel data"))


def geometry_signature(h: Header) -> str:
    """Rows, columns and orientation (3 decimals): one series splits into units by these."""
    iop = "none" if h.iop is None else ",".join(f"{v:.3f}" for v in h.iop)
    return f"{h.rows}x{h.cols}|{iop}"


def key_header(e: FileEntry, deid: Deidentifier, shared: dict | None = None) -> None:
    """Replace the raw identifiers of ``e.header`` by keyed values, once, and set
    ``e.group_key``: the unit key of the file's series and geometry, as grouping has always
    made it from the raw SeriesInstanceUID (``no-series:<file key>`` when it has none). Series
    and referenced-series UIDs become HMACs (the same function for both, so label objects pair
    as before); a SOP class or transfer syntax that is not a UID, and a modality that is not a
    DICOM defined term (``deid.MODALITIES``: a code-shaped value may still be text someone
    typed), are replaced by fixed values that classify and decode alike. ``shared``: one object
    per distinct keyed value (a series' slices repeat them)."""
    h = e.header
    if h is None or e.group_key is not None:
        return
    shared = {} if shared is None else shared
    raw = h.series_uid or f"no-series:{e.file_key}"
    e.group_key = deid.pseudonym("unit", f"{raw}|{geometry_signature(h)}")

    def keyed(uid):
        if not uid:
            return uid
        if uid not in shared:
            shared[uid] = deid.pseudonym("uid", uid)
        return shared[uid]

    ts = h.transfer_syntax if not h.transfer_syntax or is_uid(h.transfer_syntax) else "invalid"
    e.header = replace(h, series_uid=keyed(h.series_uid),
                       referenced_series=keyed(h.referenced_series),
                       sop_class=h.sop_class if is_uid(h.sop_class) else "",
                       transfer_syntax=ts,
                       modality=h.modality if h.modality in MODALITIES else "OT",
                       sop_uid=deid.pseudonym("uid", h.sop_uid) if h.sop_uid else "",
                       study_uid=keyed(h.study_uid),
                       accession=keyed_as("accession", h.accession, deid, shared),
                       patient_date=keyed_as("patient-date", h.patient_date, deid, shared))


def keyed_as(kind: str, value: str, deid: Deidentifier, shared: dict) -> str:
    """``deid.pseudonym(kind, value)`` ("" for ""), one object per distinct value in ``shared``:
    the join keys of reports (``accession``, ``patient-date``), keyed as report tables key them
    (:func:`pipeline.reports.tables.report_key`)."""
    if not value:
        return ""
    if (kind, value) not in shared:
        shared[(kind, value)] = deid.pseudonym(kind, value)
    return shared[(kind, value)]


HEAD_BYTES = 1 << 16  # of a remote object, fetched for its header scan first


def scan_headers(batch: list[FileEntry], deid: Deidentifier | None = None) -> list[FileEntry]:
    """Batch stage: read DICOM headers; unreadable files become quarantined/skipped entries.
    With ``deid`` the identifiers are keyed here (:func:`key_header`), so a batch's result
    carries no raw UID; without it :func:`pipeline.ingest.units.group_units` keys them.

    A remote object is read from its first :data:`HEAD_BYTES` (one ranged GET). That read is
    kept only when it reached the pixel data element (so every element before it was parsed)
    or held the whole object; any other object (no pixel data: RTSTRUCT; a header longer than
    the prefix; deflated or encapsulated data sets a prefix cannot parse) is fetched whole and
    read again, so a verdict never rests on part of a file."""
    todo = [e for e in batch if e.kind == "dicom" and not e.status and e.header is None]
    with local_copies((e.path for e in todo), limit=HEAD_BYTES) as local:
        for e in todo:
            _scan_one(e, local[e.path])
    again = [e for e in todo if local[e.path] != e.path and e.size > HEAD_BYTES
             and not (e.header is not None and e.header.has_pixels)]
    for e in again:
        e.header = e.status = e.reason = e.error = None
    with local_copies(e.path for e in again) as local:
        for e in again:
            _scan_one(e, local[e.path])
    shared: dict = {}
    for e in todo:
        if deid is not None:
            key_header(e, deid, shared)
    return batch
