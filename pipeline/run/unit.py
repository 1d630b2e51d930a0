"""Stage: one unit (series + its label source) → series row, image rows, file outcomes.

``process_unit`` is a pure function of its task and config; executors run it unchanged (the
local executor in a forked child under a timeout and memory cap). It reads and de-identifies
the volume, pairs the label map, cuts 2D images, and returns rows for the series, images and
files tables. Every problem becomes a file outcome; nothing is raised.

A file the operating system will not open any more (it vanished after discovery, its
permissions changed) is a ``filesystem`` outcome, whatever the reader called it: readers turn
an OSError into ``unreadable``, and the OS's own message for it is the path.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.captions.attributes import PROJECTION_FACTS
from pipeline.captions.describe import describe_image
from pipeline.captions.grounded import ground_captions, unit_report
from pipeline.captions.structures import safe_label_names
from pipeline.config import PIPELINE_VERSION, BuildConfig
from pipeline.errors import SKIP_REASONS, IngestError
from pipeline.geometry import body_mask, present_values, to_uint8
from pipeline.images.png import decode_png
from pipeline.images.slicing import PLANE_AXIS, SliceConfig, cut_images
from pipeline.ingest.deid import VOI_KEYS, Deidentifier
from pipeline.ingest.dicom_io import dcmread_safe
from pipeline.ingest.discover import as_filesystem
from pipeline.ingest.read import read_dicom_series, read_nifti
from pipeline.ingest.remote import local_copies
from pipeline.ingest.units import UnitTask
from pipeline.ingest.volume import Volume
from pipeline.labels.dicom import rasterize_rtstruct, read_dicom_seg
from pipeline.labels.nifti import label_names_from_json, read_mask_folder, read_nifti_labels
from pipeline.roi.annotated import annotation_regions, frame_to_image
from pipeline.roi.regions import label_prompts, label_regions


@dataclass
class UnitResult:
    """Rows produced by one unit. ``files`` maps file index → (status, reason, error)."""

    unit_key: str
    series: dict | None = None
    images: list[dict] = field(default_factory=list)
    regions: list[dict] = field(default_factory=list)  # labels route
    prompts: dict[str, list] = field(default_factory=dict)  # image_id → [(label, value, XYXY)]
    files: dict[int, tuple[str, str, str | None]] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)  # worker seconds per stage
    report: object | None = None  # pipeline.captions.grounded.UnitReport of the study's report


class _Clock:
    """Adds the seconds since the previous mark to ``stage_s[name]`` at each :meth:`mark`."""

    def __init__(self, stage_s: dict[str, float]):
        self.stage_s, self.t = stage_s, time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.stage_s[name] = self.stage_s.get(name, 0.0) + now - self.t
        self.t = now


def outcome(err: IngestError) -> str:
    """Files table status for an error: skipped for valid-but-unused input, else quarantined."""
    return "skipped" if err.reason in SKIP_REASONS else "quarantined"


def assign_split(patient_key: str, ratios, salt: str) -> str:
    """train/val/test from a hash of the de-identified patient: all of a patient's images agree."""
    u = int(hashlib.sha256(f"{salt}:{patient_key}".encode()).hexdigest()[:8], 16) / 2**32
    if u < ratios[0]:
        return "train"
    return "val" if u < ratios[0] + ratios[1] else "test"


def image_id(unit_key: str, plane: str, index: int, window: str) -> str:
    """Deterministic id of a 2D image: same inputs and config → same id on every run."""
    blob = f"{PIPELINE_VERSION}|{unit_key}|{plane}|{index}|{window}".encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# What a reader may let through from the operating system (not parse errors: those are
# IngestErrors): a file that vanished or changed under it, a name that is not UTF-8.
READ_FS_ERRORS = (OSError, UnicodeEncodeError)


def _record(result: UnitResult, idx: int, path, err: IngestError, status=None) -> None:
    """File ``idx``'s outcome from ``err``: ``status`` (default: by reason), or a quarantined
    ``filesystem`` outcome when ``path`` no longer opens."""
    err = as_filesystem(err, path)
    if status is None or err.reason == "filesystem":
        status = outcome(err)
    result.files[idx] = (status, err.reason, err.message)


def _read_nifti_volume(task: UnitTask, cfg: BuildConfig, deid: Deidentifier, result):
    idx, path = task.image_files[0]
    try:
        return read_nifti(path, deid, task.identity, task.modality, cfg.read)
    except IngestError as e:
        _record(result, idx, path, e)
    except READ_FS_ERRORS:
        _record(result, idx, path, IngestError("filesystem"))
    return None


