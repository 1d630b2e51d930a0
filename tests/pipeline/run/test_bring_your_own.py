"""build-corpus with annotation tables and reports, end to end on written DICOM files.

Boxes and masks drawn on stored frames must land on the drawn pixels of the stored PNG after
every transform (MONOCHROME1, a non-square matrix, resizing, flips to display orientation);
the report's PHI must never reach an output byte or the console; report sentences ground
region captions only where they name the region, and negated findings never do.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from factories import PHI, ct_slice
from label_factories import Series, contour, make_rtstruct, square
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.captions.check import verify_captions
from pipeline.captions.grounded import check_grounded
from workflows.build_corpus import main


def _table(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / name).to_pylist()


def _png(image_row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_row["image"]["bytes"])))


def _drawn_box(png: np.ndarray, bright: bool = True) -> list[float]:
    """XYXY edge box of the drawn rectangle, found in the PNG alone (threshold at mid-grey)."""
    mask = png > 127 if bright else png < 127
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def write_cr(path: Path, rows=300, cols=200, box=(40, 100, 90, 160), monochrome1=True,
             **tags) -> str:
    """A CR radiograph (no patient geometry) with a rectangle drawn at ``box`` (XYXY edge
    pixels of the stored frame): MONOCHROME1, so the rectangle is stored dark and shows
    bright. Returns its SOPInstanceUID."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(3000, 3400, (rows, cols)).astype(np.uint16)  # dark in MONOCHROME1
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = rng.integers(100, 200, (y1 - y0, x1 - x0))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop = generate_uid(entropy_srcs=[str(path)])
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, sop
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", str(path)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", str(path)])
    ds.Modality, ds.StudyDate, ds.BodyPartExamined = "CR", "20200102", "CHEST"
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return sop


def _vindr(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max",
                    "y_max"])
        w.writerows(rows)
    return path


@pytest.mark.parametrize("roi", ["labels", "boxes"])
def test_box_lands_on_the_drawn_pixels_through_monochrome1_nonsquare_and_resize(tmp_path, roi):
    """The box itself (``--roi labels``) or LiteMedSAM's mask inside it (``--roi boxes``)."""
    src = tmp_path / "src" / "cxr"
    src.mkdir(parents=True)
    write_cr(src / "img001.dcm", box=(40, 100, 90, 160))
    write_cr(src / "img002.dcm", box=(120, 30, 180, 70))  # listed as "No finding" below
    table = _vindr(tmp_path / "boxes.csv", [
        ("img001", "Nodule/Mass", 8, "R8", 40, 100, 90, 160),
        ("img002", "No finding", 14, "R8", "", "", "", ""),
        ("img999", "Nodule/Mass", 8, "R8", 1, 1, 5, 5),  # names no file: counted, not silent
    ])
    out = tmp_path / "out"
    assert main([str(src.parent), "--out", str(out), "--max-side", "128", "--workers", "1",
                 "--roi", roi, "--device", "cpu",
                 "--annotations", str(table), "--annotations-format", "vindr"]) == 0
    images = {im["image_id"]: im for im in _table(out, "images")}
    regions = [r for r in _table(out, "regions") if r["source"] == "annotation"]
    assert len(regions) == 1
    r = regions[0]
    im = images[r["image_id"]]
    assert max(im["height"], im["width"]) == 128 and im["height"] != im["width"]
    drawn = _drawn_box(_png(im))
    assert np.allclose(r["annotation_box"], drawn, atol=1.0), (r["annotation_box"], drawn)
    assert np.allclose(r["bbox"], r["annotation_box"])
    from pipeline.geometry import decode_rle

    mask, bright = decode_rle(r["mask_rle"]), _png(im) > 127
    assert (mask & bright).sum() / mask.sum() > 0.9 and (bright & ~mask).sum() < 0.1 * bright.sum()
    assert r["segmenter"] == ("box" if roi == "labels" else "lite-medsam")
    assert r["caption_region"] and r["caption_provenance"] == "template"
    assert r["label"] == "nodule_mass" or r["label"].startswith(("nodule", "mass"))
    assert r["source_label"] == "Nodule/Mass"
    assert sorted(im["annotation_status"] for im in images.values()) == ["findings", "no_finding"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["annotations"]["annotation_unmatched"] == 1
    assert manifest["annotations"]["annotated_files"] == 2


def _siim_rle(mask: np.ndarray) -> str:
    """SIIM-ACR's encoding: (start, length) runs over the column-major pixels, each start
    relative to the end of the previous run."""
    flat = np.concatenate([[0], mask.T.ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[::2], edges[1::2]
    out, prev = [], 0
    for s, e in zip(starts, ends, strict=True):
        out += [int(s - prev), int(e - s)]
        prev = e
    return " ".join(map(str, out))


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, -1, 0), (0, 1, 0, 1, 0, 0)],
                         ids=["standard", "flipped", "transposed"])
