"""Hostile DICOM headers: every file is one row with a reason, and no canary gets out.

Hypothesis draws header values a scanner, a person or an attacker can put in a file: free text
with PHI canaries (names, descriptions, ROI names, UIDs, transfer syntaxes), numbers that are
text, NaN, Inf, huge, zero or negative (rescale, spacing, thickness, positions), orientations
that are not orthonormal, image sizes of 0 or 65535. Each example is written as real DICOM
files (raw element bytes, so no value is cleaned on the way in) and built with
``build-corpus``; the build must exit 0 with a manifest, account for every file with exactly
one ``files`` row whose reason is in REASONS, and no canary may appear in any output byte, the
manifest or the console. Deterministic (derandomize) and small, for CI.

    .venv/bin/python -m pytest -q tests/pipeline/test_hostile.py
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
from factories import PHI, ct_slice, ramp_volume
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from label_factories import Series, contour, make_rtstruct, square
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pipeline.errors import REASONS
from pipeline.ingest.deid import Deidentifier
from workflows.build_corpus import main

CANARIES = ("CANARY", "ZELDA", *PHI.values())
# No shrinking: each example is a whole build, and an unshrunk example of at most four fields
# is readable as it is (the failing values are printed by name).
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------- value strategies

_junk = st.binary(max_size=5)
canary_text = st.builds(lambda a, b, c: a + b"CANARY" + b + b"ZELDA" + c, _junk, _junk, _junk)
_bad_numbers = st.sampled_from([b"NaN", b"nan", b"inf", b"-Infinity", b"1e308", b"-1e308",
                                b"1e999", b"0", b"-0", b"-1", b"-3.5", b"", b" ", b"+", b"1e-320",
                                b"12345678901234567"])
_finite = st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: f"{v:.6g}".encode())
number = st.one_of(_bad_numbers, _finite, canary_text)


def _multi(n_min: int, n_max: int, item=number):
    return st.lists(item, min_size=n_min, max_size=n_max).map(b"\\".join)


_cosine = st.floats(-2, 2, allow_nan=False).map(lambda v: f"{v:.4g}".encode())
orientation = st.one_of(_multi(6, 6, _cosine), _multi(0, 7), st.just(b"1\\0\\0\\1\\0\\0"),
                        st.just(b"0\\0\\0\\0\\0\\0"))
us_value = st.one_of(st.sampled_from([0, 1, 2, 7, 65535]), st.integers(0, 65535)).map(
    lambda v: v.to_bytes(2, "little"))
uid_text = st.one_of(canary_text, st.sampled_from([b"1.2.840.10008.5.1.4.1.1.66",
                                                   b"1.2.840.10008.5.1.4.1.1.481.2",
                                                   b"1.2.840.10008.1.2.4.50", b"1.2.3",
                                                   b"0.0.0.00.1", b""]))

# keyword → strategy of the raw value bytes written for it (little endian explicit VR)
FIELDS = {
    "PatientName": canary_text, "PatientID": canary_text, "SeriesDescription": canary_text,
    "StudyDescription": canary_text, "InstitutionName": canary_text, "Modality": canary_text,
    "Manufacturer": canary_text, "BodyPartExamined": canary_text, "StudyDate": canary_text,
    "PhotometricInterpretation": canary_text, "ContrastBolusAgent": canary_text,
    "RescaleSlope": number, "RescaleIntercept": number, "SliceThickness": number,
    "SpacingBetweenSlices": number, "KVP": number, "PixelSpacing": _multi(0, 3),
    "ImagePositionPatient": _multi(0, 4), "ImageOrientationPatient": orientation,
    "SOPClassUID": uid_text, "SeriesInstanceUID": uid_text, "TransferSyntaxUID": uid_text,
    "Rows": us_value, "Columns": us_value, "BitsAllocated": us_value, "NumberOfFrames": number,
}
mutations = st.lists(st.one_of([st.tuples(st.just(k), v) for k, v in sorted(FIELDS.items())]),
                     min_size=1, max_size=4, unique_by=lambda m: m[0])
# The cases issue 17 names, run on every run before the generated ones.
NAMED_CASES = [
    [("RescaleSlope", b"NaN")], [("RescaleIntercept", b"inf"), ("RescaleSlope", b"1e308")],
    [("PixelSpacing", b"CANARY ZELDA\\0.5")], [("SliceThickness", b"CANARY^ZELDA")],
    [("ImagePositionPatient", b"0\\NaN\\CANARY ZELDA")],
    [("ImageOrientationPatient", b"1\\1\\0\\0\\1\\0")],
    [("SOPClassUID", b"CANARY ZELDA")], [("TransferSyntaxUID", b"CANARY ZELDA")],
    [("Rows", b"\x00\x00")], [("Columns", b"\xff\xff")],
    [("Modality", b"CANARY"), ("Manufacturer", b"SIEMENS CANARY ZELDA"),
     ("BodyPartExamined", b"CHEST ZELDA CANARY")],
]


# ----------------------------------------------------------------------------- writers

def set_raw(ds, keyword: str, raw: bytes) -> None:
    """Put ``raw`` as the value bytes of ``keyword``, unvalidated (pydicom parses it on read)."""
    tag = Tag(tag_for_keyword(keyword))
    if tag.group == 2:  # file meta: one value (pydicom's writer reads the transfer syntax)
        raw = raw.replace(b"\\", b"/")
    if len(raw) % 2:
        raw += b"\x00" if dictionary_VR(tag) == "UI" else b" "
    target = ds.file_meta if tag.group == 2 else ds
    target[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def write_hostile_series(folder: Path, values: dict[str, bytes], every_slice: bool) -> list[Path]:
    """Three 12×10 CT slices; ``values`` replace those elements (in every slice or the first)."""
    folder.mkdir(parents=True)
    paths = []
    for k, plane in enumerate(ramp_volume((3, 12, 10))):
        ds = ct_slice(plane, (-10.0, -20.0, 30.0 + 2.5 * k), instance=k + 1)
        ds.SeriesDescription, ds.StudyDescription = "CANARY series", "CANARY study ZELDA"
        ds["PixelData"].VR = "OW"  # not ambiguous: the dataset is written without conversion
        if every_slice or k == 0:
            for keyword, raw in values.items():
                set_raw(ds, keyword, raw)
        path = folder / f"IM{k}.dcm"
        ds.preamble = b"\x00" * 128  # a Part 10 file, written as explicit VR little endian;
        ds.set_original_encoding(False, True, ds._character_set)  # raw values written as is
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, force_encoding=True)
        paths.append(path)
    return paths


def write_labelled_series(folder: Path, roi_names: list[str]) -> None:
    """A valid series and an RTSTRUCT whose ROINames are the drawn (canary) texts."""
    geo = Series((1, 0, 0, 0, 1, 0), (-10.0, -20.0, 30.0), (0.8, 0.7), (0, 0, 2.5), 10, 12, 3)
    folder.mkdir(parents=True)
    for k, plane in enumerate(ramp_volume((3, 12, 10))):
        ds = ct_slice(plane, geo.ipp(k), spacing=(0.8, 0.7), series_uid="1.2.3.4.9",
                      instance=k + 1)
        ds.save_as(folder / f"IM{k}.dcm", enforce_file_format=True)
    rois = [(n + 1, name, [contour(square(geo, 2, 6, 2, 8, 1))]) for n, name in
            enumerate(roi_names)]
    make_rtstruct(folder / "rt.dcm", geo, rois, "1.2.3.4.9")


# ----------------------------------------------------------------------------- the invariants

def _entries(root: Path) -> set[str]:
    deid, out = Deidentifier.from_env(), set()
    for here, _, files in os.walk(os.fsencode(root)):
        for name in files:
            rel = os.fsencode(root.name) + b"/" + os.path.relpath(os.path.join(here, name),
                                                                  os.fsencode(root))
            out.add(deid.pseudonym("file", rel))
    return out


def _leaks(out: Path, console: str) -> list[str]:
    texts = {"console": console}
    for p in out.rglob("*"):
        if p.is_file():
            texts[str(p.relative_to(out))] = p.read_bytes().decode("latin-1")
            if p.suffix == ".parquet":
                texts[f"rows of {p.relative_to(out)}"] = repr(pq.read_table(p).to_pylist())
    found = []
    for where, text in texts.items():
        for c in CANARIES:
            if (i := text.upper().find(c.upper())) >= 0:
                found.append(f"{where}: {c}: ...{text[max(0, i - 60):i + 30]!r}")
    return found


def build_and_check(src: Path, capfd) -> list[dict]:
    """Build ``src``; assert the invariants; return the files rows."""
    keys = _entries(src)
    out = src.parent / "out"
    code = main([str(src), "--out", str(out), "--workers", "1"])
    console = "".join(capfd.readouterr())
    assert code == 0, console[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    rows = pq.read_table(out / "files").to_pylist()
    assert len(rows) == manifest["found"] == len(keys) and manifest["complete"]
    assert {r["file_key"] for r in rows} == keys, "rows do not match the files one to one"
    assert all(r["reason"] in REASONS for r in rows), {r["reason"] for r in rows}
    leaked = _leaks(out, console)
    assert not leaked, "canaries got out:\n" + "\n".join(leaked)
    return rows


# ----------------------------------------------------------------------------- the tests

def _with_named_cases(test):
    for case in NAMED_CASES:
        test = example(mutations=case, every_slice=True)(test)
    return test


@SETTINGS
@given(mutations=mutations, every_slice=st.booleans())
@_with_named_cases
def test_hostile_header_values(capfd, mutations, every_slice):
    values = dict(mutations)
    for keyword in values:
        event(keyword)  # --hypothesis-show-statistics: how often each element was drawn
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        write_hostile_series(src / "CANARY_ZELDA", values, every_slice)
        build_and_check(src, capfd)


@settings(SETTINGS, max_examples=8)
@given(names=st.lists(st.text(min_size=1, max_size=12).map(lambda t: f"CANARY {t} ZELDA"),
                      min_size=1, max_size=3))
def test_hostile_roi_names(capfd, names):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        write_labelled_series(src / "ct", names)
        rows = build_and_check(src, capfd)
        assert {r["status"] for r in rows} == {"ingested"}
