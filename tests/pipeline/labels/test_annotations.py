"""Tests for pipeline.labels.annotations: real annotation tables, fusion, masks, hostile rows.

The VinDr-CXR, RSNA, NIH and SIIM tables are the ones the ``torchxrayvision`` package ships
(tests only; never copied into the repository). They are located without importing the package
(it imports torch) and counted independently with the standard ``csv`` module.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import math
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.dicom_io import Header
from pipeline.ingest.discover import FileEntry, key_header
from pipeline.labels.annotation_masks import coco_string_counts
from pipeline.labels.annotations import (
    FORMATS,
    WBF_IOU_THR,
    Shape,
    key_value,
    load_annotations,
)

DEID = Deidentifier(b"test-annotations-key")
CANARY = "DOE^JANE 1234567"


def xrv_data() -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision (test extra) is not installed")
    return Path(spec.submodule_search_locations[0]) / "data"


def _csv_rows(path: Path) -> list[dict]:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            text = z.read(z.namelist()[0]).decode()
    else:
        text = gzip.decompress(path.read_bytes()).decode()
    return list(csv.reader(io.StringIO(text)))


def _independent(fmt: str, path: Path) -> tuple[int, dict[str, int], set[str], set[str]]:
    """(data rows, raw key → rows with geometry, images with geometry, images listed without)."""
    table = _csv_rows(path)
    header, data = table[0], table[1:]
    col = {name.strip(): i for i, name in enumerate(header)}
    shaped: dict[str, int] = defaultdict(int)
    listed = set()
    for row in data:
        if fmt == "vindr":
            key, has = row[0], row[col["x_min"]] != ""
        elif fmt == "rsna":
            key, has = row[0], row[col["Target"]] == "1"
        elif fmt == "nih":
            key, has = row[0].rsplit(".", 1)[0], True
        else:
            key, has = row[0], row[1].strip() != "-1"
        listed.add(key)
        if has:
            shaped[key] += 1
    return len(data), shaped, set(shaped), listed - set(shaped)


TABLES = {"vindr": "vinbigdata-train.csv.gz", "rsna": "kaggle_stage_2_train_labels.csv.zip",
          "nih": "BBox_List_2017.csv.gz", "siim": "siim-pneumothorax-train-rle.csv.gz"}
KEY_KIND = {"vindr": "stem", "rsna": "stem", "nih": "stem", "siim": "sop"}


@pytest.mark.parametrize("fmt", sorted(TABLES))
def test_real_table_counts_match_an_independent_count(fmt):
    path = xrv_data() / TABLES[fmt]
    n_rows, per_key, shaped, empty = _independent(fmt, path)
    table = load_annotations(path, fmt, DEID, merge="readers")
    assert (table.n_rows, table.n_bad_rows) == (n_rows, 0)
    kind = KEY_KIND[fmt]
    expected = {(kind, key_value(kind, k, DEID)): n for k, n in per_key.items()}
    assert {k: len(v) for k, v in table.by_key.items()} == expected
    assert table.empty == {(kind, key_value(kind, k, DEID)) for k in empty}
    for shapes in table.by_key.values():
        for s in shapes:
            assert not s.finding.startswith("finding_"), s.source_name  # every class resolves
            if s.kind == "box":
                x0, y0, x1, y1 = s.coords
                assert all(math.isfinite(v) for v in s.coords) and x0 < x1 and y0 < y1


def test_every_real_class_name_resolves_as_its_label_set_states():
    from pipeline.captions.findings import canonical_finding, load_findings

    sets = load_findings().label_sets
    for fmt, column in (("vindr", "class_name"), ("nih", "Finding Label")):
        rows = _csv_rows(xrv_data() / TABLES[fmt])
        names = {r[rows[0].index(column)] for r in rows[1:]}
        assert names == set(sets[fmt]), fmt
        assert all(canonical_finding(n) == sets[fmt][n] for n in names)


def test_real_vindr_readers_fuse_into_fewer_boxes():
    path = xrv_data() / TABLES["vindr"]
    readers = load_annotations(path, "vindr", DEID, merge="readers")
    fused = load_annotations(path, "vindr", DEID, merge="wbf")
    assert fused.by_key.keys() == readers.by_key.keys() and fused.empty == readers.empty
    n_fused = sum(len(v) for v in fused.by_key.values())
    n_read = sum(len(v) for v in readers.by_key.values())
    assert n_fused < n_read
    assert sum(s.n_readers for v in fused.by_key.values() for s in v) >= n_read * 0.5
    assert max(s.n_readers for v in fused.by_key.values() for s in v) == 3  # VinDr: 3 readers


# ----------------------------------------------------------------------------- fusion

SPEC_READERS = "custom:key=stem:Image,class=Label,reader=Doctor,box=xyxy:X0,Y0,X1,Y1"


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _boxes_table(tmp_path, rows):
    return _write_csv(tmp_path / "t.csv", ["Image", "Label", "Doctor", "X0", "Y0", "X1", "Y1"],
                      rows)


def test_two_readers_overlapping_boxes_fuse_to_their_mean(tmp_path):
    path = _boxes_table(tmp_path, [["a.dcm", "Nodule", "R1", 100, 100, 200, 200],
                                   ["a.dcm", "Nodule", "R2", 110, 90, 210, 190]])
    (shapes,) = load_annotations(path, SPEC_READERS, DEID).by_key.values()
    (s,) = shapes
    assert (s.kind, s.finding, s.n_readers, s.reader) == ("box", "nodule", 2, None)
    assert s.coords == pytest.approx((105, 95, 205, 195))  # by hand: the mean of the two boxes


def test_disjoint_boxes_stay_apart_and_readers_mode_keeps_every_box(tmp_path):
    path = _boxes_table(tmp_path, [["a.dcm", "Nodule", "R1", 100, 100, 200, 200],
                                   ["a.dcm", "Nodule", "R2", 400, 400, 500, 500],
                                   ["a.dcm", "Mass", "R2", 100, 100, 200, 200]])
    (fused,) = load_annotations(path, SPEC_READERS, DEID).by_key.values()
    assert sorted((s.finding, s.n_readers, s.coords) for s in fused) == [
        ("mass", 1, (100, 100, 200, 200)), ("nodule", 1, (100, 100, 200, 200)),
        ("nodule", 1, (400, 400, 500, 500))]
    path = _boxes_table(tmp_path, [["a.dcm", "Nodule", "R1", 100, 100, 200, 200],
                                   ["a.dcm", "Nodule", "R2", 110, 90, 210, 190]])
    (kept,) = load_annotations(path, SPEC_READERS, DEID, merge="readers").by_key.values()
    one = _boxes_table(tmp_path, [["a.dcm", "Nodule", "R1", 100, 100, 200, 200],
                                  ["a.dcm", "Nodule", "R1", 110, 90, 210, 190]])
    (own,) = load_annotations(one, SPEC_READERS, DEID).by_key.values()
    assert [s.coords for s in own] == [(100, 100, 200, 200), (110, 90, 210, 190)]
    assert {s.reader for s in kept} == {DEID.pseudonym("reader", "R1"),
                                        DEID.pseudonym("reader", "R2")}
    assert [s.n_readers for s in kept] == [1, 1]


def test_an_image_is_empty_only_when_no_row_puts_a_shape_on_it(tmp_path):
    path = _boxes_table(tmp_path, [["a", "No finding", "R1", "", "", "", ""],
                                   ["a", "Nodule", "R2", 1, 1, 5, 5],
                                   ["b", "No finding", "R1", "", "", "", ""],
                                   ["c", "", "R1", "", "", "", ""],
                                   ["d", "Nodule", "R1", "", "", "", ""],  # bad: no geometry
                                   ["./.png", "No finding", "R1", "", "", "", ""]])  # bad: key
    table = load_annotations(path, SPEC_READERS, DEID)
    assert list(table.by_key) == [("stem", key_value("stem", "a", DEID))]
    assert table.empty == {("stem", key_value("stem", k, DEID)) for k in "bc"}
    assert (table.n_rows, table.n_bad_rows) == (6, 2)


def test_boxes_below_the_iou_threshold_are_not_fused(tmp_path):
    # IoU of [0,100]² and [50,150]x[0,100] is 1/3 < WBF_IOU_THR
    assert WBF_IOU_THR > 1 / 3
    path = _boxes_table(tmp_path, [["a", "Nodule", "R1", 0, 0, 100, 100],
                                   ["a", "Nodule", "R2", 50, 0, 150, 100]])
    (shapes,) = load_annotations(path, SPEC_READERS, DEID).by_key.values()
    assert len(shapes) == 2


# ----------------------------------------------------------------------------- masks


def siim_encode(mask: np.ndarray) -> str:
    """SIIM-ACR's published mask2rle, written independently: column-major runs, each start
    relative to the end of the previous run."""
    flat = mask.T.flatten()
    out, last_end, i = [], 0, 0
    while i < flat.size:
        if flat[i]:
            j = i
            while j < flat.size and flat[j]:
                j += 1
            out += [i - last_end, j - i]
            last_end = i = j
        else:
            i += 1
    return " ".join(str(v) for v in out) if out else "-1"


def test_siim_rle_encoded_mask_decodes_to_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    masks = [np.zeros((6, 9), bool), rng.random((6, 9)) > 0.6]
    masks[0][1:4, 2:7] = True  # a non-square frame: rows and cols must not swap
    rows = [["1.2.3", siim_encode(m)] for m in masks] + [["1.2.4", "-1"]]
    path = _write_csv(tmp_path / "siim.csv", ["ImageId", " EncodedPixels"], rows)
    table = load_annotations(path, "siim", DEID)
    (shapes,) = table.by_key.values()
    assert [s.rle[0] for s in shapes] == ["siim", "siim"]
    for s, m in zip(shapes, masks, strict=True):
        assert np.array_equal(s.mask(6, 9), m)
    assert table.empty == {("sop", key_value("sop", "1.2.4", DEID))}
    with pytest.raises(ValueError):
        shapes[0].mask(3, 3)  # runs past a smaller frame


def test_coco_json_boxes_polygons_rle_and_empty_images(tmp_path):
    ring = np.zeros((20, 30), np.uint8)
    ring[5:15, 4:20] = 1
    ring[8:12, 8:14] = 0
    rle = mask_utils.encode(np.asfortranarray(ring))
    doc = {"images": [{"id": 1, "file_name": "x/img1.png", "height": 20, "width": 30},
                      {"id": 2, "file_name": "img2.jpg", "height": 20, "width": 30}],
           "categories": [{"id": 7, "name": "Pleural effusion"}, {"id": 8, "name": CANARY}],
           "annotations": [
               {"image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 4]},
               {"image_id": 1, "category_id": 8, "segmentation": [[4, 5, 20, 5, 20, 15, 4, 15]]},
               {"image_id": 1, "category_id": 7, "iscrowd": 1,
                "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()}},
               {"image_id": 1, "category_id": 7, "bbox": [2, 3, -1, 4]},  # bad
               {"image_id": 9, "category_id": 7, "bbox": [2, 3, 1, 4]}]}  # bad: no image
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(doc))
    table = load_annotations(path, "coco", DEID)
    assert (table.n_rows, table.n_bad_rows) == (5, 2)
    assert table.empty == {("stem", key_value("stem", "img2", DEID))}
    shapes = table.by_key[("stem", key_value("stem", "img1", DEID))]
    box, poly, mask = (next(s for s in shapes if s.kind == k) for k in ("box", "polygon", "mask"))
    assert (box.kind, box.coords, box.finding) == ("box", (2, 3, 12, 7), "pleural_effusion")
    assert (poly.kind, poly.finding, poly.source_name) == ("polygon", "finding_1", "finding_1")
    square = np.zeros((20, 30), bool)
    square[5:15, 4:20] = True
    assert np.array_equal(poly.mask(20, 30), square)
    assert mask.kind == "mask" and np.array_equal(mask.mask(20, 30), ring.astype(bool))


def test_custom_spec_points_polygons_frames_path_keys_and_parquet(tmp_path):
    import polars as pl

    pl.DataFrame({"File": ["./a/b.dcm", "a/b.dcm"], "finding": ["effusion", "Opacity"],
                  "px": [3.5, 4.0], "py": [2.5, 1.0], "Frame": [2, None]}).write_parquet(
        tmp_path / "t.parquet")
    spec = "custom:key=path:File,class=finding,point=px,py,frame=Frame"
    table = load_annotations(tmp_path / "t.parquet", spec, DEID)
    (shapes,) = table.by_key.values()
    assert list(table.by_key) == [("path", key_value("path", "a/b.dcm", DEID))]
    assert [(s.kind, s.coords, s.frame, s.finding) for s in shapes] == [
        ("point", (3.5, 2.5), 2, "pleural_effusion"), ("point", (4.0, 1.0), 0, "lung_opacity")]
    path = _write_csv(tmp_path / "p.csv", ["id", "cls", "poly"],
                      [["s1", "Mass", "1 1 5 1 5 4 1 4"], ["s1", "Mass", "1 1 5"]])
    table = load_annotations(path, "custom:key=sop:id,class=cls,polygon=poly", DEID)
    assert table.n_bad_rows == 1
    (shapes,) = table.by_key.values()
    assert shapes[0].coords == (1, 1, 5, 1, 5, 4, 1, 4)
    assert shapes[0].mask(6, 6).sum() == 12  # 4 columns x 3 rows


@pytest.mark.parametrize("spec", ["custom:key=stem:a", "custom:key=uid:a,class=b,point=c,d",
                                  "custom:key=stem:a,class=b,box=xyxy:c,d", "custom:nonsense",
                                  "custom:key=stem:a,class=b,point=c,d,polygon=e", "yolo"])
def test_bad_specs_raise_a_fixed_message(tmp_path, spec):
    path = _write_csv(tmp_path / "t.csv", ["a"], [["x"]])
    with pytest.raises(ValueError, match="^annotation"):
        load_annotations(path, spec, DEID)


def test_key_values_match_discovery_keys():
    uid = "1.2.826.0.1.3680043.8.498.1"
    header = Header(kind="image", sop_class="1.2.840.10008.5.1.4.1.1.7", series_uid=uid,
                    modality="CR", rows=2, cols=2, frames=1, samples=1, bits_allocated=16,
                    transfer_syntax="1.2.840.10008.1.2.1", sop_uid=uid)
    e = FileEntry(index=0, path=Path("x.dcm"), rel="x.dcm", file_key="k", size=1, kind="dicom",
                  header=header)
    key_header(e, DEID)
    assert key_value("sop", uid, DEID) == DEID.pseudonym("uid", uid) == e.header.sop_uid
    assert key_value("sop", f" {uid}\n", DEID) == e.header.series_uid
    assert key_value("path", "./a//b/c.dcm", DEID) == key_value("path", "a/b/c.dcm", DEID)
    assert key_value("stem", "dir/Img_01.DCM", DEID) == key_value("stem", "Img_01", DEID)
    assert key_value("stem", "x.nii.gz", DEID) == DEID.pseudonym("annotation-stem", "x")
    assert key_value("stem", "Img_01", DEID) != key_value("stem", "img_01", DEID)
    for bad in ("", " ", "./"):
        with pytest.raises(ValueError):
            key_value("path", bad, DEID)


# ----------------------------------------------------------------------------- hostile rows

GOOD_NUM = st.floats(0, 4000, allow_nan=False).map(lambda v: f"{v:.3f}")
BAD_NUM = st.sampled_from(["nan", "NaN", "inf", "-inf", "-5", "abc", "1e400", "1e9", CANARY,
                           "--1", "0x10", "1,5"])
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=20)
CLASS = st.one_of(st.just(CANARY), st.just(f"Nodule {CANARY}"), st.sampled_from(
    ["Nodule", "Pleural effusion", "ILD"]), TEXT).filter(
    lambda s: s.strip() and "finding" not in s.lower() and s.strip().lower() != "normal")


def _key_ok(raw: str) -> bool:
    try:
        key_value("stem", raw, DEID)
    except ValueError:
        return False
    return True


@st.composite
def hostile_row(draw):
    x, y = draw(GOOD_NUM), draw(GOOD_NUM)
    w, h = draw(st.floats(0.5, 500).map(lambda v: f"{v:.3f}")), draw(
        st.floats(0.5, 500).map(lambda v: f"{v:.3f}"))
    cells = [x, y, w, h]
    bad = draw(st.booleans())
    if bad:
        i = draw(st.integers(0, 3))
        cells[i] = draw(BAD_NUM)
    key = draw(st.one_of(st.just(CANARY), TEXT.filter(_key_ok)))
    reader = draw(st.one_of(st.just(CANARY), TEXT))
    return [key, draw(CLASS), reader, *cells], bad


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(hostile_row(), min_size=1, max_size=12))
def test_hostile_rows_are_counted_never_raise_and_leak_nothing(tmp_path, rows):
    path = _write_csv(tmp_path / "h.csv", ["Image", "Label", "Doctor", "X", "Y", "W", "H"],
                      [r for r, _ in rows])
    spec = "custom:key=stem:Image,class=Label,reader=Doctor,box=xywh:X,Y,W,H"
    for merge in ("readers", "wbf"):
        table = load_annotations(path, spec, DEID, merge=merge)
        assert (table.n_rows, table.n_bad_rows) == (len(rows), sum(b for _, b in rows))
        shapes = [s for v in table.by_key.values() for s in v]
        if merge == "readers":
            assert len(shapes) == len(rows) - table.n_bad_rows
        dump = repr(table) + "".join(repr(vars(s)) for s in shapes)
        assert CANARY not in dump and "DOE" not in dump and "1234567" not in dump
        for s in shapes:
            x0, y0, x1, y1 = s.coords
            assert all(math.isfinite(v) for v in s.coords) and x0 < x1 and y0 < y1


RLE_TEXT = st.text(st.sampled_from([chr(c) for c in range(46, 114)]), max_size=8)
JSON_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.just(CANARY),
                       st.floats(allow_nan=True, allow_infinity=True), TEXT)
COCO_ANNOTATION = st.fixed_dictionaries(
    {"image_id": st.one_of(st.just(1), JSON_VALUE), "category_id": st.one_of(st.just(7), JSON_VALUE)},
    optional={"bbox": st.one_of(st.lists(JSON_VALUE, max_size=5),
                                st.lists(st.floats(-5, 100), min_size=4, max_size=4), JSON_VALUE),
              "segmentation": st.one_of(
                  JSON_VALUE, st.lists(st.lists(JSON_VALUE, max_size=8), max_size=3),
                  st.fixed_dictionaries({"size": st.one_of(st.just([2, 3]),
                                                           st.lists(JSON_VALUE, max_size=3)),
                                         "counts": st.one_of(JSON_VALUE, RLE_TEXT, st.lists(
                                             st.integers(-2, 6), max_size=6))}))})


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(annotations=st.lists(st.one_of(COCO_ANNOTATION, JSON_VALUE), max_size=8))
def test_hostile_coco_annotations_are_counted_and_leak_nothing(tmp_path, annotations):
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
           "categories": [{"id": 7, "name": CANARY}], "annotations": annotations}
    path = tmp_path / "h.json"
    path.write_text(json.dumps(doc))
    table = load_annotations(path, "coco", DEID)
    shapes = [s for v in table.by_key.values() for s in v]
    assert table.n_rows == len(annotations) and len(shapes) <= len(annotations) - table.n_bad_rows
    assert CANARY not in repr(table) + "".join(repr(vars(s)) for s in shapes)
    for s in shapes:  # every kept mask decodes (the C decoder only sees vetted RLE)
        rows, cols = s.rle[2] if s.kind == "mask" else (20, 30)
        assert s.mask(rows, cols).shape == (rows, cols)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_compressed_coco_strings_are_vetted_to_pycocotools_runs(rows, cols, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, cols)) > rng.random()
    counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    runs = ([0] + runs) if flat[0] else runs  # COCO runs start with background
    assert coco_string_counts(counts) == runs
    assert coco_string_counts(counts[:-1] + "o") is None  # cut short: "more" set on the last
    shape = Shape(kind="mask", coords=(), finding="mass", source_name="Mass",
                  rle=("coco", counts, (rows, cols)))
    assert np.array_equal(shape.mask(rows, cols), mask)


def test_ragged_and_short_rows_are_bad_rows_not_errors(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("Image,Label,Doctor,X0,Y0,X1,Y1\na,Mass,R1,1,2,3,4,5,6\nb,Mass,R1,1,2\n"
                    "c,Mass,R1,1,2,3,4\n")
    table = load_annotations(path, SPEC_READERS, DEID)
    assert (table.n_rows, table.n_bad_rows, len(table.by_key)) == (3, 1, 2)


def test_wrong_columns_raise_a_fixed_message_without_file_text(tmp_path):
    path = _write_csv(tmp_path / "w.csv", [CANARY, "Label"], [[CANARY, CANARY]])
    for fmt in (*FORMATS, "custom:key=sop:#5,class=Label,point=#0,#1"):
        with pytest.raises(ValueError) as err:
            load_annotations(path, fmt, DEID)
        assert CANARY not in str(err.value) and str(err.value).startswith("annotation table")
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": CANARY}))
    with pytest.raises(ValueError) as err:
        load_annotations(coco, "coco", DEID)
    assert CANARY not in str(err.value)


def test_shape_mask_of_a_box_and_refusals():
    box = Shape(kind="box", coords=(1.5, 0.0, 3.0, 2.0), finding="mass", source_name="Mass")
    expected = np.zeros((4, 5), bool)
    expected[0:2, 1:3] = True
    assert np.array_equal(box.mask(4, 5), expected)
    with pytest.raises(ValueError):
        Shape(kind="point", coords=(1, 1), finding="mass", source_name="Mass").mask(4, 5)
    with pytest.raises(ValueError):
        box.mask(0, 5)
