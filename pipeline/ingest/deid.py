"""De-identification at ingest: keyed pseudonyms, shifted dates, and a retain-list of attributes.

Policy (PS3.15 Annex E, basic profile, with the *Retain Longitudinal Temporal Information with
Modified Dates* option):

* Nothing from a DICOM header reaches the output unless it is on :data:`RETAINED` below: private
  tags, names, IDs, free-text descriptions, institutions, physicians and device serials are never
  read into ``meta`` (Annex E action X by omission).
* Patient, study, series, frame-of-reference and instance identifiers become HMAC-SHA256
  pseudonyms under the project key (action U): the same key gives the same mapping on every run
  and every worker. The key never leaves this process; outputs carry :attr:`Deidentifier.key_id`.
* Dates are shifted by a per-patient offset derived from the key (action M under the option).
* Free-text attributes that captions need (contrast agent) are reduced to booleans (action C).

The key comes from ``$REGIONCORPUS_KEY`` (any string), else a key file (``--key-file`` or
``$REGIONCORPUS_KEY_FILE``), else ``~/.config/regioncorpus/project.key``, created with 256 random
bits and mode 0600 on first use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

KEY_ENV = "REGIONCORPUS_KEY"
KEY_FILE_ENV = "REGIONCORPUS_KEY_FILE"
DEFAULT_KEY_FILE = Path("~/.config/regioncorpus/project.key")

# keyword -> (Annex E basic-profile action for this attribute, how we treat it)
RETAINED: dict[str, tuple[str, str]] = {
    "Modality": ("not listed", "kept only as a defined term (MODALITIES), else OT"),
    "SOPClassUID": ("not listed (class, not instance)", "kept"),
    "Manufacturer": ("not listed", "kept only as a known vendor name (VENDORS)"),
    "BodyPartExamined": ("not listed", "kept only as a defined term (BODY_PARTS)"),
    "SliceThickness": ("not listed", "kept"),
    "SpacingBetweenSlices": ("not listed", "kept"),
    "KVP": ("not listed", "kept"),
    "MagneticFieldStrength": ("not listed", "kept"),
    "RepetitionTime": ("not listed", "kept"),
    "EchoTime": ("not listed", "kept"),
    "PhotometricInterpretation": ("not listed", "kept only as a defined term"),
    "BitsStored": ("not listed", "kept"),
    "TransferSyntaxUID": ("not listed", "kept"),
    "ContrastBolusAgent": ("D (may hold free text)", "reduced to boolean `contrast`"),
    "StudyDate": ("Z", "shifted per patient (Modified Dates option)"),
    "PatientID": ("Z", "replaced by HMAC pseudonym `patient_key`"),
    "StudyInstanceUID": ("U", "replaced by HMAC pseudonym `study_key`"),
    "SeriesInstanceUID": ("U", "replaced by HMAC pseudonym `series_key`"),
    "FrameOfReferenceUID": ("U", "replaced by HMAC pseudonym `frame_key`"),
    "SOPInstanceUID": ("U", "replaced by HMAC pseudonym (instance keys, never stored raw)"),
    "WindowCenter": ("not listed", "first value, kept when finite (`voi_*`, see voi_window)"),
    "WindowWidth": ("not listed", "first value, kept when finite and > 0 (`voi_*`)"),
    "VOILUTFunction": ("not listed", "kept only as a defined term (VOI_FUNCTIONS)"),
    "VOILUTSequence": ("not listed", "LUTDescriptor's input range only (`voi_*`)"),
    "ViewPosition": ("not listed", "kept only as a defined term (VIEW_POSITIONS)"),
    "PatientOrientation": ("not listed", "kept only as two direction codes (A P R L H F)"),
    "ImageLaterality": ("not listed", "kept only as L, R, B or U (else Laterality: L or R)"),
}

_SAFE_TEXT = re.compile(r"[^A-Za-z0-9 .\-]")


def load_key(key_file: str | os.PathLike | None = None) -> bytes:
    """Return the project key: $REGIONCORPUS_KEY, else ``key_file``, else the default key file."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode("utf-8")
    path = Path(key_file or os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE).expanduser()
    if not path.exists():
        if key_file is not None:
            raise ValueError(f"--key-file {path}: no such file")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.replace(tmp, path)
        # no path in the log line (rule in docs/data-governance.md): the key file is the
        # --key-file flag, else $REGIONCORPUS_KEY_FILE, else DEFAULT_KEY_FILE
        log.warning("created a new project key file (the --key-file / $REGIONCORPUS_KEY_FILE "
                    "path, else ~/.config/regioncorpus/project.key): keep it to reproduce "
                    "pseudonyms")
    key = path.read_bytes().strip()
    if len(key) < 16:
        raise ValueError(f"key file {path}: key is shorter than 16 bytes")
    return key


