"""Captions of projection images (CR, DX, ...): no invented mm, no guessed side, the position
in the image, the view in the summary; the caption checker re-derives all of it.

A chest-like CR image (300 rows × 200 columns, no IOP/IPP) with a label map (two lungs and a
nodule) is built three ways: with PatientOrientation ["L", "F"] and no pixel spacing; without
PatientOrientation; with PixelSpacing. The nodule sits in the upper right of the stored image,
which is the patient's left when the columns run to the patient's Left.
"""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.captions.check import verify_captions
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.read import ReadConfig, read_volume
from pipeline.write import committed_tables

CR = "1.2.840.10008.5.1.4.1.1.1"
ROWS, COLS = 300, 200
NODULE = (slice(60, 82), slice(128, 150))  # stored rows, columns: upper right of the image


def chest() -> tuple[np.ndarray, np.ndarray]:
    """(stored pixels uint16, stored label map int): body, two lungs, one nodule."""
    px = np.full((ROWS, COLS), 100, np.uint16)
    lab = np.zeros((ROWS, COLS), np.int32)
    px[20:280, 20:180] = 2000
    px[40:240, 35:95] = 900
    lab[40:240, 35:95] = 2  # image left
    px[40:240, 105:165] = 900
    lab[40:240, 105:165] = 1  # image right
    px[NODULE] = 2600
    lab[NODULE] = 3
    return px, lab


def cr_dataset(series: str, **tags) -> Dataset:
    px, _ = chest()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.file_meta.MediaStorageSOPInstanceUID = series + ".1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CR, series + ".1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series
    ds.Modality, ds.StudyDate, ds.BurnedInAnnotation = "CR", "20200102", "NO"
    ds.PatientName, ds.PatientID = "CANARYNAME^ALICE", "CANARYPID777"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def write_case(src, name: str, series: str, names: dict, **tags) -> None:
    """src/name/img.dcm + src/name_seg.nii.gz (on the volume's canonical grid) + names."""
    folder = src / name
    folder.mkdir(parents=True)
    cr_dataset(series, **tags).save_as(folder / "img.dcm", enforce_file_format=True)
    vol = read_volume(folder, Deidentifier(b"x" * 16), ReadConfig())
    _, lab = chest()
    canonical = lab.T[::-1, ::-1][:, :, None]  # display image = canonical[::-1, ::-1].T
    assert canonical.shape == vol.array.shape[:3]
    nib.save(nib.Nifti1Image(canonical.astype(np.int16), vol.affine), src / f"{name}_seg.nii.gz")
    (src / f"{name}_seg.json").write_text(json.dumps(names))


