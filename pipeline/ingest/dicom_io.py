"""Safe DICOM file reading: header scan, classification, byte budget, decoder availability.

Nothing here decodes pixels. ``force=True`` is used only for files that carry no preamble but
whose first bytes look like a DICOM data set (a group 0x0002/0x0008 tag), never blindly.
"""

from __future__ import annotations

import datetime
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pipeline.errors import IngestError
from pipeline.ingest.codestream import codec_family, deflated_size, frame_dims
from pipeline.ingest.deid import burned_in_risk
from pipeline.ingest.dicom_values import as_floats, as_int, get_value, is_uid

RTSTRUCT_UID = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"
ENHANCED_PREFIXES = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.1",
                     "1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.4.3")
STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."  # the composite storage SOP classes
# Known non-image classes (checked after RTSTRUCT and SEG): never read as images, even when they
# carry Rows/Columns or a pixel-like payload. A class is matched by prefix, so "…1.1.9" also
# covers every waveform class "…1.1.9.x".
NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects (dose, plan, image, ...) except RTSTRUCT
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms (ECG, audio, haemodynamic, ...)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents (PDF, CDA, STL, ...)
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, surfaces
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR spectroscopy
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.5.1.4.1.1.68.",  # surface scan mesh / point cloud
    "1.2.840.10008.5.1.4.1.1.78.",  # ophthalmic measurements
    "1.2.840.10008.5.1.4.1.1.79.",  # ophthalmic visual field
    "1.2.840.10008.5.1.4.1.1.200.",  # CT defined procedure protocols
    "1.2.840.10008.5.1.4.1.1.90.",  # content assessment results
)
INFLATE_BUDGET = 1 << 30  # bytes a deflated data set may inflate to at the header scan
INVALID_UID = "invalid_uid"  # the manifest key under which non-UID transfer syntaxes are counted


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
    # What annotation tables and reports are joined on (pipeline/run/attach.py). Raw in a
    # scan's memory only; :func:`pipeline.ingest.discover.key_header` keys them (HMAC) before
    # they leave the scan, and the file index keeps the keyed values. "" when absent or invalid.
    sop_uid: str = ""
    study_uid: str = ""
    accession: str = ""
    patient_date: str = ""  # "<PatientID>|<StudyDate YYYYMMDD>" when both are present

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


def _check_inflation(path: Path, limit: int) -> None:
    """``size_budget`` when a deflated data set inflates past ``limit`` bytes, found by
    inflating it in bounded chunks before pydicom inflates it whole."""
    size = deflated_size(path, limit)
    if size is not None and size > limit:
        raise IngestError("size_budget", "the deflated data set inflates past the byte budget",
                          path)


def dcmread_safe(path: Path, stop_before_pixels: bool = False, defer_size: int | None = None,
                 inflate_budget: int = INFLATE_BUDGET):
    """``pydicom.dcmread`` that turns every parse problem into an :class:`IngestError`.

    A deflated data set is first inflated in bounded chunks and counted: past
    ``inflate_budget`` bytes it is refused (``size_budget``) before pydicom inflates it.
    """
    try:
        _check_inflation(path, inflate_budget)
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
    except InvalidDicomError:
        raise IngestError("unreadable", "not a DICOM file", path) from None
    except RecursionError:
        raise IngestError("recursion", "pathologically nested sequences", path) from None
    except UnicodeError:
        raise IngestError("encoding", "undecodable text in the header", path) from None
    except (EOFError, struct.error):
        raise IngestError("truncated", "file ends early", path) from None
    except zlib.error:
        raise IngestError("unreadable", "the deflated data set is corrupt", path) from None
    except OSError:
        raise IngestError("filesystem", "the file could not be opened or read", path) from None
    except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError, OverflowError,
            IndexError, MemoryError):
        raise IngestError("unreadable", "the DICOM data set could not be parsed", path) from None