def _read_image_volume(task: UnitTask, cfg: BuildConfig, deid: Deidentifier, result):
    """(volume or None, the DICOM SeriesRead or None): the read keeps where each frame went,
    for annotations drawn on frames."""
    if task.kind == "nifti":
        return _read_nifti_volume(task, cfg, deid, result), None
    try:
        read = read_dicom_series([p for _, p in task.image_files], deid, cfg.read, task.headers)
    except READ_FS_ERRORS:
        for idx, path in task.image_files:
            _record(result, idx, path, IngestError("filesystem"), "quarantined")
        return None, None
    for pos, err in read.file_errors.items():
        _record(result, *task.image_files[pos], err, "quarantined")
    if read.volume is None:
        for idx, path in task.image_files:
            if idx not in result.files:
                _record(result, idx, path, read.error, "quarantined")
    return read.volume, read


def _attach_labels(task: UnitTask, vol: Volume, result: UnitResult,
                   allow_unknown_names: bool = False) -> str:
    """Read the unit's label source onto ``vol``'s grid; every label name read from a file
    passes the structure vocabulary here (an unknown one becomes ``structure_<value>``)."""
    if task.label_file is None:
        return "none"
    path = task.label_file[1]
    try:
        if task.label_kind == "masks":
            labels, names = read_mask_folder([p for _, p in task.mask_files], vol, task.names)
        elif task.label_kind == "nifti":
            names = task.names
            if task.names_file:
                names = label_names_from_json(task.names_file[1])
            labels, names = read_nifti_labels(path, vol, names)
        else:
            ds = dcmread_safe(path)
            reader = rasterize_rtstruct if task.label_kind == "rtstruct" else read_dicom_seg
            labels, names = reader(ds, vol)
    except READ_FS_ERRORS:
        return _labels_refused(task, IngestError("filesystem"), result)
    except IngestError as e:
        return _labels_refused(task, e, result)
    vol.labels, vol.label_names = labels, safe_label_names(names, allow_unknown_names)
    for j, _ in task.mask_files or [task.label_file]:
        result.files[j] = ("ingested", "ok", None)
    if task.names_file:
        result.files[task.names_file[0]] = ("ingested", "sidecar", None)
    return task.label_kind


def _labels_refused(task: UnitTask, err: IngestError, result: UnitResult) -> str:
    """Outcomes of a unit's label files (and names sidecar) when its label map is refused."""
    for j, path in task.mask_files or [task.label_file]:
        _record(result, j, path, err, "quarantined")
    if task.names_file:
        idx, path = task.names_file
        _record(result, idx, path, IngestError("sidecar", "its label map was refused"), "skipped")
    return "none"


def _series_row(task, vol: Volume, label_source: str, split: str, n_images: int) -> dict:
    m = vol.meta
    return {
        "series_key": m["series_key"], "unit_key": task.unit_key,
        "patient_key": m["patient_key"], "study_key": m["study_key"], "split": split,
        "modality": vol.modality, "modality_source": m.get("modality_source", "dicom"),
        "shape": list(vol.shape), "spacing_mm": list(vol.spacing),
        "affine": [float(x) for x in vol.affine.ravel()], "n_files": len(task.image_files),
        "n_images": n_images, "label_source": label_source,
        "label_names": [vol.label_names[k] for k in sorted(vol.label_names)],
        "body_part": m.get("body_part"), "manufacturer": m.get("manufacturer"),
        "slice_thickness_mm": m.get("slice_thickness_mm"), "kvp": m.get("kvp"),
        "contrast": m.get("contrast"), "study_date_shifted": m.get("study_date_shifted"),
        "inverted_monochrome1": m.get("inverted_monochrome1"),
        "color_to_luminance": m.get("color_to_luminance"),
        "geometry_known": m.get("geometry_known", True), "resampled": m.get("resampled"),
        **{k: m.get(k) for k in (*PROJECTION_FACTS, *VOI_KEYS)},
        "deid_key_id": m["deid_key_id"],
    }