def test_sop_keyed_mask_lands_on_the_drawn_slice_and_pixels(tmp_path, iop):
    """A CT series in three stored orientations; a SIIM-format mask keyed by one slice's
    SOPInstanceUID lands on that slice's image, on the pixels drawn there; that slice is cut
    although --every-k (4) would not cut it."""
    src = tmp_path / "src" / "ct"
    src.mkdir(parents=True)
    rows, cols, drawn_k = 40, 32, 2
    draw = np.zeros((rows, cols), bool)
    draw[10:18, 5:20] = True  # stored rows 10..17, cols 5..19
    normal = np.cross(iop[:3], iop[3:])
    sops = []
    for k in range(4):
        plane = np.full((rows, cols), -500, np.int16)
        if k == drawn_k:
            plane[draw] = 300
        ds = ct_slice(plane, np.array([-10.0, -20.0, 30.0]) + 2.5 * k * normal, iop,
                      spacing=(0.8, 0.8), instance=k + 1)
        ds.save_as(src / f"IM{k}.dcm", enforce_file_format=True)
        sops.append(str(ds.SOPInstanceUID))
    table = tmp_path / "masks.csv"
    table.write_text("ImageId, EncodedPixels\n"
                     f"{sops[drawn_k]}, {_siim_rle(draw)}\n{sops[0]}, -1\n")
    out = tmp_path / "out"
    assert main([str(src.parent), "--out", str(out), "--workers", "1",  # --every-k 4:
                 "--annotations", str(table), "--annotations-format", "siim"]) == 0  # k=2 too
    images = {im["image_id"]: im for im in _table(out, "images")}
    regions = [r for r in _table(out, "regions") if r["source"] == "annotation"]
    assert len(regions) == 1
    im = images[regions[0]["image_id"]]
    png = _png(im)
    bright = png > 127  # soft-tissue window: 300 HU is white, −500 HU black
    from pipeline.geometry import decode_rle

    mask = decode_rle(regions[0]["mask_rle"])
    assert mask.sum() == draw.sum() and np.array_equal(mask, bright)
    others = [i for i in images.values() if i["image_id"] != im["image_id"]]
    assert all(not (_png(i) > 127).any() for i in others)  # the drawn slice only


def write_labelled_ct(folder: Path, study_uid: str, **tags) -> None:
    """A 3-slice CT with an RTSTRUCT outlining the liver (a square) on the middle slice."""
    geo = Series((1, 0, 0, 0, 1, 0), (-10.0, -20.0, 30.0), (0.8, 0.7), (0, 0, 2.5), 20, 24, 3)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(3):
        plane = rng.integers(-100, 100, (24, 20)).astype(np.int16)
        ds = ct_slice(plane, geo.ipp(k), spacing=(0.8, 0.7), series_uid=study_uid + ".9",
                      instance=k + 1, study_uid=study_uid, **tags)
        ds.save_as(folder / f"IM{k}.dcm", enforce_file_format=True)
    make_rtstruct(folder / "rt.dcm", geo, [(1, "Liver", [contour(square(geo, 4, 14, 4, 18, 1))])],
                  study_uid + ".9")


REPORT_CANARIES = {
    "name": "Alice Canaryname",  # the patient's own DICOM name (CANARYNAME^ALICE), reordered
    "mrn": "MRN 4417723",
    "phone": "(317) 555-0142",
    "date": "03/14/2019",
    "address": "1420 Elmwood Avenue",
    "email": "alice.canary@example.org",
    "doctor": "Dr. Zebulon Quillfeather",
}