NAMES_LF = {"1": "lung_left", "2": "lung_right", "3": "lung_nodule"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from workflows.build_corpus import main

    root = tmp_path_factory.mktemp("projection")
    src = root / "src"
    write_case(src, "oriented", "1.2.3.4.1", NAMES_LF, PatientOrientation=["L", "F"],
               ViewPosition="PA", BodyPartExamined="CHEST")
    write_case(src, "unoriented", "1.2.3.4.2", NAMES_LF, ViewPosition="PA")
    write_case(src, "spaced", "1.2.3.4.3", NAMES_LF, PixelSpacing=[0.5, 0.5],
               PatientOrientation=["L", "F"])
    write_case(src, "hand", "1.2.3.4.4", NAMES_LF, PatientOrientation=["L", "F"],
               BodyPartExamined="HAND")
    write_case(src, "mammo", "1.2.3.4.5", NAMES_LF, Modality="MG", PatientOrientation=["P", "L"])
    write_case(src, "mammo_left", "1.2.3.4.6", NAMES_LF, Modality="MG", ImageLaterality="L",
               PatientOrientation=["A", "R"], ViewPosition="CC", BodyPartExamined="BREAST")
    window = dict(ViewPosition="AP", VOILUTFunction="LINEAR_EXACT", WindowWidth=3000)
    write_case(src, "mono2", "1.2.3.4.7", NAMES_LF, WindowCenter=1500, **window)
    write_case(src, "mono1", "1.2.3.4.8", NAMES_LF, WindowCenter=4095 - 1500,
               PhotometricInterpretation="MONOCHROME1",
               PixelData=(4095 - chest()[0]).astype(np.uint16).tobytes(), **window)
    assert main([str(src), "--out", str(root / "corpus"), "--every-k", "0"]) == 0
    return root / "corpus"


def _rows(corpus) -> tuple[list, list, list]:
    series, images, regions = [], [], []
    for files in committed_tables(corpus).values():
        for name, out in (("series", series), ("images", images), ("regions", regions)):
            if name in files:
                out += pq.read_table(files[name]).to_pylist()
    return series, images, regions


def _case(corpus, view=None, orientation=None, spacing=False, modality="CR", part=None,
          laterality=None, mono1=False):
    series, images, regions = _rows(corpus)
    (s,) = [s for s in series if s["patient_orientation"] == orientation
            and s["spacing_known"] is spacing and s["view_position"] == view
            and s["modality"] == modality and s["body_part"] == part
            and s["image_laterality"] == laterality and s["inverted_monochrome1"] is mono1]
    (img,) = [i for i in images if i["series_key"] == s["series_key"]]
    regs = {r["label"]: r for r in regions if r["image_id"] == img["image_id"]}
    return s, img, regs


def _texts(img, regs) -> list[str]:
    out = [img["caption_summary"], img["caption_report"]]
    for r in regs.values():
        out += [r["caption_region"], *r["negatives"]]
    return out


def test_checker_agrees_on_projection_images(corpus):
    report = verify_captions(corpus)
    assert report["ok"], report["problems"][:3]
    assert report["regions"] == 24 and report["images"] == 8
    assert report["caption_agreement"] == report["image_caption_agreement"] == 1.0


def test_no_mm_without_a_pixel_spacing(corpus):
    s, img, regs = _case(corpus, "PA", ["L", "F"], part="CHEST")
    assert s["projection"] is True and s["spacing_known"] is False
    for text in _texts(img, regs):
        assert not re.search(r"\bmm\b", text), text
    assert all(r["attributes"]["max_diameter_mm"] is None for r in regs.values())


def test_side_from_patient_orientation_and_position_in_the_image(corpus):
    _, img, regs = _case(corpus, "PA", ["L", "F"], part="CHEST")
    a = regs["lung_nodule"]["attributes"]
    assert (a["laterality"], a["image_position"]) == ("left", "upper right")
    assert "upper right part of the image" in regs["lung_nodule"]["caption_region"]
    assert "on the left" in regs["lung_nodule"]["caption_region"]
    assert img["caption_summary"].startswith("Frontal (PA) chest radiograph")


def test_no_side_without_patient_orientation(corpus):
    _, img, regs = _case(corpus, "PA", None)
    nodule = regs["lung_nodule"]
    assert nodule["attributes"]["laterality"] is None
    assert "laterality" not in nodule["negative_kinds"]
    for text in [nodule["caption_region"], *nodule["negatives"], img["caption_summary"]]:
        assert "on the left" not in text and "on the right" not in text, text
    # no BodyPartExamined: the summary names no body part
    assert img["caption_summary"].startswith("Frontal (PA) radiograph")


def test_mm_with_a_pixel_spacing(corpus):
    _, img, regs = _case(corpus, None, ["L", "F"], spacing=True)
    a = regs["lung_nodule"]["attributes"]
    assert a["max_diameter_mm"] == pytest.approx(0.5 * np.hypot(21, 21), rel=0.1)
    assert re.search(r"\b\d+ mm\b", regs["lung_nodule"]["caption_region"])
    assert img["caption_summary"].startswith("Radiograph")


def test_no_midline_side_on_one_sided_images(corpus):
    """A hand or a breast does not span the patient's midline: PatientOrientation gives no
    side there; a mammogram's ImageLaterality gives its side to every region."""
    for case in (dict(part="HAND"), dict(modality="MG", orientation=["P", "L"])):
        _, _, regs = _case(corpus, orientation=case.pop("orientation", ["L", "F"]), **case)
        assert {r["attributes"]["laterality"] for r in regs.values()} == {None}, case
    _, img, regs = _case(corpus, "CC", ["A", "R"], modality="MG", part="BREAST",
                         laterality="L")
    assert regs["lung_nodule"]["attributes"]["laterality"] == "left"
    assert img["caption_summary"].startswith("Craniocaudal (CC) breast mammogram")


def test_header_window_through_the_build_monochrome1_as_monochrome2(corpus):
    """The same anatomy as MONOCHROME2 and as MONOCHROME1 (inverted values, inverted window)
    gives the same PNG, window and captions through the whole build."""
    s2, img2, regs2 = _case(corpus, "AP")
    s1, img1, regs1 = _case(corpus, "AP", mono1=True)
    assert s2["voi_source"] == s1["voi_source"] == "window"
    assert img2["window"] == img1["window"] == "header"
    assert img2["image"]["bytes"] == img1["image"]["bytes"]
    # header 2595 ∓ 1500 on the stored values; inverted (v → 0 + 4095 − v): 0 .. 3000
    assert (img1["window_min"], img1["window_max"]) == (img2["window_min"], img2["window_max"])
    assert (img1["window_min"], img1["window_max"]) == (0.0, 3000.0)
    assert {k: r["attributes"] for k, r in regs2.items()} == {
        k: r["attributes"] for k, r in regs1.items()}  # the template is drawn per region id


def _tamper(corpus, tmp_path, table, edit):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    for files in committed_tables(copy).values():
        if table in files:
            path = files[table]
            rows = pq.read_table(path).to_pylist()
            edit(rows)
            pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    return verify_captions(copy)


def test_wrong_position_in_the_image_is_caught(corpus, tmp_path):
    def edit(rows):
        for r in rows:
            r["caption_region"] = r["caption_region"].replace("upper right", "lower left")

    report = _tamper(corpus, tmp_path, "regions", edit)
    assert not report["ok"] and report["problems"][0]["what"] == "caption"


def test_a_side_the_header_does_not_give_is_caught(corpus, tmp_path):
    """The checker reads PatientOrientation from the series table: drop it and the stored
    sides no longer follow from the data."""
    def edit(rows):
        for r in rows:
            r["patient_orientation"] = None

    report = _tamper(corpus, tmp_path, "series", edit)
    assert not report["ok"]
    assert {p["what"] for p in report["problems"]} & {"attributes", "caption"}