class Deidentifier:
    """Keyed pseudonyms and date shifts. Picklable, so one instance is shipped to every worker."""

    def __init__(self, key: bytes):
        if not key:
            raise ValueError("empty de-identification key")
        self._key = bytes(key)
        self.key_id = hashlib.sha256(b"regioncorpus-key-id:" + self._key).hexdigest()[:16]

    @classmethod
    def from_env(cls, key_file: str | os.PathLike | None = None) -> Deidentifier:
        return cls(load_key(key_file))

    def pseudonym(self, kind: str, value: str | bytes, n_hex: int = 24) -> str:
        """HMAC-SHA256(key, kind + NUL + value), hex, truncated to ``n_hex`` characters.

        ``value`` as bytes is hashed as is (a raw file name); text is UTF-8 with
        surrogateescape (the same bytes for a name ``os`` decoded), surrogatepass for others."""
        if isinstance(value, bytes):
            raw = value
        else:
            try:
                raw = str(value).encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raw = str(value).encode("utf-8", "surrogatepass")
        msg = kind.encode() + b"\x00" + raw
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:n_hex]

    def uid(self, value: str) -> str:
        """A DICOM UID (2.25 root) derived from ``value`` under the key: ≤ 64 characters."""
        return "2.25." + str(int(self.pseudonym("uid", value, 32), 16))

    def date_shift_days(self, patient_key: str) -> int:
        """Per-patient offset in days, in [-3650, -1]: the same patient always moves the same."""
        return -1 - int(self.pseudonym("date-shift", patient_key, 8), 16) % 3650

    def shift_date(self, value: str, patient_key: str) -> str | None:
        """Shift a DICOM DA string (YYYYMMDD); None when absent or malformed."""
        try:
            day = dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date()
        except ValueError:
            return None
        return (day + dt.timedelta(days=self.date_shift_days(patient_key))).strftime("%Y%m%d")


# Retained text is never copied: a value is kept only when it is one of the terms below (the
# DICOM defined terms; for Manufacturer, known vendors by their first word), else dropped.
# A hospital or a hostile file can put anything in a text element, a patient's name included.
MODALITIES = frozenset("""
    AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC
    HD IO IOL IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT
    PA PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN
    RTSTRUCT RWV SC SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
    CD CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
""".split())  # PS3.3 C.7.3.1.1.1 (current and retired)
BODY_PARTS = frozenset("""
    ABDOMEN ABDOMENPELVIS ADRENAL ANKLE AORTA ARM AXILLA BACK BLADDER BRAIN BREAST BRONCHUS
    BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS
    CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE CTSPINE DUODENUM EAR ELBOW
    ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER FOOT GALLBLADDER HAND HEAD HEADNECK HEART
    HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE LUNG
    MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY
    PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RECTUM RIB SACRUM SCAPULA SCLERA
    SCROTUM SHOULDER SKULL SPINE SPLEEN STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH THUMB THYMUS
    THYROID TIBIA TLSPINE TOE TONGUE TRACHEA TSPINE ULNA URETER URETHRA UTERUS VAGINA VULVA
    WHOLEBODY WRIST ZYGOMA
""".split())  # PS3.16 Annex L (BodyPartExamined values), compared without spaces
VENDORS = {  # first word of Manufacturer → the name kept
    "GE": "GE", "SIEMENS": "SIEMENS", "PHILIPS": "PHILIPS", "TOSHIBA": "TOSHIBA",
    "CANON": "CANON", "HITACHI": "HITACHI", "FUJIFILM": "FUJIFILM", "FUJI": "FUJIFILM",
    "AGFA": "AGFA", "CARESTREAM": "CARESTREAM", "KODAK": "KODAK", "HOLOGIC": "HOLOGIC",
    "KONICA": "KONICA MINOLTA", "SAMSUNG": "SAMSUNG", "SHIMADZU": "SHIMADZU",
    "ESAOTE": "ESAOTE", "MINDRAY": "MINDRAY", "UIH": "UNITED IMAGING", "UNITED": "UNITED IMAGING",
    "NEUSOFT": "NEUSOFT", "ELEKTA": "ELEKTA", "VARIAN": "VARIAN", "ACCURAY": "ACCURAY",
    "BRUKER": "BRUKER", "MEDISO": "MEDISO", "PICKER": "PICKER", "MARCONI": "MARCONI",
    "ADAC": "ADAC", "ELSCINT": "ELSCINT", "IMATRON": "IMATRON", "PLANMECA": "PLANMECA",
    "SIRONA": "SIRONA", "VATECH": "VATECH", "ZIEHM": "ZIEHM", "ALOKA": "ALOKA",
    "PIXELMED": "PIXELMED", "GEMS": "GE", "GEHC": "GE",
}
PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                         "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT",
                         "YBR_RCT", "HSV", "ARGB", "CMYK"})
