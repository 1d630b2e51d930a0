"""What a decoder will produce, read from the compressed bytes before it runs.

A DICOM header declares Rows × Columns, but a JPEG decoder allocates what its own codestream
declares: a 64² image whose JPEG SOF says 32000² costs gigabytes before any shape check can
run. So the codestream's own dimensions are read first (pure byte parsing, nothing decoded):

=================  =========================================================================
JPEG (ISO 10918)   SOF0..SOF15 (not DHT C4, JPG C8, DAC CC): P, Y, X, Nf
JPEG-LS            SOF55 (FFF7): the same layout
JPEG 2000          SIZ (FF51) right after SOC (FF4F), also inside a JP2 wrapper: Xsiz − XOsiz,
                   Ysiz − YOsiz, Csiz, per-component precision
Deflate            the deflated data set, inflated in bounded chunks and counted, output dropped
=================  =========================================================================

Frames whose codestream declares more pixels than the header's frame, or whose decoded bytes
exceed the budget, are refused with ``size_budget`` by the callers (dicom_io, read).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0..7, SOI: markers without a length
DEFLATED_TS = "1.2.840.10008.1.2.1.99"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
CHUNK = 1 << 16  # bytes of compressed input, and of output, per inflate step


@dataclass(frozen=True)
class Dims:
    """Image dimensions a codestream declares: rows (Y), columns (X), components, bits."""

    rows: int
    cols: int
    components: int
    bits: int

    @property
    def pixels(self) -> int:
        return self.rows * self.cols * self.components

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * max(1, (self.bits + 7) // 8)


def jpeg_dims(data: bytes) -> Dims | None:
    """The first SOF of a JPEG / JPEG-LS codestream, or None (no SOI, no SOF before SOS)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in JPEG_SOF:
            if i + 10 > len(data):
                return None
            bits, rows, cols, comps = struct.unpack(">BHHB", data[i + 4:i + 10])
            return Dims(rows, cols, comps, bits)
        if marker == 0xDA or length < 2:  # start of scan: no SOF came first
            return None
        i += 2 + length
    return None


def j2k_dims(data: bytes) -> Dims | None:
    """The SIZ segment of a JPEG 2000 codestream (raw or in a JP2 file), or None."""
    if data[:4] == b"\xff\x4f\xff\x51":
        start = 0
    elif data[:12] == JP2_SIGNATURE:  # the codestream sits in the jp2c box, after the header
        start = data.find(b"\xff\x4f\xff\x51", 12, 1 << 16)
    else:
        return None
    if start < 0 or start + 42 > len(data):
        return None
    x, y, x0, y0 = struct.unpack(">4I", data[start + 8:start + 24])
    (comps,) = struct.unpack(">H", data[start + 40:start + 42])
    ssiz = data[start + 42:start + 42 + 3 * comps:3]
    bits = max(((s & 0x7F) + 1 for s in ssiz), default=8)
    return Dims(max(0, y - y0), max(0, x - x0), comps, bits)


def codec_family(transfer_syntax: str) -> str | None:
    """"jpeg" (JPEG and JPEG-LS share the SOF layout), "j2k", or None for other syntaxes."""
    from pydicom.uid import (
        JPEG2000TransferSyntaxes,
        JPEGLSTransferSyntaxes,
        JPEGTransferSyntaxes,
    )

    if transfer_syntax in JPEGTransferSyntaxes or transfer_syntax in JPEGLSTransferSyntaxes:
        return "jpeg"
    return "j2k" if transfer_syntax in JPEG2000TransferSyntaxes else None


def frame_dims(data: bytes, transfer_syntax: str) -> Dims | None:
    """Dimensions declared by one compressed frame of a JPEG, JPEG-LS or JPEG 2000 transfer
    syntax, or None (another syntax, or no dimensions found)."""
    family = codec_family(transfer_syntax)
    if family == "jpeg":
        return jpeg_dims(data)
    return j2k_dims(data) if family == "j2k" else None


def _deflate_offset(head: bytes) -> int | None:
    """Where the deflated data set starts: after the preamble, "DICM" and the file meta group
    whose length (0002,0000) UL is the first element; None when it cannot be found."""
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return None
    if head[136:138] == b"UL":
        (length,) = struct.unpack("<I", head[140:144])
        return 144 + length
    (length,) = struct.unpack("<I", head[140:144])  # implicit VR: 4-byte length, then value
    return 144 + length if head[136:140] == b"\x04\x00\x00\x00" else None


def inflated_size(path: Path, limit: int) -> int | None:
    """Bytes the deflated data set of ``path`` inflates to, counted in bounded chunks; stops
    (returning a value > ``limit``) as soon as ``limit`` is passed. None when the file meta
    cannot be located (the caller leaves the file to the parser)."""
    with open(path, "rb") as f:
        offset = _deflate_offset(f.read(1024))
        if offset is None:
            return None
        f.seek(offset)
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while total <= limit:
            chunk = inflater.unconsumed_tail or f.read(CHUNK)
            if not chunk:
                break
            total += len(inflater.decompress(chunk, CHUNK))
            if inflater.eof:
                break
        return total


def deflated_size(path: Path, limit: int) -> int | None:
    """Inflated size (capped just past ``limit``) of a Deflated Explicit VR Little Endian file,
    None for any other file. Reads the first 4 KiB to find the transfer syntax in the file meta.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    offset = _deflate_offset(head)
    if offset is None or DEFLATED_TS.encode() not in head[132:offset]:
        return None
    return inflated_size(path, limit)