def _image_row(task, vol: Volume, img, split: str) -> dict:
    m = vol.meta
    values = [] if img.labels is None else present_values(img.labels)
    plane = PROJECTION if m.get("projection") else img.plane  # a radiograph has no 3D plane
    return {
        "image_id": image_id(task.unit_key, plane, img.slice_index, img.window),
        "unit_key": task.unit_key, "series_key": m["series_key"],
        "patient_key": m["patient_key"], "study_key": m["study_key"], "split": split,
        "modality": vol.modality, "plane": plane, "slice_index": int(img.slice_index),
        "window": img.window, "window_min": img.window_min, "window_max": img.window_max,
        "bits": 16 if img.png[24:25] == b"\x10" else 8,
        "height": int(img.height), "width": int(img.width),
        "pixel_to_ras": [float(x) for x in np.asarray(img.pixel_to_ras).ravel()],
        "pixel_spacing_mm": [float(x) for x in img.pixel_spacing_mm],
        "slice_thickness_mm": float(img.slice_thickness_mm),
        "label_values": values, "contrast": m.get("contrast"), "body_part": m.get("body_part"),
        **{k: m.get(k) for k in PROJECTION_FACTS},  # captions read them (not an images column)
        "caption_summary": None, "caption_report": None, "caption_version": None,
        "image": {"bytes": img.png, "path": None},
    }


PLANE_OF_SINGLETON_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}
PROJECTION = "projection"  # images.plane of a projection image (CR, DX, MG, ...: no 3D plane)


def _slicing_for(vol: Volume, cfg: SliceConfig) -> SliceConfig:
    """A single-slice (2D) volume is cut in its acquired plane only: the one normal to its
    singleton axis (a sagittal localizer gives one sagittal image, not a line of pixels)."""
    flat = [a for a in range(3) if vol.array.shape[a] == 1]
    if not flat:
        return cfg
    return replace(cfg, planes=(PLANE_OF_SINGLETON_AXIS[flat[-1]],), every_k=1)


def _shapes_by_slice(task: UnitTask, read, frame: int) -> dict[int, list]:
    """Slice k of the assembled grid → the annotation shapes drawn on its frame; frames of
    other time points than the one cut (``frame``), and reads without frame geometry (a
    resampled tilted stack), give none."""
    if not task.annotations or read is None or read.grid_affine is None:
        return {}
    pos_of = {idx: pos for pos, (idx, _) in enumerate(task.image_files)}
    by_slice: dict[int, list] = {}
    for idx, shapes in task.annotations.items():
        for sh in shapes:
            slot = read.frames.get((pos_of[idx], sh.frame))
            if slot is not None and slot[1] == frame:
                by_slice.setdefault(slot[0], []).append(sh)
    return by_slice


def _placed_annotations(by_slice: dict[int, list], read, images) -> list[list[tuple]]:
    """Per image: (shape, M) of every annotation whose frame lies in it
    (:func:`pipeline.roi.annotated.frame_to_image`)."""
    placed: list[list[tuple]] = [[] for _ in images]
    for j, img in enumerate(images):
        for k, shapes in by_slice.items():
            m = frame_to_image(read.grid_affine, k, img.pixel_to_ras, img.slice_thickness_mm)
            if m is not None:
                placed[j] += [(sh, m) for sh in shapes]
    return placed


def _annotated_slices(by_slice: dict[int, list], read, vol: Volume, slicing: SliceConfig
                      ) -> dict[str, set[int]] | None:
    """plane → the canonical slice indices annotated frames lie in, for each plane of
    ``slicing`` a frame lies in (an annotated slice is always cut, whatever --every-k)."""
    if not by_slice:
        return None
    to_canonical = np.linalg.inv(vol.affine) @ read.grid_affine
    out: dict[str, set[int]] = {}
    for k in by_slice:
        corners = to_canonical @ np.array([[0, 0, k, 1], [1, 0, k, 1], [0, 1, k, 1]], float).T
        for plane in slicing.planes:
            along = corners[PLANE_AXIS[plane]]
            if np.allclose(along, along[0], atol=1e-3):  # the frame lies in this plane
                out.setdefault(plane, set()).add(int(round(along[0])))
    return out


def _frame_shape(task: UnitTask) -> tuple[int, int]:
    h = (task.headers or [None])[0]
    return (h.rows, h.cols) if h is not None else (0, 0)


def _annotation_status(task: UnitTask, placed: list) -> str | None:
    """images.annotation_status: "findings" when annotations lie in the image, "no_finding"
    when the tables list the unit's files with nothing found, else null (not annotated)."""
    if placed:
        return "findings"
    if task.annotations and not any(task.annotations.values()):
        return "no_finding"
    return None