_UID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))*")  # PS3.5 9.1, at most 64 characters
VIEW_POSITIONS = frozenset("""
    AP PA LL RL RLD LLD RLO LLO LAT LATERAL
    CC MLO ML LM LMO FB SIO XCC XCCL XCCM
""".split())  # PS3.3 C.8.11.5.1.1 (DX) and the mammography views of CID 4014; LAT/LATERAL as used
LATERALITIES = frozenset({"L", "R", "B", "U"})  # ImageLaterality (0020,0062): B both, U unpaired
VOI_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})  # PS3.3 C.11.2.1.3
_DIRECTION = re.compile(r"[APRLHF]{1,3}")  # PS3.3 C.7.6.1.1.1: one to three direction letters
#: The meta keys (and series columns) of the header's display range (:func:`voi_window`).
VOI_KEYS = ("voi_source", "voi_function", "voi_min", "voi_max")


def _get(ds, keyword: str):
    """``ds.get(keyword)``, None when absent or when pydicom cannot convert the element."""
    try:
        return ds.get(keyword)
    except Exception:  # pydicom converts on access and may raise anything (quoting the value)
        return None


def _num(ds, keyword: str, positive: bool = False) -> float | None:
    """A finite number (> 0 when ``positive``), else None: text, NaN, Inf are not copied."""
    value = _get(ds, keyword)
    try:
        out = None if value in (None, "") else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if out is None or not math.isfinite(out) or out < 0 or (positive and out == 0):
        return None
    return out


def _term(ds, keyword: str, terms) -> str | None:
    """The element's value when it is one of ``terms`` (upper case, spaces ignored for body
    parts), else None: free text is never copied."""
    value = _get(ds, keyword)
    if not isinstance(value, str):
        return None
    text = value.strip().upper()
    if text in terms:
        return text
    squeezed = text.replace(" ", "").replace("_", "")
    return squeezed if terms is BODY_PARTS and squeezed in terms else None


def _vendor(ds) -> str | None:
    value = _get(ds, "Manufacturer")
    words = _SAFE_TEXT.sub(" ", value).upper().split() if isinstance(value, str) else []
    return VENDORS.get(words[0]) if words else None


def _uid(ds, keyword: str) -> str | None:
    value = _get(ds, keyword)
    text = str(value) if value is not None else ""
    return text if 0 < len(text) <= 64 and _UID.fullmatch(text) else None


def patient_identity(ds) -> str:
    """The raw identity used to key a patient: PatientID (+ issuer), else the study UID."""
    pid = str(_get(ds, "PatientID") or "").strip()
    if pid:
        return pid + "|" + str(_get(ds, "IssuerOfPatientID") or "")
    return "study:" + str(_get(ds, "StudyInstanceUID") or "unknown")


def clean_dicom_meta(ds, deid: Deidentifier) -> dict:
    """Retained, de-identified metadata of one DICOM header (see :data:`RETAINED`).

    Text elements are kept only as known terms (:data:`MODALITIES`, :data:`BODY_PARTS`,
    :data:`VENDORS`, :data:`PHOTOMETRIC`), UIDs only when they are UIDs, numbers only when
    finite and in range; anything else is left out (None; modality "OT")."""
    patient_key = deid.pseudonym("patient", patient_identity(ds))
    meta = getattr(ds, "file_meta", None)
    return {
        "patient_key": patient_key,
        "study_key": deid.pseudonym("study", str(_get(ds, "StudyInstanceUID") or "")),
        "series_key": deid.pseudonym("series", str(_get(ds, "SeriesInstanceUID") or "")),
        "frame_key": deid.pseudonym("frame", str(_get(ds, "FrameOfReferenceUID") or "")),
        "modality": _term(ds, "Modality", MODALITIES) or "OT",
        "sop_class_uid": _uid(ds, "SOPClassUID"),
        "manufacturer": _vendor(ds),
        "body_part": _term(ds, "BodyPartExamined", BODY_PARTS),
        "slice_thickness_mm": _num(ds, "SliceThickness", positive=True),
        "kvp": _num(ds, "KVP", positive=True),
        "field_strength_t": _num(ds, "MagneticFieldStrength", positive=True),
        "repetition_time_ms": _num(ds, "RepetitionTime"),
        "echo_time_ms": _num(ds, "EchoTime"),
        "photometric": _term(ds, "PhotometricInterpretation", PHOTOMETRIC),
        "bits_stored": _num(ds, "BitsStored", positive=True),
        "transfer_syntax": _uid(meta, "TransferSyntaxUID") if meta is not None else None,
        "contrast": bool(str(_get(ds, "ContrastBolusAgent") or "").strip()),
        "study_date_shifted": deid.shift_date(_get(ds, "StudyDate") or "", patient_key),
        "view_position": _term(ds, "ViewPosition", VIEW_POSITIONS),
        "patient_orientation": patient_orientation(ds),
        "image_laterality": (_term(ds, "ImageLaterality", LATERALITIES)
                             or _term(ds, "Laterality", frozenset({"L", "R"}))),
        **voi_window(ds),
        "deid_key_id": deid.key_id,
        "deid_method": "PS3.15 E basic; retain-list; modified dates; known terms only",
    }


