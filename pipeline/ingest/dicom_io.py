"""Safe DICOM file reading: header scan, classification, byte budget, decoder availability.

Nothing here decodes pixels. ``force=True`` is used only for files that carry no preamble but
whose first bytes look like a DICOM data set (a group 0x0002/0x0008 tag), never blindly.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pipeline.errors import IngestError
from pipeline.ingest.deid import burned_in_risk

RTSTRUCT_UID = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"
ENHANCED_PREFIXES = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.1",
                     "1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.4.3")
NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88",   # structured reports
    "1.2.840.10008.5.1.4.1.1.481",  # RT objects (dose, plan, ...) except RTSTRUCT handled first
    "1.2.840.10008.5.1.4.1.1.9",    # waveforms
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated documents
)


@dataclass(slots=True)
class Header:
    """What discovery needs to know about one DICOM file (pixel data not read).

    ``kind`` is "image", "rtstruct", "seg" or "other". Geometry is in DICOM LPS mm.
    Raw UIDs live only in memory for grouping and pairing; they are never written out.
    """

    kind: str
    sop_class: str
    series_uid: str
    modality: str
    rows: int
    cols: int
    frames: int
    samples: int
    bits_allocated: int
    transfer_syntax: str
    iop: tuple[float, ...] | None = None
    ipp: tuple[float, ...] | None = None
    instance_number: int | None = None
    referenced_series: str | None = None
    enhanced: bool = False
    has_pixels: bool = True
    burned_in: bool = False  # pipeline.ingest.deid.burned_in_risk of this header

    @property
    def declared_bytes(self) -> int:
        """Bytes the decoded pixel data will take, from the declared dimensions."""
        return self.rows * self.cols * self.frames * self.samples * max(1, self.bits_allocated // 8)


def _looks_like_raw_dataset(path: Path) -> bool:
    """True when a preamble-less file starts with a plausible group 0x0002 or 0x0008 tag."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        return False
    for fmt in ("<HH", ">HH"):
        group, elem = struct.unpack(fmt, head[:4])
        if group in (0x0002, 0x0008) and elem < 0x1000:
            return True
    return False


def dcmread_safe(path: Path, stop_before_pixels: bool = False, defer_size: int | None = None):
    """``pydicom.dcmread`` that turns every parse problem into an :class:`IngestError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels,
                                       defer_size=defer_size)
            except InvalidDicomError:
                if not _looks_like_raw_dataset(path):
                    raise
                return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels,
                                       defer_size=defer_size, force=True)
    except InvalidDicomError as e:
        raise IngestError("unreadable", f"not a DICOM file ({e})", path) from None
    except RecursionError:
        raise IngestError("recursion", "pathologically nested sequences", path) from None
    except UnicodeDecodeError as e:
        raise IngestError("encoding", f"undecodable text: {e.reason}", path) from None
    except (EOFError, struct.error) as e:
        raise IngestError("truncated", f"file ends early ({type(e).__name__})", path) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as e:
        raise IngestError("unreadable", f"{type(e).__name__}: {e}", path) from None


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _kind(sop: str, ds) -> str:
    if sop == RTSTRUCT_UID:
        return "rtstruct"
    if sop == SEG_UID:
        return "seg"
    if sop.startswith(NON_IMAGE_PREFIXES):
        return "other"
    storage = sop.startswith("1.2.840.10008.5.1.4.1.1.")  # image storage family
    return "image" if "Rows" in ds or storage else "other"


def _label_reference(ds, kind: str) -> str | None:
    try:
        if kind == "seg":
            return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        if kind == "rtstruct":
            ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
            return str(ref.RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError, KeyError):
        return None
    return None


def read_header(path: Path) -> Header:
    """Read one file's header (pixel data deferred, not decoded) into a :class:`Header`."""
    ds = dcmread_safe(path, defer_size=1024)
    try:
        return header_from_dataset(ds)
    except (RecursionError, UnicodeDecodeError) as e:
        raise IngestError("encoding" if isinstance(e, UnicodeDecodeError) else "recursion",
                          f"header element could not be read ({type(e).__name__})", path) from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise IngestError("unreadable", f"header element could not be read ({e})", path) from None


@lru_cache(maxsize=4096)
def _shared(value):
    """One object per distinct value (hashable): a series' slices repeat the same UIDs, SOP class,
    transfer syntax and orientation, so the driver, which holds a Header per file for the whole
    run, keeps one copy per header-scan batch instead of one per file (pickle keeps shared
    objects shared)."""
    return value


def header_from_dataset(ds) -> Header:
    """Build a :class:`Header` from an already-read data set."""
    meta = getattr(ds, "file_meta", None)
    sop = _shared(str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "")
                      or ""))
    kind = _kind(sop, ds)
    ts = _shared(str(getattr(meta, "TransferSyntaxUID", "") or ""))
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    iop = _shared((repr(iop), iop))[1]  # keyed by repr: -0.0 and 0.0 compare equal
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    return Header(
        kind=kind, sop_class=sop, series_uid=_shared(str(ds.get("SeriesInstanceUID", "") or "")),
        modality=_shared(str(ds.get("Modality", "") or "OT").upper()),
        rows=_int(ds.get("Rows"), 0), cols=_int(ds.get("Columns"), 0),
        frames=max(1, _int(ds.get("NumberOfFrames"), 1)),
        samples=max(1, _int(ds.get("SamplesPerPixel"), 1)),
        bits_allocated=_int(ds.get("BitsAllocated"), 16), transfer_syntax=ts,
        iop=iop, ipp=ipp, instance_number=_int(ds.get("InstanceNumber"), 0) or None,
        referenced_series=_label_reference(ds, kind),
        enhanced=sop.startswith(ENHANCED_PREFIXES) or "PerFrameFunctionalGroupsSequence" in ds,
        has_pixels=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        burned_in=burned_in_risk(ds),
    )


def check_budget(header: Header, budget_bytes: int, path: object = None) -> None:
    """Raise ``size_budget`` when the declared decoded size exceeds ``budget_bytes``."""
    if header.kind == "image" and (header.rows <= 0 or header.cols <= 0):
        raise IngestError("unreadable", "image without Rows/Columns", path)
    if header.declared_bytes > budget_bytes:
        raise IngestError(
            "size_budget",
            f"declared {header.rows}x{header.cols}x{header.frames} frames x{header.samples} "
            f"samples = {header.declared_bytes / 2**20:.0f} MiB exceeds the "
            f"{budget_bytes / 2**20:.0f} MiB budget",
            path,
        )


def decoder_available(transfer_syntax: str) -> bool:
    """True when an installed pydicom pixel decoder handles ``transfer_syntax``."""
    from pydicom.pixels import get_decoder

    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        return False
    if not uid.is_compressed:
        return True
    try:
        return get_decoder(uid).is_available
    except (NotImplementedError, ValueError, KeyError):
        return False


def missing_decoders(transfer_syntaxes) -> dict[str, str]:
    """Transfer syntaxes (UID → name) in the run that no installed decoder can handle."""
    out = {}
    for ts in sorted(set(t for t in transfer_syntaxes if t)):
        if not decoder_available(ts):
            out[ts] = UID(ts).name
    return out