def _reports_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "report"])
        w.writerows(rows)
    return path


def test_report_phi_never_reaches_outputs_or_logs(tmp_path, capfd):
    src = tmp_path / "src"
    write_labelled_ct(src / "ct", "1.2.3.4.77")
    c = REPORT_CANARIES
    text = (f"INDICATION: {c['name']}, {c['mrn']}, seen {c['date']}.\n"
            f"FINDINGS: Patient {c['name']} of {c['address']}, phone {c['phone']}, "
            f"e-mail {c['email']}. The liver is enlarged. {PHI['PatientID']} reviewed by "
            f"{c['doctor']} on {c['date']}. No pleural effusion.\n"
            f"IMPRESSION: Hepatomegaly. Call {c['phone']}. Canaryname Alice.")
    table = _reports_csv(tmp_path / "reports.csv", [("1.2.3.4.77", text)])
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--workers", "1", "--reports", str(table),
                 "--reports-key", "study:StudyInstanceUID", "--reports-text", "report"]) == 0
    logs = "".join(capfd.readouterr())
    texts = [logs] + [p.name for p in out.rglob("*")]
    for p in out.rglob("*"):
        if p.is_file():
            texts.append(p.read_bytes().decode("latin-1"))
            if p.suffix == ".parquet":
                texts.append(repr(pq.read_table(p).to_pylist()))
    blob = "\n".join(texts).upper()
    canaries = [*c.values(), "CANARYNAME", "ALICE", "4417723", "555-0142", "ELMWOOD",
                "QUILLFEATHER", "ZEBULON", PHI["PatientID"], "2019"]
    leaked = [x for x in canaries if x.upper() in blob]
    assert not leaked, f"report PHI reached the outputs: {leaked}"
    images = _table(out, "images")
    assert {im["caption_report_source"] for im in images} == {"report"}
    assert all("enlarged" in im["caption_report"] for im in images)  # the prose survives


def test_report_sentences_ground_region_captions_and_negations_never_do(tmp_path):
    src = tmp_path / "src"
    write_labelled_ct(src / "with", "1.2.3.4.78")
    write_labelled_ct(src / "without", "1.2.3.4.79")
    text = ("FINDINGS: No liver lesion is seen. The liver is enlarged. There is no pleural "
            "effusion.\nIMPRESSION: Hepatomegaly.")
    table = _reports_csv(tmp_path / "reports.csv", [("1.2.3.4.78", text)])
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--workers", "1", "--reports", str(table),
                 "--reports-key", "study:StudyInstanceUID", "--reports-text", "report"]) == 0
    images = {im["image_id"]: im for im in _table(out, "images")}
    regions = _table(out, "regions")
    grounded = [r for r in regions if r["caption_provenance"] == "report+template"]
    plain = [r for r in regions if r["caption_provenance"] == "template"]
    assert grounded and plain  # the study with a report, the one without
    for r in grounded:
        assert r["label"] == "liver"
        assert r["caption_region"].startswith("The liver is enlarged.")
        assert "no liver lesion" not in r["caption_region"].lower()
        assert check_grounded(images[r["image_id"]], r) is None
        kinds = dict(zip(r["negatives"], r["negative_kinds"], strict=True))
        assert any(k == "report_negated" and n.startswith("Pleural effusion")
                   for n, k in kinds.items())
        assert all(n.startswith("The liver is enlarged.") for n, k in kinds.items()
                   if k != "report_negated")  # the caption's form: no text-only cue
    assert all("enlarged" not in r["caption_region"] for r in plain)
    assert {images[r["image_id"]]["caption_report_source"] for r in plain} == {"template"}
    checked = verify_captions(out, blind_threshold=None)  # the whole corpus, re-derived
    assert checked["problems"] == [] and checked["caption_agreement"] == 1.0
    assert checked["negative_contradiction"] == 1.0 and checked["image_caption_agreement"] == 1.0
    # the checker notices a caption that does not hold
    r = dict(grounded[0], caption_region="There is no pleural effusion. " +
             grounded[0]["caption_region"])
    assert check_grounded(images[r["image_id"]], r) == "sentence"


# ------------------------------------------------------------------ the real tables, end to end

