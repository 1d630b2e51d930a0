"""Budgets before decoding: what a decoder will produce is read from the codestream (JPEG SOF,
JPEG-LS SOF55, JPEG 2000 SIZ) or counted from the deflate stream in bounded chunks, and
refused with ``size_budget`` before any decoder or inflater runs on the whole.

Hand-made codestreams: a 64² DICOM whose codestream declares 32000² is the canonical bomb.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pydicom
import pytest
from factories import ct_slice
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

from pipeline.errors import IngestError
from pipeline.ingest import codestream
from pipeline.ingest.dicom_io import check_codestream, dcmread_safe, header_from_dataset
from pipeline.ingest.read import ReadConfig, read_volume

SOF_MARKERS = sorted(codestream.JPEG_SOF - {0xF7})


def jpeg(rows: int, cols: int, marker: int = 0xC0, bits: int = 8, comps: int = 1) -> bytes:
    """SOI, an APP0 segment, SOF (``marker``) declaring rows × cols, EOI: no scan at all."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\1\1\0\0\1\0\1\0\0"
    sof = struct.pack(">BHHB", bits, rows, cols, comps) + b"".join(
        bytes([i + 1, 0x11, 0]) for i in range(comps))
    return (b"\xff\xd8" + app0 + bytes([0xFF, marker]) + struct.pack(">H", 2 + len(sof)) + sof
            + b"\xff\xd9")


def j2k(rows: int, cols: int, bits: int = 8, comps: int = 1) -> bytes:
    """SOC and a SIZ segment declaring rows × cols, then EOC."""
    siz = struct.pack(">H4I4IH", 0, cols, rows, 0, 0, cols, rows, 0, 0, comps) + bytes(
        [bits - 1, 1, 1] * comps)
    return b"\xff\x4f\xff\x51" + struct.pack(">H", 2 + len(siz)) + siz + b"\xff\xd9"


def compressed_file(path, frame: bytes, syntax, rows=64, cols=64, bits_allocated=8):
    """A 64² CT slice whose pixel data is the single encapsulated ``frame``."""
    ds = ct_slice(np.zeros((rows, cols), np.int16), (0.0, 0.0, 0.0))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_allocated, bits_allocated - 1
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame + b"\0" * (len(frame) % 2)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test: the refusal must come first."""
    def boom(ds, path):
        raise AssertionError("a decoder ran")

    monkeypatch.setattr("pipeline.ingest.dicom_pixels._decode", boom)


@pytest.mark.parametrize("marker", SOF_MARKERS, ids=lambda m: f"SOF{m - 0xC0}")
def test_jpeg_sof_declaring_32000_squared_is_refused_before_decoding(tmp_path, deid, marker,
                                                                     no_decoding):
    path = compressed_file(tmp_path / "bomb.dcm", jpeg(32000, 32000, marker), JPEGBaseline8Bit)
    with pytest.raises(IngestError) as e:
        read_volume([path], deid)
    assert e.value.reason == "size_budget"


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["jpeg", "jpeg_ls", "j2k"]), rows=st.integers(1, 65535),
       cols=st.integers(1, 65535), comps=st.integers(1, 4))
def test_codestream_larger_than_header_is_size_budget(kind, rows, cols, comps):
    """Any codestream declaring more pixels than the header's 64² × 1 frame is refused."""
    assume(rows * cols * comps > 64 * 64)
    frame, syntax = {"jpeg": (jpeg(rows, cols, 0xC1, 8, comps), JPEGExtended12Bit),
                     "jpeg_ls": (jpeg(rows, cols, 0xF7, 8, comps), JPEGLSLossless),
                     "j2k": (j2k(rows, cols, 8, comps), JPEG2000Lossless)}[kind]
    ds = ct_slice(np.zeros((64, 64), np.int16), (0.0, 0.0, 0.0))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame + b"\0" * (len(frame) % 2)])
    with pytest.raises(IngestError) as e:
        check_codestream(ds, header_from_dataset(ds), 1 << 30)
    assert e.value.reason == "size_budget"


