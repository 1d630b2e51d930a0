"""Hostile window / VOI / orientation / view tags on projection images: the reader raises
nothing but IngestError (with a reason code), and no canary (a name in ViewPosition,
PatientOrientation, BodyPartExamined, ...) reaches the meta, the windows or the captions."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.captions.attributes import PROJECTION_FACTS, load_vocab
from pipeline.captions.describe import summary_and_report
from pipeline.errors import REASONS, IngestError
from pipeline.images.slicing import SliceConfig, cut_images
from pipeline.images.windows import windows_for
from pipeline.ingest.deid import VIEW_POSITIONS, Deidentifier
from pipeline.ingest.read import ReadConfig, read_volume

CANARIES = ("CANARY", "ZELDA", "DOE^JANE", "DOE")
SOP = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
       "MG": "1.2.840.10008.5.1.4.1.1.1.2", "US": "1.2.840.10008.5.1.4.1.1.6.1"}

_junk = st.binary(max_size=4)
canary = st.one_of(st.just(b"DOE^JANE"), st.builds(lambda a, b: a + b"CANARY" + b + b"ZELDA",
                                                    _junk, _junk))
_bad = st.sampled_from([b"NaN", b"inf", b"-Infinity", b"1e308", b"-1e308", b"1e999", b"0", b"-0",
                        b"-1", b"0.5", b"", b" ", b"+", b"1e-320", b"12345678901234567"])
_finite = st.floats(-1e5, 1e5, allow_nan=False).map(lambda v: f"{v:.6g}".encode())
number = st.one_of(_bad, _finite, canary)
multi = st.lists(number, min_size=0, max_size=3).map(b"\\".join)
term = st.sampled_from([b"AP", b"PA", b"LL", b"LATERAL", b"CC", b"MLO", b"pa ", b"", b"X"])
direction = st.sampled_from([b"L", b"R", b"A", b"P", b"H", b"F", b"LF", b"AFL", b"Q", b"", b"LLLL"])
orientation = st.one_of(st.lists(st.one_of(direction, canary), min_size=0, max_size=3).map(
    b"\\".join), canary)

FIELDS = {
    "WindowCenter": multi, "WindowWidth": multi,
    "VOILUTFunction": st.one_of(st.sampled_from([b"LINEAR", b"LINEAR_EXACT", b"SIGMOID",
                                                  b"sigmoid", b""]), canary),
    "ViewPosition": st.one_of(term, canary), "PatientOrientation": orientation,
    "BodyPartExamined": st.one_of(st.sampled_from([b"CHEST", b"BREAST", b""]), canary),
    "ImageLaterality": st.one_of(st.sampled_from([b"L", b"R", b"B", b"U", b"X", b""]), canary),
    "Laterality": st.one_of(st.sampled_from([b"L", b"R", b"B"]), canary),
    "PixelSpacing": multi, "ImagerPixelSpacing": multi,
    "PhotometricInterpretation": st.sampled_from([b"MONOCHROME1", b"MONOCHROME2"]),
    "PixelRepresentation": st.sampled_from([b"\x00\x00", b"\x01\x00"]),
}
mutations = st.lists(st.one_of([st.tuples(st.just(k), v) for k, v in sorted(FIELDS.items())]),
                     min_size=1, max_size=5, unique_by=lambda m: m[0])
lut_descriptor = st.one_of(st.binary(min_size=0, max_size=8),
                           st.lists(st.integers(0, 65535), min_size=3, max_size=3).map(
                               lambda v: b"".join(x.to_bytes(2, "little") for x in v)))


def set_raw(ds, keyword: str, raw: bytes) -> None:
    """Put ``raw`` as the value bytes of ``keyword``, unvalidated (pydicom parses it on read)."""
    tag = Tag(tag_for_keyword(keyword))
    vr = dictionary_VR(tag).split(" ")[0]
    if len(raw) % 2:
        raw += b" "
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def write(path: Path, modality: str, values: dict, descriptor: bytes | None) -> None:
    px = (100 + (np.arange(40)[:, None] * 7 + np.arange(30)[None, :] * 3) % 3000)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP[modality]
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.9.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SOP[modality], "1.2.3.4.9.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.9"
    ds.Modality, ds.BurnedInAnnotation = modality, "NO"
    ds.PatientName, ds.PatientID = "DOE^JANE", "CANARYPID"
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.astype(np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    if descriptor is not None:
        item = Dataset()
        set_raw(item, "LUTDescriptor", descriptor)
        item.LUTData = np.zeros(4, np.uint16).tobytes()
        item["LUTData"].VR = "OW"
        ds.VOILUTSequence = Sequence([item])
    for keyword, raw in values.items():
        set_raw(ds, keyword, raw)
    ds.preamble = b"\x00" * 128
    ds.set_original_encoding(False, True, ds._character_set)
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, force_encoding=True)


def _no_canary(text: str) -> None:
    for c in CANARIES:
        assert c not in text.upper(), (c, text[:200])


def _check(vol) -> None:
    meta = vol.meta
    _no_canary(repr(meta))
    assert meta["projection"] is True
    assert meta["view_position"] in VIEW_POSITIONS | {None}
    assert meta["image_laterality"] in {"L", "R", "B", "U", None}
    po = meta["patient_orientation"]
    assert po is None or (len(po) == 2 and all(set(d) <= set("APRLHF") for d in po))
    if meta["voi_min"] is not None:
        assert np.isfinite(meta["voi_min"]) and np.isfinite(meta["voi_max"])
        assert meta["voi_min"] < meta["voi_max"]
    (spec,) = windows_for(vol)
    assert np.isfinite(spec.vmin) and np.isfinite(spec.vmax)
    images = cut_images(vol, SliceConfig(every_k=1))
    image = {"image_id": "x", "modality": vol.modality, "plane": images[0].plane,
             "body_part": meta.get("body_part"), "contrast": meta.get("contrast"),
             "slice_thickness_mm": 1.0, **{k: meta[k] for k in PROJECTION_FACTS}}
    for seed in range(2):
        for text in summary_and_report(image, [], [], load_vocab(), seed):
            _no_canary(text)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(modality=st.sampled_from(sorted(SOP)), values=mutations,
       descriptor=st.one_of(st.none(), lut_descriptor))
@example(modality="CR", values=[("ViewPosition", b"DOE^JANE"),
                                ("PatientOrientation", b"DOE^JANE"),
                                ("BodyPartExamined", b"CHEST DOE^JANE")], descriptor=None)
@example(modality="DX", values=[("PatientOrientation", b"L\\DOE^JANE")], descriptor=None)
@example(modality="US", values=[("PatientOrientation", b"L\\F\\P")], descriptor=None)
@example(modality="DX", values=[("WindowCenter", b"NaN"), ("WindowWidth", b"0")],
         descriptor=b"\x00\x00\x00\x80\x10\x00")
@example(modality="MG", values=[("WindowCenter", b"1e308\\CANARY"),
                                ("WindowWidth", b"-1e308"), ("VOILUTFunction", b"SIGMOID")],
         descriptor=b"\x01")
def test_hostile_projection_tags(modality, values, descriptor):
    deid = Deidentifier(b"test-key-not-secret-0123456789")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "img.dcm"
        write(path, modality, dict(values), descriptor)
        try:
            vol = read_volume(path, deid, ReadConfig(allow_burned_in=True))
        except IngestError as e:
            event(f"refused: {e.reason}")  # --hypothesis-show-statistics
            assert e.reason in REASONS
            _no_canary(str(e))
            return
        event(f"read, window {windows_for(vol)[0].name}")
        _check(vol)
