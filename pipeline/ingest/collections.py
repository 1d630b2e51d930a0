"""Known public collection layouts: how their image files pair with their label files.

Each ``pipeline/ingest/layouts/<name>.json`` describes one layout::

    name        registry key (e.g. "msd", "nnunet_v2", "totalsegmentator", "brats")
    title       human name
    layout      prose description of the folder layout
    pairing     {"kind": ..., glob patterns and templates}; kinds:
                image_label_dirs  images glob; label template "{image_name}" (MSD)
                channels          images glob with {file_ending}; case_pattern regex with
                                  (?P<case>) and (?P<channel>); label template "{case}"
                                  (nnU-Net v2: one pair per channel)
                mask_folder       case folders; image template; masks glob: one binary mask per
                                  structure, merged into one label map (TotalSegmentator)
                case_sequences    case folders; one image per sequence; one label (BraTS)
                "ignore": fnmatch patterns of names to skip (e.g. macOS "._*" files)
    labels      {"from": "dataset.json", "key", "format": value_to_name|name_to_value}
                | {"from": "mask_stems"} | {"values": {"1": "NCR", ...}}
    modality    {"value": "CT"} | {"from": "dataset.json", "key", "per_channel": bool}
    licence     licence / terms note; url

``load_sources()`` reads them all; ``SourceLayout.pairs(root)`` lists
``SourcePair(image_path, label_paths, names, modality)`` where ``names`` maps label value →
name (background 0 left out) and ``modality`` is "CT", "MR", "PT" or None (unknown: let the
intensity heuristic decide). For ``mask_folder`` layouts ``label_paths`` holds one binary mask
per structure, sorted by file stem; mask i gets value i + 1 (:func:`merge_masks`).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

SOURCES_DIR = Path(__file__).with_name("layouts")
KINDS = ("image_label_dirs", "channels", "mask_folder", "case_sequences")
REQUIRED = ("name", "title", "layout", "pairing", "labels", "modality", "licence")
MR_PREFIXES = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "SWI", "DCE", "HBV", "B0")


class SourceError(ValueError):
    """A layout description is invalid, or a folder does not follow it."""


class SourcePair(NamedTuple):
    image_path: Path
    label_paths: list[Path]
    names: dict[int, str]
    modality: str | None


def normalize_modality(text: str | None) -> str | None:
    """Map a collection's channel/modality name to a DICOM-style modality: CT, MR, PT or
    None (unknown)."""
    if not text:
        return None
    t = str(text).strip().upper()
    if t.startswith("CT"):
        return "CT"
    if t in ("PET", "PT") or t.startswith("PET"):
        return "PT"
    if t.startswith(MR_PREFIXES):
        return "MR"
    return None


def nifti_stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _utf8(text: str) -> bool:
    """False for a name that is not valid UTF-8 on disk (``os`` decoded it with
    surrogateescape): such a name cannot be a label name (its value is called label_<i>)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def merge_masks(label_paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-structure binary masks into one label map (uint16): mask i → value i + 1,
    later masks win where they overlap. Returns (label map, affine of the first mask). Raises
    SourceError when shapes differ."""
    import nibabel as nib

    if not label_paths:
        raise SourceError("no masks to merge")
    out, affine = None, None
    for value, path in enumerate(label_paths, start=1):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        if out is None:
            out, affine = np.zeros(data.shape, np.uint16), img.affine
        elif data.shape != out.shape:
            raise SourceError("a mask's shape differs from the first mask's")
        out[data > 0] = value
    return out, affine


@dataclass(frozen=True)
class SourceLayout:
    name: str
    title: str
    layout: str
    pairing: dict
    labels: dict
    modality: dict
    licence: str
    url: str | None = None
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, path: str | Path) -> SourceLayout:
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SourceError(f"{path}: {e}") from None
        missing = [k for k in REQUIRED if k not in spec]
        if missing:
            raise SourceError(f"{path}: missing keys {missing}")
        if spec["pairing"].get("kind") not in KINDS:
            raise SourceError(f"{path}: pairing kind must be one of {KINDS}")
        return cls(**{k: spec[k] for k in REQUIRED}, url=spec.get("url"), path=path)

    # -- public ------------------------------------------------------------------------------

    def pairs(self, root: str | Path) -> list[SourcePair]:
        """(image, labels, names, modality) for every labelled image under ``root``, sorted
        by image path."""
        return self._scan(Path(root))[0]

    def unpaired(self, root: str | Path) -> list[Path]:
        """Images the layout expects a label for but whose label file is missing."""
        return self._scan(Path(root))[1]

    # -- internals ---------------------------------------------------------------------------

    def _ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, pat) for pat in self.pairing.get("ignore", []))

    def _dataset_json(self, root: Path, spec: dict) -> dict:
        path = root / spec["from"]
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise SourceError(f"{root}: no {spec['from']} (not a {self.title} folder?)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise SourceError(f"{path}: {e}") from None

    def _names(self, root: Path, mask_paths: list[Path] | None = None) -> dict[int, str]:
        spec = self.labels
        if "values" in spec:
            return {int(k): str(v) for k, v in spec["values"].items() if int(k) != 0}
        if spec.get("from") == "mask_stems":
            stems = {i: nifti_stem(p) for i, p in enumerate(mask_paths or [], start=1)}
            return {i: stem for i, stem in stems.items() if _utf8(stem)}
        raw = self._dataset_json(root, spec).get(spec["key"], {})
        names = {}
        if spec.get("format") == "name_to_value":
            for name, value in raw.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    names[value] = str(name)  # lists are nnU-Net region-based entries
        else:
            for value, name in raw.items():
                names[int(value)] = str(name)
        names.pop(0, None)
        return dict(sorted(names.items()))

    def _modality(self, root: Path, channel: str | None = None) -> str | None:
        spec = self.modality
        if "value" in spec:
            return normalize_modality(spec["value"])
        raw = self._dataset_json(root, spec).get(spec["key"], {})
        if not isinstance(raw, dict):
            return normalize_modality(raw)
        if spec.get("per_channel") and channel is not None:
            return normalize_modality(raw.get(str(int(channel))) or raw.get(channel))
        kinds = {normalize_modality(v) for v in raw.values()}
        return kinds.pop() if len(kinds) == 1 else None

    def _glob(self, root: Path, pattern: str) -> list[Path]:
        return sorted(p for p in root.glob(pattern) if p.is_file() and not self._ignored(p.name))

    def _cases(self, root: Path) -> list[Path]:
        return sorted(p for p in root.glob(self.pairing.get("cases", "*"))
                      if p.is_dir() and not self._ignored(p.name))

    def _scan(self, root: Path) -> tuple[list[SourcePair], list[Path]]:
        if not root.is_dir():
            raise SourceError(f"{root}: not a directory")
        kind = self.pairing["kind"]
        pairs, unpaired = [], []
        if kind == "image_label_dirs":
            names, modality = self._names(root), self._modality(root)
            for img in self._glob(root, self.pairing["images"]):
                label = root / self.pairing["label"].format(image_name=img.name,
                                                           case=nifti_stem(img))
                if label.is_file():
                    pairs.append(SourcePair(img, [label], names, modality))
                else:
                    unpaired.append(img)
        elif kind == "channels":
            ending = self._file_ending(root)
            names = self._names(root)
            pattern = re.compile(self.pairing["case_pattern"])
            for img in self._glob(root, self.pairing["images"].format(file_ending=ending)):
                m = pattern.match(img.name[: -len(ending)]) if img.name.endswith(ending) else None
                if not m:
                    continue
                label = root / self.pairing["label"].format(case=m["case"], file_ending=ending)
                if label.is_file():
                    pairs.append(SourcePair(img, [label], names,
                                            self._modality(root, m["channel"])))
                else:
                    unpaired.append(img)
        elif kind == "mask_folder":
            modality = self._modality(root)
            for case in self._cases(root):
                img = root / self.pairing["image"].format(case=case.name)
                if not img.is_file():
                    continue
                masks = sorted(self._glob(root, self.pairing["masks"].format(case=case.name)),
                               key=nifti_stem)
                if masks:
                    pairs.append(SourcePair(img, masks, self._names(root, masks), modality))
                else:
                    unpaired.append(img)
        elif kind == "case_sequences":
            names, modality = self._names(root), self._modality(root)
            for case in self._cases(root):
                label = root / self.pairing["label"].format(case=case.name)
                for seq in self.pairing["sequences"]:
                    img = root / self.pairing["image"].format(case=case.name, sequence=seq)
                    if not img.is_file():
                        continue
                    if label.is_file():
                        pairs.append(SourcePair(img, [label], names, modality))
                    else:
                        unpaired.append(img)
        return sorted(pairs, key=lambda p: str(p.image_path)), sorted(unpaired)

    def _file_ending(self, root: Path) -> str:
        spec = self.pairing.get("file_ending", ".nii.gz")
        if isinstance(spec, str):
            return spec
        if (root / spec["from"]).is_file():
            return str(self._dataset_json(root, spec).get(spec["key"]) or spec.get("default"))
        return spec.get("default", ".nii.gz")


def load_sources(folder: str | Path = SOURCES_DIR) -> dict[str, SourceLayout]:
    """Every ``*.json`` layout in ``folder``, by name (sorted). Raises SourceError on an
    invalid file or a repeated name."""
    out: dict[str, SourceLayout] = {}
    for path in sorted(Path(folder).glob("*.json")):
        layout = SourceLayout.from_json(path)
        if layout.name in out:
            raise SourceError(f"{path}: name {layout.name!r} already used by "
                              f"{out[layout.name].path}")
        out[layout.name] = layout
    return out


def get_source(name: str) -> SourceLayout:
    sources = load_sources()
    if name not in sources:
        raise SourceError(f"unknown collection {name!r}; known: {', '.join(sources)}")
    return sources[name]