def test_codestream_decoding_past_the_byte_budget_is_size_budget(tmp_path, deid, no_decoding):
    """Header 64² × 8 bit (4 KiB, within a 6000-byte budget); the codestream's 16-bit
    precision would decode to 8 KiB."""
    path = compressed_file(tmp_path / "wide.dcm", jpeg(64, 64, 0xC3, 16), JPEGLosslessSV1)
    with pytest.raises(IngestError) as e:
        read_volume([path], deid, ReadConfig(file_budget_bytes=6000))
    assert e.value.reason == "size_budget"


@pytest.mark.parametrize("name", [
    "JPEG2000.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "JPGExtended.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_small_odd_jpeg.dcm",
    "examples_jpeg2k.dcm", "examples_ybr_color.dcm", "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jls_lossy_line.dcm"])
def test_real_codestreams_declare_their_header_dims(name):
    """pydicom's compressed test files: the parser finds exactly Rows × Columns × samples, and
    the check lets them through."""
    from pydicom.data import get_testdata_file
    from pydicom.encaps import generate_fragmented_frames

    ds = pydicom.dcmread(get_testdata_file(name))
    header = header_from_dataset(ds)
    first = next(generate_fragmented_frames(ds.PixelData, number_of_frames=header.frames))[0]
    dims = codestream.frame_dims(bytes(first), header.transfer_syntax)
    assert (dims.rows, dims.cols, dims.components) == (ds.Rows, ds.Columns, ds.SamplesPerPixel)
    check_codestream(ds, header, 1 << 30)


@given(st.binary(max_size=300))
def test_codestream_parsers_never_raise(data):
    for blob in (data, b"\xff\xd8" + data, b"\xff\x4f\xff\x51" + data,
                 codestream.JP2_SIGNATURE + data):
        for parse in (codestream.jpeg_dims, codestream.j2k_dims):
            dims = parse(blob)
            assert dims is None or min(dims.rows, dims.cols, dims.components) >= 0


# -- deflate ---------------------------------------------------------------------------------

def deflated_file(path, rows=2048, cols=2048):
    """A CT slice of zeros (8 MiB of pixel data) in the Deflated transfer syntax: a few KiB."""
    ds = ct_slice(np.full((rows, cols), -1024, np.int16), (0.0, 0.0, 0.0))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_deflate_bomb_is_refused_before_inflating(tmp_path, deid, monkeypatch):
    path = deflated_file(tmp_path / "bomb.dcm")
    assert path.stat().st_size < 200_000

    def no_parse(*a, **k):
        raise AssertionError("pydicom inflated the data set")

    monkeypatch.setattr("pipeline.ingest.dicom_io.pydicom.dcmread", no_parse)
    with pytest.raises(IngestError) as e:
        read_volume([path], deid, ReadConfig(file_budget_bytes=4 << 20))
    assert e.value.reason == "size_budget"
    with pytest.raises(IngestError) as e:
        dcmread_safe(path, inflate_budget=1 << 20)  # the header scan's path
    assert e.value.reason == "size_budget"


def test_deflated_size_is_counted_exactly_within_budget(tmp_path):
    path = deflated_file(tmp_path / "small.dcm", 64, 64)
    raw = path.read_bytes()
    offset = codestream._deflate_offset(raw)
    exact = len(zlib.decompress(raw[offset:], -zlib.MAX_WBITS))
    assert codestream.deflated_size(path, 1 << 30) == exact
    assert codestream.deflated_size(path, 100) > 100  # stops once past the limit
    ds = dcmread_safe(path, inflate_budget=exact)
    assert ds.Rows == 64


def test_other_files_are_not_deflated(tmp_path):
    ds = ct_slice(np.zeros((8, 8), np.int16), (0.0, 0.0, 0.0))
    ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    assert codestream.deflated_size(tmp_path / "plain.dcm", 10) is None