def _values(ds, keyword: str) -> list:
    """The values of a (possibly multi-valued) element; [] when absent or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element holds no identifier this pass can use
        return []
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or hasattr(value, "components"):  # PersonName
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _known_identifiers(task: UnitTask):
    """The patient's own names and IDs from the first file's header, for the reports' second
    de-identification pass (``pipeline.reports.text_deid.scrub_known``); in memory only."""
    from pipeline.reports.text_deid import Known

    try:
        ds = dcmread_safe(task.image_files[0][1], stop_before_pixels=True)
    except (IngestError, *READ_FS_ERRORS):
        return Known(names=(), ids=())
    names, ids = [], []
    for kw in ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName"):
        for v in _values(ds, kw):
            names += [p for p in str(v).replace("^", " ").replace(",", " ").split() if len(p) > 1]
    for kw in ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID"):
        ids += [str(v).strip() for v in _values(ds, kw) if str(v).strip()]
    return Known(names=tuple(names), ids=tuple(ids))


def _regions_and_captions(images, result: UnitResult, names, cfg: BuildConfig,
                          clock: _Clock, task: UnitTask, placed: list[list[tuple]]) -> None:
    """Image by image: the labels route's exact regions, the boxes route's prompts (component
    boxes for the segmenter) and, when no model stage follows, the captions.

    Each image's pixels (the array its PNG encodes), body mask and region masks are measured
    once and dropped before the next image, so a unit never holds more than one image's
    masks. Seconds go to the ``regions`` and ``captions`` stages of ``clock``."""
    rcfg = cfg.regions
    describe = not rcfg.uses_models  # else captions follow the model stage (run.shards)
    for img, row, here in zip(images, result.images, placed, strict=True):
        rows, masks, pixels, body = [], [], None, None
        if (img.labels is not None and "labels" in rcfg.routes) or here:
            pixels = img.pixels if img.pixels is not None else decode_png(row)
            body = body_mask(to_uint8(pixels))
        if img.labels is not None and "labels" in rcfg.routes:
            rows = label_regions(row, img.labels, names, rcfg, body=body, masks=masks)
        prompts = []
        if img.labels is not None and "boxes" in rcfg.routes:
            prompts = label_prompts(row, img.labels, names, rcfg)
        if here:
            found, asked = annotation_regions(row, here, _frame_shape(task), rcfg, body, masks)
            rows, prompts = rows + found, prompts + asked
        if task.annotations is not None:
            row["annotation_status"] = _annotation_status(task, here)
        result.regions += rows
        if prompts:
            result.prompts[row["image_id"]] = prompts
        img.pixels = None
        clock.mark("regions")
        if describe:
            describe_image(row, pixels, rows, cfg.caption_seed, body=body, masks=masks)
            ground_captions([row], rows, result.report)
            clock.mark("captions")


def _report_file(path):
    """A ``--reports beside`` text, scrubbed (:func:`pipeline.reports.tables.read_report_file`);
    None when it cannot be read (the unit's images then carry template reports)."""
    from pipeline.reports.tables import read_report_file

    try:
        return read_report_file(path)
    except ValueError:
        return None


def process_unit(task: UnitTask, cfg: BuildConfig, deid: Deidentifier) -> UnitResult:
    """Read, de-identify, label and cut one unit. Never raises for bad input. The objects of a
    remote source are fetched first and removed after (:mod:`pipeline.ingest.remote`)."""
    with local_copies(task.paths()) as local:
        return _process(task.localized(local), cfg, deid)


def _process(task: UnitTask, cfg: BuildConfig, deid: Deidentifier) -> UnitResult:
    result = UnitResult(task.unit_key)
    clock = _Clock(result.stage_s)
    vol, read = _read_image_volume(task, cfg, deid, result)
    clock.mark("read")
    if vol is None:
        if task.label_file:
            result.files[task.label_file[0]] = ("skipped", "unpaired_label", "image not ingested")
        if task.names_file:
            result.files[task.names_file[0]] = ("skipped", "sidecar", "image not ingested")
        return result
    label_source = _attach_labels(task, vol, result, cfg.read.allow_unknown_label_names)
    clock.mark("labels")
    split = assign_split(vol.meta["patient_key"], cfg.split.ratios, cfg.split.salt)
    slicing = _slicing_for(vol, cfg.slicing)
    # 4D: frame cfg.slicing.frame; annotated slices are cut whatever --every-k
    by_slice = _shapes_by_slice(task, read, slicing.frame)
    images = cut_images(vol, slicing, _annotated_slices(by_slice, read, vol, slicing))
    result.images = [_image_row(task, vol, img, split) for img in images]
    clock.mark("cut")
    report = task.report if task.report_file is None else _report_file(task.report_file[1])
    if report is not None:
        result.report = unit_report(report, _known_identifiers(task))
        clock.mark("reports")
    _regions_and_captions(images, result, vol.label_names, cfg, clock, task,
                          _placed_annotations(by_slice, read, images))
    result.series = _series_row(task, vol, label_source, split, len(images))
    for idx, _ in task.image_files:
        result.files.setdefault(idx, ("ingested", "ok", None))
    return result