def has_pixel_data(ds) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def is_image_class(sop: str) -> bool:
    """True for a standard storage class that pydicom's UID dictionary names "… Image Storage"
    (CT, MR, PET, CR/DX, US, XA, NM, secondary capture, VL, ophthalmic, ...): the allow-list."""
    return (is_uid(sop) and sop.startswith(STORAGE_PREFIX)
            and not sop.startswith(NON_IMAGE_PREFIXES) and "Image Storage" in UID(sop).name)


def classify(sop: str, ds) -> str:
    """"rtstruct", "seg", "image" or "other" for a data set of SOP class ``sop``.

    In order: RTSTRUCT and SEG by class; a known non-image class (:data:`NON_IMAGE_PREFIXES`)
    is "other"; an allow-listed image class (:func:`is_image_class`) is "image" even without
    pixels (a broken image: ``no_pixel_data``); any other class (private, unknown, not a UID)
    is "image" only when it carries pixel data and Rows and Columns.
    """
    if sop == RTSTRUCT_UID:
        return "rtstruct"
    if sop == SEG_UID:
        return "seg"
    if sop.startswith(NON_IMAGE_PREFIXES):
        return "other"
    return "image" if is_image_class(sop) else _by_content(ds)


def _by_content(ds) -> str:
    rows, cols = as_int(get_value(ds, "Rows"), 0), as_int(get_value(ds, "Columns"), 0)
    return "image" if has_pixel_data(ds) and rows > 0 and cols > 0 else "other"


def _label_reference(ds, kind: str) -> str | None:
    try:
        if kind == "seg":
            return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        if kind == "rtstruct":
            ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
            return str(ref.RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception:  # a malformed reference is no reference
        return None
    return None


def read_header(path: Path) -> Header:
    """Read one file's header (pixel data deferred, not decoded) into a :class:`Header`."""
    ds = dcmread_safe(path, defer_size=1024)
    try:
        return header_from_dataset(ds)
    except RecursionError:
        raise IngestError("recursion", "pathologically nested sequences", path) from None
    except UnicodeError:
        raise IngestError("encoding", "undecodable text in the header", path) from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, IndexError):
        raise IngestError("unreadable", "a header element could not be read", path) from None


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
    sop = _shared(str(get_value(ds, "SOPClassUID") or get_value(meta, "MediaStorageSOPClassUID")
                      or ""))
    kind = classify(sop, ds)
    ts = _shared(str(get_value(meta, "TransferSyntaxUID") or ""))
    iop = as_floats(get_value(ds, "ImageOrientationPatient"), 6)
    iop = _shared((repr(iop), iop))[1]  # keyed by repr: -0.0 and 0.0 compare equal
    ipp = as_floats(get_value(ds, "ImagePositionPatient"), 3)
    return Header(
        kind=kind, sop_class=sop,
        series_uid=_shared(str(get_value(ds, "SeriesInstanceUID") or "")),
        modality=_shared(str(get_value(ds, "Modality") or "OT").upper()),
        rows=as_int(get_value(ds, "Rows"), 0), cols=as_int(get_value(ds, "Columns"), 0),
        frames=max(1, as_int(get_value(ds, "NumberOfFrames"), 1)),
        samples=max(1, as_int(get_value(ds, "SamplesPerPixel"), 1)),
        bits_allocated=as_int(get_value(ds, "BitsAllocated"), 16), transfer_syntax=ts,
        iop=iop, ipp=ipp, instance_number=as_int(get_value(ds, "InstanceNumber"), 0) or None,
        referenced_series=_label_reference(ds, kind),
        enhanced=sop.startswith(ENHANCED_PREFIXES) or "PerFrameFunctionalGroupsSequence" in ds,
        has_pixels=has_pixel_data(ds), burned_in=burned_in_risk(ds),
        sop_uid=_uid_or_empty(get_value(ds, "SOPInstanceUID")),
        study_uid=_shared(_uid_or_empty(get_value(ds, "StudyInstanceUID"))),
        accession=_shared(_short_text(get_value(ds, "AccessionNumber"))),
        patient_date=_shared(patient_date(ds)),
    )