def patient_orientation(ds) -> list[str] | None:
    """PatientOrientation (0020,0020) as [row direction, column direction], each one to three
    of the letters A P R L H F (e.g. ["L", "F"]: columns run toward the patient's Left, rows
    toward the Feet); anything else (free text, one value, a name) → None."""
    value = _get(ds, "PatientOrientation")
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        parts = [str(v).strip().upper() for v in value]
    except TypeError:
        return None
    if len(parts) != 2 or not all(_DIRECTION.fullmatch(v) for v in parts):
        return None
    return parts


def _first_float(value) -> float | None:
    """The first value of a (possibly multi-valued) numeric element, finite, else None."""
    if value is not None and not isinstance(value, (str, bytes)):
        try:
            value = value[0] if len(value) else None
        except TypeError:
            pass
    try:
        out = None if value in (None, "") else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if out is not None and math.isfinite(out) else None


def _lut_range(ds) -> tuple[float, float] | None:
    """The input range of the first VOI LUT: first mapped value .. first + entries − 1
    (LUTDescriptor; 0 entries means 65536; a first value ≥ 2**15 is negative for signed
    pixels), else None."""
    seq = _get(ds, "VOILUTSequence")
    try:
        desc = [int(v) for v in seq[0].get("LUTDescriptor")] if seq else None
    except Exception:  # an empty or malformed item: pydicom may raise anything
        return None
    if not desc or len(desc) != 3 or not 0 <= desc[0] < 65536 or not 0 <= desc[1] < 65536:
        return None
    entries, first = desc[0] or 65536, desc[1]
    if _get(ds, "PixelRepresentation") == 1 and first >= 32768:
        first -= 65536
    return (float(first), float(first + entries - 1)) if entries > 1 else None


def voi_window(ds) -> dict:
    """The header's display range (PS3.3 C.11.2) in modality values, before any MONOCHROME1
    inversion: ``voi_source`` ("window", "lut" or None), ``voi_function``, ``voi_min``,
    ``voi_max``.

    WindowCenter c / WindowWidth w (first pair; finite, w > 0): LINEAR maps
    c − 0.5 − (w − 1)/2 → black and c − 0.5 + (w − 1)/2 → white (w ≥ 1, else not kept);
    LINEAR_EXACT c ∓ w/2. SIGMOID is approximated by its tangent at the centre, which
    reaches black and white at c ∓ w/2 (the LINEAR_EXACT ramp): the curve's soft shoulders
    are clipped. Without a window, a VOI LUT Sequence's input range is ramped linearly (the
    LUT's own curve is not applied). Neither → all None (percentile fallback)."""
    none = dict.fromkeys(VOI_KEYS)
    c = _first_float(_get(ds, "WindowCenter"))
    w = _first_float(_get(ds, "WindowWidth"))
    function = _term(ds, "VOILUTFunction", VOI_FUNCTIONS) or "LINEAR"
    if c is not None and w is not None and w > 0 and not (function == "LINEAR" and w < 1):
        if function == "LINEAR":
            lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        else:
            lo, hi = c - w / 2, c + w / 2
        if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            return dict(zip(VOI_KEYS, ("window", function, lo, hi), strict=True))
    lut = _lut_range(ds)
    if lut is not None:
        return dict(zip(VOI_KEYS, ("lut", None, lut[0], lut[1]), strict=True))
    return none


def burned_in_risk(ds) -> bool:
    """True when the image may carry burned-in text (PS3.15 E.1.1 note on BurnedInAnnotation).

    YES → risk. Absent → risk for ultrasound, secondary capture and 'other' modalities, where
    annotations are customarily burned in.
    """
    flag = str(_get(ds, "BurnedInAnnotation") or "").strip().upper()
    if flag == "YES":
        return True
    if flag == "NO":
        return False
    modality = str(_get(ds, "Modality") or "").upper()
    sop = str(_get(ds, "SOPClassUID") or "")
    secondary = sop.startswith("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture family
    return modality in {"US", "SC", "OT", "XC"} or secondary
