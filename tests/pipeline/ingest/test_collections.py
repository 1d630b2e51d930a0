"""pipeline.ingest.collections on tiny replicas of each public layout, written with nibabel."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.ingest.collections import (
    SourceError,
    SourceLayout,
    get_source,
    load_sources,
    merge_masks,
    normalize_modality,
)

SHAPE = (6, 5, 3)


def _nii(path: Path, data: np.ndarray | None = None, dtype=np.int16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype), np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return path


def _labels(values) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    for i, v in enumerate(values):
        lab[i, :, :] = v
    return lab


def _names_on_disk(pair) -> set[int]:
    return {int(v) for p in pair.label_paths for v in np.unique(np.asanyarray(
        nib.load(str(p)).dataobj))} - {0}


def test_registry_has_the_four_layouts():
    sources = load_sources()
    assert set(sources) == {"msd", "nnunet_v2", "totalsegmentator", "brats"}
    for name, layout in sources.items():
        doc = json.loads(layout.path.read_text())  # the file itself, not the parsed object
        assert doc["name"] == name and isinstance(layout, SourceLayout)
        assert layout.title and layout.layout and layout.licence and layout.pairing["kind"]
    assert get_source("brats") == sources["brats"]
    with pytest.raises(SourceError, match="unknown collection"):
        get_source("nope")


def test_registry_rejects_bad_and_duplicate_files(tmp_path):
    good = json.loads((load_sources()["msd"].path).read_text())
    (tmp_path / "a.json").write_text(json.dumps(good))
    (tmp_path / "b.json").write_text(json.dumps(good))
    with pytest.raises(SourceError, match="already used"):
        load_sources(tmp_path)
    (tmp_path / "b.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(SourceError, match="missing keys"):
        load_sources(tmp_path)
    (tmp_path / "b.json").write_text(json.dumps({**good, "name": "y", "pairing": {"kind": "?"}}))
    with pytest.raises(SourceError, match="pairing kind"):
        load_sources(tmp_path)


def test_msd_task(tmp_path):
    root = tmp_path / "Task09_Spleen"
    for case in ("spleen_2", "spleen_10"):
        _nii(root / "imagesTr" / f"{case}.nii.gz")
        _nii(root / "labelsTr" / f"{case}.nii.gz", _labels([0, 1, 1, 0]), np.uint8)
    _nii(root / "imagesTr" / "spleen_99.nii.gz")  # label missing
    (root / "imagesTr" / "._spleen_2.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac junk")
    _nii(root / "imagesTs" / "spleen_5.nii.gz")  # test images are not paired
    (root / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"}, "numTraining": 2,
        "training": [{"image": "./imagesTr/spleen_2.nii.gz",
                      "label": "./labelsTr/spleen_2.nii.gz"}]}))
    layout = get_source("msd")
    pairs = layout.pairs(root)
    assert [p.image_path.name for p in pairs] == ["spleen_10.nii.gz", "spleen_2.nii.gz"]
    for p in pairs:
        img, labels, names, modality = p  # plain 4-tuple
        assert labels == [root / "labelsTr" / img.name]
        assert names == {1: "spleen"} and modality == "CT"
        assert _names_on_disk(p) == set(names)
    assert layout.unpaired(root) == [root / "imagesTr" / "spleen_99.nii.gz"]

    # a multi-channel MR task: one 4D image per case, modality from the channel names
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                   "3": "enhancing tumour"}}))
    pairs = layout.pairs(root)
    assert pairs[0].modality == "MR"
    assert pairs[0].names == {1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}


def test_msd_without_dataset_json_is_explained(tmp_path):
    _nii(tmp_path / "imagesTr" / "a.nii.gz")
    with pytest.raises(SourceError, match="no dataset.json"):
        get_source("msd").pairs(tmp_path)
    with pytest.raises(SourceError, match="not a directory"):
        get_source("msd").pairs(tmp_path / "missing")


def test_nnunet_v2_dataset(tmp_path):
    root = tmp_path / "Dataset005_Prostate"
    for case in ("prostate_00", "prostate_01"):
        for ch in (0, 1):
            _nii(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        _nii(root / "labelsTr" / f"{case}.nii.gz", _labels([0, 1, 2, 0]), np.uint8)
    _nii(root / "imagesTr" / "prostate_02_0000.nii.gz")  # no label
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "PZ": 1, "TZ": 2, "whole": [1, 2]},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    layout = get_source("nnunet_v2")
    pairs = layout.pairs(root)
    assert [p.image_path.name for p in pairs] == [
        "prostate_00_0000.nii.gz", "prostate_00_0001.nii.gz",
        "prostate_01_0000.nii.gz", "prostate_01_0001.nii.gz"]
    for p in pairs:
        case = p.image_path.name.rsplit("_", 1)[0]
        assert p.label_paths == [root / "labelsTr" / f"{case}.nii.gz"]
        assert p.names == {1: "PZ", 2: "TZ"}  # the region-based "whole" entry is skipped
        assert p.modality == "MR"
        assert _names_on_disk(p) == {1, 2}
    assert layout.unpaired(root) == [root / "imagesTr" / "prostate_02_0000.nii.gz"]

    # CT + PET channels and another file ending
    for f in (root / "imagesTr").iterdir():
        f.unlink()
    for f in (root / "labelsTr").iterdir():
        f.unlink()
    _nii(root / "imagesTr" / "lesion_a_0000.nii")
    _nii(root / "imagesTr" / "lesion_a_0001.nii")
    _nii(root / "labelsTr" / "lesion_a.nii", _labels([1]), np.uint8)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "lesion": 1},
        "file_ending": ".nii"}))
    pairs = layout.pairs(root)
    assert [(p.image_path.name, p.modality) for p in pairs] == [
        ("lesion_a_0000.nii", "CT"), ("lesion_a_0001.nii", "PT")]
    assert pairs[0].label_paths == [root / "labelsTr" / "lesion_a.nii"]


def test_totalsegmentator_cases(tmp_path):
    root = tmp_path / "Totalsegmentator_dataset_v201"
    structures = {"spleen": 0, "liver": 1, "aorta": 2, "vertebrae_L1": 3}
    for case in ("s0001", "s0002"):
        _nii(root / case / "ct.nii.gz")
        for name, row in structures.items():
            mask = np.zeros(SHAPE, np.uint8)
            mask[row] = 1
            _nii(root / case / "segmentations" / f"{name}.nii.gz", mask, np.uint8)
    _nii(root / "s0003" / "ct.nii.gz")  # no segmentations folder
    (root / "meta.csv").write_text("image_id;age\ns0001;50\n")
    layout = get_source("totalsegmentator")
    pairs = layout.pairs(root)
    assert [p.image_path for p in pairs] == [root / "s0001" / "ct.nii.gz",
                                            root / "s0002" / "ct.nii.gz"]
    expected = sorted(structures)
    for p in pairs:
        assert [q.name for q in p.label_paths] == [f"{n}.nii.gz" for n in expected]
        assert p.names == {i + 1: n for i, n in enumerate(expected)}
        assert p.modality == "CT"
        merged, affine = merge_masks(p.label_paths)
        assert merged.shape == SHAPE and np.allclose(affine, np.diag([0.8, 0.8, 2.0, 1.0]))
        for value, name in p.names.items():
            assert (merged[structures[name]] == value).all()  # each mask got its value
        assert set(np.unique(merged).tolist()) == {0, *p.names}
    assert layout.unpaired(root) == [root / "s0003" / "ct.nii.gz"]


def test_merge_masks_rejects_mismatched_shapes(tmp_path):
    a = _nii(tmp_path / "a.nii.gz", np.ones(SHAPE), np.uint8)
    b = _nii(tmp_path / "b.nii.gz", np.ones((2, 2, 2)), np.uint8)
    with pytest.raises(SourceError, match="shape"):
        merge_masks([a, b])


def test_brats_cases(tmp_path):
    root = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    for case in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000"):
        for seq in ("t1n", "t1c", "t2w", "t2f"):
            _nii(root / case / f"{case}-{seq}.nii.gz")
        _nii(root / case / f"{case}-seg.nii.gz", _labels([0, 1, 2, 3, 2]), np.uint8)
    unlabelled = "BraTS-GLI-00001-000"  # validation-style case without -seg
    for seq in ("t1n", "t1c", "t2w", "t2f"):
        _nii(root / unlabelled / f"{unlabelled}-{seq}.nii.gz")
    (root / "._BraTS-GLI-00000-000").mkdir()
    layout = get_source("brats")
    pairs = layout.pairs(root)
    assert len(pairs) == 8
    for p in pairs:
        case = p.image_path.parent.name
        assert p.image_path.name.startswith(case + "-")
        assert p.label_paths == [root / case / f"{case}-seg.nii.gz"]
        assert p.names == {1: "NCR", 2: "ED", 3: "ET"} and p.modality == "MR"
        assert _names_on_disk(p) == {1, 2, 3}
    assert {p.image_path.name.split("-")[-1] for p in pairs} == {
        "t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"}
    assert len(layout.unpaired(root)) == 4
    assert all(p.parent.name == unlabelled for p in layout.unpaired(root))


@pytest.mark.parametrize("text, want", [
    ("CT", "CT"), ("ct", "CT"), ("T2", "MR"), ("FLAIR", "MR"), ("ADC", "MR"), ("MRI", "MR"),
    ("T1w", "MR"), ("PET", "PT"), ("noNorm", None), ("", None), (None, None)])
def test_normalize_modality(text, want):
    assert normalize_modality(text) == want
