"""Keyed pseudonyms, date shifts, the retain-list and the burned-in rule."""

from __future__ import annotations

import pydicom
import pytest
from factories import PHI, ct_slice
from pydicom.data import get_testdata_file

from pipeline.ingest.deid import Deidentifier, burned_in_risk, clean_dicom_meta, load_key


def test_pseudonyms_are_keyed_and_stable():
    a, b = Deidentifier(b"k" * 32), Deidentifier(b"j" * 32)
    assert a.pseudonym("patient", "P1") == Deidentifier(b"k" * 32).pseudonym("patient", "P1")
    assert a.pseudonym("patient", "P1") != b.pseudonym("patient", "P1")
    assert a.pseudonym("patient", "P1") != a.pseudonym("study", "P1")
    assert a.key_id != b.key_id and len(a.key_id) == 16
    uid = a.uid("1.2.3")
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_date_shift_is_per_patient_and_consistent():
    d = Deidentifier(b"k" * 32)
    s1, s2 = d.shift_date("20200101", "p1"), d.shift_date("20200111", "p1")
    assert s1 != "20200101"
    from datetime import datetime

    gap = datetime.strptime(s2, "%Y%m%d") - datetime.strptime(s1, "%Y%m%d")
    assert gap.days == 10  # intervals within a patient survive
    assert d.shift_date("not a date", "p1") is None


def test_clean_meta_holds_no_identifier(deid):
    import numpy as np

    ds = ct_slice(np.zeros((4, 4), np.int16), (0, 0, 0), ContrastBolusAgent="CANARY AGENT 50ml")
    meta = clean_dicom_meta(ds, deid)
    text = repr(meta).upper()
    for value in [*PHI.values(), "CANARY AGENT", "1.2.3.4.5", "20200102"]:
        assert value.upper() not in text
    assert meta["contrast"] is True and meta["modality"] == "CT"
    assert meta["patient_key"] == deid.pseudonym("patient", PHI["PatientID"] + "|")


def test_burned_in_rule():
    us = pydicom.dcmread(get_testdata_file("ExplVR_BigEnd.dcm"))
    assert us.Modality == "US" and "BurnedInAnnotation" not in us
    assert burned_in_risk(us)
    us.BurnedInAnnotation = "NO"
    assert not burned_in_risk(us)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert not burned_in_risk(ct)
    ct.BurnedInAnnotation = "YES"
    assert burned_in_risk(ct)


def test_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("REGIONCORPUS_KEY", raising=False)
    key_file = tmp_path / "k"
    key_file.write_text("a" * 40)
    assert load_key(key_file) == b"a" * 40
    with pytest.raises(ValueError, match="no such file"):
        load_key(tmp_path / "missing")
    monkeypatch.setenv("REGIONCORPUS_KEY", "from-env-0123456789")
    assert load_key(key_file) == b"from-env-0123456789"