def _uid_or_empty(value) -> str:
    """A UID value as text when it is a valid UID, else "" (join keys must be real UIDs)."""
    text = str(value or "").strip()
    return text if is_uid(text) else ""


def _short_text(value, limit: int = 64) -> str:
    """A short identifier (AccessionNumber: SH, 16 chars; some sites write more) stripped, or ""
    when absent or longer than ``limit`` (then it is not an identifier)."""
    text = str(value or "").strip()
    return text if 0 < len(text) <= limit else ""


def patient_date(ds) -> str:
    """"<PatientID>|<StudyDate>" (StudyDate as YYYYMMDD, a real date) or "" when either is
    missing or invalid: the raw form of the reports' ``patient_date`` join key."""
    pid = _short_text(get_value(ds, "PatientID"))
    date = str(get_value(ds, "StudyDate") or "").strip()
    if not pid or not re.fullmatch(r"\d{8}", date):
        return ""
    try:
        datetime.date(int(date[:4]), int(date[4:6]), int(date[6:]))
    except ValueError:
        return ""
    return f"{pid}|{date}"


def check_budget(header: Header, budget_bytes: int, path: object = None) -> None:
    """Raise ``size_budget`` when the declared decoded size exceeds ``budget_bytes``."""
    if header.kind == "image" and (header.rows <= 0 or header.cols <= 0):
        raise IngestError("unreadable", "image without Rows/Columns", path)
    if header.declared_bytes > budget_bytes:
        raise IngestError("size_budget", "declared decoded size exceeds the file byte budget",
                          path)


def check_codestream(ds, header: Header, budget_bytes: int, path: object = None) -> None:
    """``size_budget`` before decoding when a compressed frame's own codestream (JPEG SOF,
    JPEG-LS SOF55, JPEG 2000 SIZ) declares more pixels than the header's frame, or the frames
    together would decode to more than ``budget_bytes``. Uncompressed data passes."""
    from pydicom.encaps import generate_fragmented_frames

    pixel_data = get_value(ds, "PixelData")
    if codec_family(header.transfer_syntax) is None or not isinstance(pixel_data,
                                                                      (bytes, bytearray)):
        return
    frame_pixels, total = header.rows * header.cols * header.samples, 0
    try:
        frames = [f[0] for f in generate_fragmented_frames(pixel_data,
                                                           number_of_frames=header.frames) if f]
    except Exception:  # broken encapsulation: the decoder refuses it with its own code
        return
    for data in frames:
        dims = frame_dims(bytes(data[:1 << 16]), header.transfer_syntax)
        if dims is None:
            continue
        total += dims.decoded_bytes
        if dims.pixels > frame_pixels or total > budget_bytes:
            raise IngestError("size_budget", "the compressed frame declares more pixels than "
                              "the header or the byte budget allows", path)


def decoder_available(transfer_syntax: str) -> bool:
    """True when an installed pydicom pixel decoder handles ``transfer_syntax``."""
    from pydicom.pixels import get_decoder

    if not is_uid(transfer_syntax):
        return False
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
    """Transfer syntaxes (UID → name) in the run that no installed decoder can handle.

    Only a syntactically valid UID becomes a key (with pydicom's name for it, or the UID itself
    when unknown); any other value (text a file put there) is counted under :data:`INVALID_UID`
    with a fixed name, so nothing but a UID reaches the manifest.
    """
    out = {}
    for ts in sorted(set(t for t in transfer_syntaxes if t)):
        if not is_uid(ts):
            out[INVALID_UID] = "not a valid transfer syntax UID"
        elif not decoder_available(ts):
            out[ts] = UID(ts).name
    return out
