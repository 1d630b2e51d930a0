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

from pipeline.captions.describe import describe_image
from pipeline.captions.structures import safe_label_names
from pipeline.config import PIPELINE_VERSION, BuildConfig
from pipeline.errors import SKIP_REASONS, IngestError
from pipeline.geometry import body_mask, present_values, to_uint8
from pipeline.images.png import decode_png
from pipeline.images.slicing import SliceConfig, cut_images
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.dicom_io import dcmread_safe
from pipeline.ingest.discover import as_filesystem
from pipeline.ingest.read import read_dicom_series, read_nifti
from pipeline.ingest.units import UnitTask
from pipeline.ingest.volume import Volume
from pipeline.labels.dicom import rasterize_rtstruct, read_dicom_seg
from pipeline.labels.nifti import label_names_from_json, read_mask_folder, read_nifti_labels
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
    if task.kind == "nifti":
        return _read_nifti_volume(task, cfg, deid, result)
    try:
        read = read_dicom_series([p for _, p in task.image_files], deid, cfg.read, task.headers)
    except READ_FS_ERRORS:
        for idx, path in task.image_files:
            _record(result, idx, path, IngestError("filesystem"), "quarantined")
        return None
    for pos, err in read.file_errors.items():
        _record(result, *task.image_files[pos], err, "quarantined")
    if read.volume is None:
        for idx, path in task.image_files:
            if idx not in result.files:
                _record(result, idx, path, read.error, "quarantined")
    return read.volume


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
        "deid_key_id": m["deid_key_id"],
    }


def _image_row(task, vol: Volume, img, split: str) -> dict:
    m = vol.meta
    values = [] if img.labels is None else present_values(img.labels)
    return {
        "image_id": image_id(task.unit_key, img.plane, img.slice_index, img.window),
        "unit_key": task.unit_key, "series_key": m["series_key"],
        "patient_key": m["patient_key"], "study_key": m["study_key"], "split": split,
        "modality": vol.modality, "plane": img.plane, "slice_index": int(img.slice_index),
        "window": img.window, "window_min": img.window_min, "window_max": img.window_max,
        "bits": 16 if img.png[24:25] == b"\x10" else 8,
        "height": int(img.height), "width": int(img.width),
        "pixel_to_ras": [float(x) for x in np.asarray(img.pixel_to_ras).ravel()],
        "pixel_spacing_mm": [float(x) for x in img.pixel_spacing_mm],
        "slice_thickness_mm": float(img.slice_thickness_mm),
        "label_values": values, "contrast": m.get("contrast"), "body_part": m.get("body_part"),
        "caption_summary": None, "caption_report": None, "caption_version": None,
        "image": {"bytes": img.png, "path": None},
    }


PLANE_OF_SINGLETON_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}


def _slicing_for(vol: Volume, cfg: SliceConfig) -> SliceConfig:
    """A single-slice (2D) volume is cut in its acquired plane only: the one normal to its
    singleton axis (a sagittal localizer gives one sagittal image, not a line of pixels)."""
    flat = [a for a in range(3) if vol.array.shape[a] == 1]
    if not flat:
        return cfg
    return replace(cfg, planes=(PLANE_OF_SINGLETON_AXIS[flat[-1]],), every_k=1)


def _regions_and_captions(images, result: UnitResult, names, cfg: BuildConfig,
                          clock: _Clock) -> None:
    """Image by image: the labels route's exact regions, the boxes route's prompts (component
    boxes for the segmenter) and, when no model stage follows, the captions.

    Each image's pixels (the array its PNG encodes), body mask and region masks are measured
    once and dropped before the next image, so a unit never holds more than one image's
    masks. Seconds go to the ``regions`` and ``captions`` stages of ``clock``."""
    rcfg = cfg.regions
    describe = not rcfg.uses_models  # else captions follow the model stage (run.shards)
    for img, row in zip(images, result.images, strict=True):
        rows, masks, pixels, body = [], [], None, None
        if img.labels is not None and "labels" in rcfg.routes:
            pixels = img.pixels if img.pixels is not None else decode_png(row)
            body = body_mask(to_uint8(pixels))
            rows = label_regions(row, img.labels, names, rcfg, body=body, masks=masks)
            result.regions += rows
        if img.labels is not None and "boxes" in rcfg.routes:
            prompts = label_prompts(row, img.labels, names, rcfg)
            if prompts:
                result.prompts[row["image_id"]] = prompts
        img.pixels = None
        clock.mark("regions")
        if describe:
            describe_image(row, pixels, rows, cfg.caption_seed, body=body, masks=masks)
            clock.mark("captions")


def process_unit(task: UnitTask, cfg: BuildConfig, deid: Deidentifier) -> UnitResult:
    """Read, de-identify, label and cut one unit. Never raises for bad input."""
    result = UnitResult(task.unit_key)
    clock = _Clock(result.stage_s)
    vol = _read_image_volume(task, cfg, deid, result)
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
    images = cut_images(vol, _slicing_for(vol, cfg.slicing))  # 4D: frame cfg.slicing.frame
    result.images = [_image_row(task, vol, img, split) for img in images]
    clock.mark("cut")
    _regions_and_captions(images, result, vol.label_names, cfg, clock)
    result.series = _series_row(task, vol, label_source, split, len(images))
    for idx, _ in task.image_files:
        result.files.setdefault(idx, ("ingested", "ok", None))
    return result