def _txv_data(name: str) -> Path:
    """A table torchxrayvision ships (licensed for tests only; read in place, never copied),
    found without importing the package (its ``__init__`` imports torch and its own ``model``
    modules, which this repository's ``model`` package shadows)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision (a test dependency) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def write_dx(path: Path, rows: int, cols: int, boxes=(), mask=None, sop: str | None = None):
    """A DX image (MONOCHROME2, no geometry) with ``boxes`` (XYXY edge, rounded) and ``mask``
    drawn bright on a dark, noisy background."""
    rng = np.random.default_rng(len(path.name))
    pixels = rng.integers(200, 600, (rows, cols)).astype(np.uint16)
    for x0, y0, x1, y1 in boxes:
        pixels[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = 3900
    if mask is not None:
        pixels[mask] = 3900
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop = sop or generate_uid(entropy_srcs=[path.name])
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, sop
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", path.name])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", path.name])
    ds.Modality, ds.StudyDate = "DX", "20200102"
    ds.PatientID = "P" + path.stem[:12]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _decode_siim(counts: str, rows: int, cols: int) -> np.ndarray:
    """An independent SIIM decoder for the test (relative starts, column-major)."""
    flat = np.zeros(rows * cols, bool)
    values = [int(v) for v in counts.split()]
    pos = 0
    for start, length in zip(values[::2], values[1::2], strict=True):
        pos += start
        flat[pos:pos + length] = True
        pos += length
    return flat.reshape(cols, rows).T


def _real_samples(tmp: Path) -> tuple[list[str], dict]:
    """Two images with findings and one without from each real table (independently parsed
    with pandas), written as DICOM files named as each table keys them. Returns the build's
    --annotations arguments and, per file stem, the boxes / mask drawn."""
    import pandas as pd

    src = tmp / "src"
    src.mkdir()
    args, drawn = [], {}
    # NIH ChestX-ray14: "Image Index" (stem of a .png), XYWH in 1024² pixels
    nih = pd.read_csv(_txv_data("BBox_List_2017.csv.gz")).iloc[:, :6]
    nih.columns = ["image", "label", "x", "y", "w", "h"]
    for stem, g in list(nih.groupby("image"))[:2]:
        boxes = [(r.x, r.y, r.x + r.w, r.y + r.h) for r in g.itertuples()]
        write_dx(src / (Path(stem).stem + ".dcm"), 1024, 1024, boxes)
        drawn[Path(stem).stem] = boxes
    args += ["--annotations", str(_txv_data("BBox_List_2017.csv.gz")),
             "--annotations-format", "nih"]
    # VinDr-CXR: image_id stem, XYXY per radiologist (fused by WBF)
    vin = pd.read_csv(_txv_data("vinbigdata-train.csv.gz"))
    found = vin[vin.class_name != "No finding"]
    for stem, g in list(found.groupby("image_id"))[:2]:
        boxes = [(r.x_min, r.y_min, r.x_max, r.y_max) for r in g.itertuples()]
        rows, cols = int(g.y_max.max()) + 64, int(g.x_max.max()) + 64
        write_dx(src / f"{stem}.dcm", rows, cols, boxes)
        drawn[stem] = boxes
    empty = vin[vin.class_name == "No finding"].image_id.iloc[0]
    write_dx(src / f"{empty}.dcm", 512, 400)
    drawn[empty] = []
    args += ["--annotations", str(_txv_data("vinbigdata-train.csv.gz")),
             "--annotations-format", "vindr"]
    # RSNA Pneumonia: patientId stem, XYWH, Target 1
    import zipfile

    with zipfile.ZipFile(_txv_data("kaggle_stage_2_train_labels.csv.zip")) as z:
        rsna = pd.read_csv(z.open(z.namelist()[0]))
    for stem, g in list(rsna[rsna.Target == 1].groupby("patientId"))[:2]:
        boxes = [(r.x, r.y, r.x + r.width, r.y + r.height) for r in g.itertuples()]
        write_dx(src / f"{stem}.dcm", 1024, 1024, boxes)
        drawn[stem] = boxes
    args += ["--annotations", str(_txv_data("kaggle_stage_2_train_labels.csv.zip")),
             "--annotations-format", "rsna"]
    # SIIM-ACR: ImageId = SOPInstanceUID, SIIM RLE masks on 1024²
    siim = pd.read_csv(_txv_data("siim-pneumothorax-train-rle.csv.gz"))
    siim.columns = ["uid", "rle"]
    siim = siim[siim.rle.str.strip() != "-1"]
    for uid, g in list(siim.groupby("uid"))[:2]:
        mask = np.zeros((1024, 1024), bool)
        for counts in g.rle:
            mask |= _decode_siim(counts, 1024, 1024)
        write_dx(src / f"siim_{len(drawn)}.dcm", 1024, 1024, mask=mask, sop=uid)
        drawn[f"siim_{len(drawn)}"] = mask
    args += ["--annotations", str(_txv_data("siim-pneumothorax-train-rle.csv.gz")),
             "--annotations-format", "siim"]
    return args, drawn


def test_real_annotation_tables_land_on_the_drawn_pixels(tmp_path):
    """VinDr-CXR, RSNA, NIH and SIIM rows as the real tables hold them, on generated DICOM
    files: every region lies on the drawn pixels of its stored PNG (256 px, resized)."""
    args, drawn = _real_samples(tmp_path)
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), "--out", str(out), "--max-side", "256",
                 "--workers", "1", *args]) == 0
    images = {im["image_id"]: im for im in _table(out, "images")}
    regions = [r for r in _table(out, "regions") if r["source"] == "annotation"]
    by_image: dict[str, list[dict]] = {}
    for r in regions:
        by_image.setdefault(r["image_id"], []).append(r)
    with_findings = sum(1 for v in drawn.values()
                        if (v.any() if isinstance(v, np.ndarray) else len(v)))
    assert len(by_image) == with_findings == 8
    from pipeline.geometry import decode_rle

    for iid, rows in by_image.items():
        bright = _png(images[iid]) > 127
        union = np.zeros_like(bright)
        for r in rows:
            m = decode_rle(r["mask_rle"])  # the drawn mask, or the box itself without one
            assert (m & bright).sum() / m.sum() > 0.9, (r["label"], r["source_label"])
            assert np.allclose(r["bbox"], r["annotation_box"])
            union |= m
        # nothing drawn outside the regions (a WBF-fused box lies within its readers' boxes,
        # so a little of their union may be left out)
        assert (bright & ~union).sum() <= 0.15 * bright.sum()
    statuses = [im["annotation_status"] for im in images.values()]
    assert statuses.count("no_finding") == 1 and statuses.count("findings") == 8
    assert all(r["source_label"] and r["label"] and r["n_readers"] >= 1 for r in regions)
    checked = verify_captions(out, blind_threshold=None)
    assert checked["problems"] == [] and checked["regions"] == len(regions)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["annotations"]["annotated_files"] == 9
    assert manifest["annotations"]["annotation_unmatched"] > 1000  # the tables' other images


def test_a_table_that_does_not_fit_its_format_is_refused_before_any_work(tmp_path, capfd):
    src = tmp_path / "src"
    src.mkdir()
    write_cr(src / "a.dcm")
    bad = tmp_path / "bad.csv"
    bad.write_text("DOE^JANE 1234567,Finding\nCANARYROW,Nodule\n")  # no column vindr needs
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--annotations", str(bad),
                 "--annotations-format", "vindr"]) == 2
    err = "".join(capfd.readouterr())
    assert "--annotations" in err and "DOE" not in err and "CANARYROW" not in err
    assert not (out / "manifest.json").exists()
    assert main([str(src), "--out", str(out), "--annotations", str(bad)]) == 2  # no format
    assert main([str(src), "--out", str(out), "--reports-key", "study:X"]) == 2  # no table


def test_class_names_and_reader_ids_from_a_table_never_reach_outputs(tmp_path, capfd):
    """Hospital exports write patient names into class names and reader columns."""
    src = tmp_path / "src"
    src.mkdir()
    write_cr(src / "img001.dcm", box=(40, 100, 90, 160))
    table = _vindr(tmp_path / "boxes.csv", [
        ("img001", "CANARYDOE^JANE 4417723 follow-up", 3, "CANARYREADER", 40, 100, 90, 160),
        ("img001", "Nodule/Mass", 8, "CANARYREADER", 41, 101, 89, 159),
    ])
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--workers", "1", "--annotation-merge", "readers",
                 "--annotations", str(table), "--annotations-format", "vindr"]) == 0
    texts = ["".join(capfd.readouterr())]
    for p in out.rglob("*"):
        texts.append(p.name)
        if p.is_file():
            texts.append(p.read_bytes().decode("latin-1"))
            if p.suffix == ".parquet":
                texts.append(repr(pq.read_table(p).to_pylist()))
    blob = "\n".join(texts).upper()
    leaked = [c for c in ("CANARYDOE", "^JANE", "4417723", "CANARYREADER", "FOLLOW-UP")
              if c in blob]  # long enough not to occur by chance in PNG bytes
    assert not leaked
    regions = [r for r in _table(out, "regions") if r["source"] == "annotation"]
    assert sorted(r["label"] for r in regions) == ["finding_1", "nodule_mass"]
    assert {r["source_label"] for r in regions} == {"finding_1", "Nodule/Mass"}
    assert len({r["reader_key"] for r in regions}) == 1 and regions[0]["reader_key"]


@pytest.mark.parametrize("how", ["study", "accession", "patient_date", "beside"])
def test_a_report_finds_its_study_by_every_key(tmp_path, how):
    """StudyInstanceUID, AccessionNumber, PatientID + StudyDate (another date form), or a
    MIMIC-CXR style ``sNNN.txt`` beside the study folder; the other study gets none."""
    src = tmp_path / "src" / "p10" / "p10000032"
    write_labelled_ct(src / "s50414267", "1.2.3.4.80")
    other = tmp_path / "src" / "p11" / "p11000001" / "s5"
    write_labelled_ct(other, "1.2.3.4.81", PatientID="OTHERPID", AccessionNumber="OTHERACC",
                      StudyDate="20210101")
    text = "FINDINGS: The liver is enlarged.\nIMPRESSION: Hepatomegaly."
    args = []
    if how == "beside":
        (src / "s50414267.txt").write_text("FINAL REPORT\n" + text)
        args = ["--reports", "beside"]
    else:
        table = tmp_path / "reports.csv"
        with open(table, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["uid", "acc", "pid", "date", "report"])
            w.writerow(["1.2.3.4.80", PHI["AccessionNumber"], PHI["PatientID"], "01/02/2020",
                        text])
        key = {"study": "study:uid", "accession": "accession:acc",
               "patient_date": "patient_date:pid,date"}[how]
        args = ["--reports", str(table), "--reports-key", key, "--reports-text", "report"]
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), "--out", str(out), "--workers", "1", *args]) == 0
    series = {s["series_key"]: s for s in _table(out, "series")}
    by_series: dict[str, set] = {}
    for im in _table(out, "images"):
        by_series.setdefault(im["series_key"], set()).add(im["caption_report_source"])
    assert sorted(map(frozenset, by_series.values())) == [frozenset({"report"}),
                                                          frozenset({"template"})]
    assert len(series) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reports"]["reports_attached"] == 1
    assert manifest["reports"]["report_keys_unmatched"] == 0


def test_a_rerun_with_the_same_tables_adds_nothing_and_other_tables_need_another_out(tmp_path,
                                                                                     capfd):
    src = tmp_path / "src"
    src.mkdir()
    write_cr(src / "img001.dcm", box=(40, 100, 90, 160))
    table = _vindr(tmp_path / "boxes.csv", [("img001", "Nodule/Mass", 8, "R8", 40, 100, 90, 160)])
    out = tmp_path / "out"
    args = [str(src), "--out", str(out), "--workers", "1", "--annotations", str(table),
            "--annotations-format", "vindr"]
    assert main(args) == 0
    first = sorted(r["region_id"] for r in _table(out, "regions"))
    moved = tmp_path / "elsewhere.csv"  # the same content under another name: the same build
    moved.write_bytes(table.read_bytes())
    assert main([*args[:-3], str(moved), *args[-2:]]) == 0
    assert sorted(r["region_id"] for r in _table(out, "regions")) == first
    capfd.readouterr()
    _vindr(table, [("img001", "Nodule/Mass", 8, "R8", 40, 100, 95, 160)])  # a box changed
    assert main(args) == 2
    assert "annotations" in capfd.readouterr().err
