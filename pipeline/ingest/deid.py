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
    "Modality": ("not listed", "kept"),
    "SOPClassUID": ("not listed (class, not instance)", "kept"),
    "Manufacturer": ("not listed", "kept, reduced to [A-Za-z0-9 .-]"),
    "BodyPartExamined": ("not listed", "kept, reduced to [A-Z0-9 ]"),
    "SliceThickness": ("not listed", "kept"),
    "SpacingBetweenSlices": ("not listed", "kept"),
    "KVP": ("not listed", "kept"),
    "MagneticFieldStrength": ("not listed", "kept"),
    "RepetitionTime": ("not listed", "kept"),
    "EchoTime": ("not listed", "kept"),
    "PhotometricInterpretation": ("not listed", "kept"),
    "BitsStored": ("not listed", "kept"),
    "TransferSyntaxUID": ("not listed", "kept"),
    "ContrastBolusAgent": ("D (may hold free text)", "reduced to boolean `contrast`"),
    "StudyDate": ("Z", "shifted per patient (Modified Dates option)"),
    "PatientID": ("Z", "replaced by HMAC pseudonym `patient_key`"),
    "StudyInstanceUID": ("U", "replaced by HMAC pseudonym `study_key`"),
    "SeriesInstanceUID": ("U", "replaced by HMAC pseudonym `series_key`"),
    "FrameOfReferenceUID": ("U", "replaced by HMAC pseudonym `frame_key`"),
    "SOPInstanceUID": ("U", "replaced by HMAC pseudonym (instance keys, never stored raw)"),
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
        log.warning("created a new project key at %s: keep it to reproduce pseudonyms", path)
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

    def pseudonym(self, kind: str, value: str, n_hex: int = 24) -> str:
        """HMAC-SHA256(key, kind + NUL + value), hex, truncated to ``n_hex`` characters."""
        msg = kind.encode() + b"\x00" + str(value).encode("utf-8", "surrogateescape")
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


def _num(ds, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _text(ds, keyword: str, upper: bool = False) -> str | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    text = _SAFE_TEXT.sub("", str(value)).strip()[:64]
    return (text.upper() if upper else text) or None


def patient_identity(ds) -> str:
    """The raw identity used to key a patient: PatientID (+ issuer), else the study UID."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return pid + "|" + str(ds.get("IssuerOfPatientID", "") or "")
    return "study:" + str(ds.get("StudyInstanceUID", "") or "unknown")


def clean_dicom_meta(ds, deid: Deidentifier) -> dict:
    """Retained, de-identified metadata of one DICOM header (see :data:`RETAINED`)."""
    patient_key = deid.pseudonym("patient", patient_identity(ds))
    return {
        "patient_key": patient_key,
        "study_key": deid.pseudonym("study", str(ds.get("StudyInstanceUID", ""))),
        "series_key": deid.pseudonym("series", str(ds.get("SeriesInstanceUID", ""))),
        "frame_key": deid.pseudonym("frame", str(ds.get("FrameOfReferenceUID", ""))),
        "modality": _text(ds, "Modality", upper=True) or "OT",
        "sop_class_uid": str(ds.get("SOPClassUID", "")) or None,
        "manufacturer": _text(ds, "Manufacturer"),
        "body_part": _text(ds, "BodyPartExamined", upper=True),
        "slice_thickness_mm": _num(ds, "SliceThickness"),
        "kvp": _num(ds, "KVP"),
        "field_strength_t": _num(ds, "MagneticFieldStrength"),
        "repetition_time_ms": _num(ds, "RepetitionTime"),
        "echo_time_ms": _num(ds, "EchoTime"),
        "photometric": _text(ds, "PhotometricInterpretation", upper=True),
        "bits_stored": _num(ds, "BitsStored"),
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "") or None,
        "contrast": bool(str(ds.get("ContrastBolusAgent", "") or "").strip()),
        "study_date_shifted": deid.shift_date(ds.get("StudyDate", ""), patient_key),
        "deid_key_id": deid.key_id,
        "deid_method": "PS3.15 E basic; retain-list; modified dates",
    }


def burned_in_risk(ds) -> bool:
    """True when the image may carry burned-in text (PS3.15 E.1.1 note on BurnedInAnnotation).

    YES → risk. Absent → risk for ultrasound, secondary capture and 'other' modalities, where
    annotations are customarily burned in.
    """
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return True
    if flag == "NO":
        return False
    modality = str(ds.get("Modality", "") or "").upper()
    sop = str(ds.get("SOPClassUID", "") or "")
    secondary = sop.startswith("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture family
    return modality in {"US", "SC", "OT", "XC"} or secondary
