"""Report tables (CSV / Parquet / JSON lines), key kinds, .txt reports, and the IU reports."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.ingest.deid import Deidentifier
from pipeline.reports import REPORT_KEY_KINDS, Report, load_reports, read_report_file, report_key
from tests.pipeline.reports.iu import require_iu, write_iu_csv

DEID = Deidentifier(b"test-key-for-reports-0123456789")
UID = "1.2.826.0.1.3680043.8.498.12345"
ROWS = [
    {"uid": UID, "acc": "ACC778899", "pid": "P0001", "date": "2019-03-14",
     "report": "FINDINGS: Lungs clear. Call 415-555-1234.\nIMPRESSION: Normal chest.\n"
               "INDICATION: Cough in John, MRN 12345678."},
    {"uid": "1.2.3.4", "acc": "ACC2", "pid": "P0002", "date": "03/15/2019",
     "report": "Heart size normal."},
    {"uid": "", "acc": "", "pid": "", "date": "", "report": "FINDINGS: no key."},
    {"uid": "1.2.3.5", "acc": "ACC3", "pid": "P0003", "date": "not a date", "report": "  "},
]


def write(tmp_path, fmt, rows=ROWS):
    frame = pd.DataFrame(rows)
    path = tmp_path / f"reports.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_formats_keys_sections_and_scrub(tmp_path, fmt):
    table = load_reports(write(tmp_path, fmt), DEID, key="study:uid", text="report")
    assert (table.n_rows, table.n_bad_rows, len(table.by_key)) == (4, 2, 2)
    first = table.get("study", DEID.pseudonym("uid", UID))
    assert first == Report(findings="Lungs clear. Call [PHONE].", impression="Normal chest.")
    assert table.get("study", report_key("study", "1.2.3.4", DEID)).findings == "Heart size normal."


def test_key_kinds_match_what_the_build_computes(tmp_path):
    path = write(tmp_path, "csv")
    by_acc = load_reports(path, DEID, key="accession:acc", text="report")
    assert ("accession", DEID.pseudonym("accession", "ACC778899")) in by_acc.by_key
    by_pd = load_reports(path, DEID, key="patient_date:pid,date", text="report")
    assert set(by_pd.by_key) == {
        ("patient_date", DEID.pseudonym("patient-date", "P0001|20190314")),
        ("patient_date", DEID.pseudonym("patient-date", "P0002|20190315"))}
    assert REPORT_KEY_KINDS == ("study", "accession", "patient_date")


@pytest.mark.parametrize("date", ["20190314", "2019-03-14", "2019/03/14", "03/14/2019",
                                  "14.03.2019", "14 Mar 2019", "Mar 14, 2019", "14-Mar-2019",
                                  "2019-03-14T10:22:01", "2019-03-14 10:22"])
def test_patient_date_forms_give_one_key(date):
    want = DEID.pseudonym("patient-date", "P9|20190314")
    assert report_key("patient_date", f"P9|{date}", DEID) == want


def test_findings_and_impression_columns(tmp_path):
    rows = [{"k": "1.2.3", "f": "Lungs clear. Dr. Smith notified.", "i": "Normal."}]
    table = load_reports(write(tmp_path, "csv", rows), DEID, key="study:k",
                         text="findings=f,impression=i")
    assert table.get("study", DEID.pseudonym("uid", "1.2.3")) == Report(
        findings="Lungs clear. Dr. [NAME] notified.", impression="Normal.")
    auto = [{"k": "1.2.3", "findings": "A.", "impression": "B."}]
    assert load_reports(write(tmp_path, "csv", auto), DEID, key="study:k").n_bad_rows == 0


def test_duplicates_keep_the_first(tmp_path):
    rows = [{"k": "1.2", "report": "First."}, {"k": "1.2", "report": "Second."}]
    table = load_reports(write(tmp_path, "csv", rows), DEID, key="study:k")
    assert table.n_duplicates == 1
    assert table.get("study", DEID.pseudonym("uid", "1.2")).findings == "First."


@pytest.mark.parametrize("key, text", [
    ("study:nope", "report"), ("study:uid", "nope"), ("bogus:uid", "report"),
    ("patient_date:pid", "report"), ("study", "report"), ("study:uid", "summary=report"),
])
def test_wrong_columns_raise_a_fixed_message(tmp_path, key, text):
    with pytest.raises(ValueError) as err:
        load_reports(write(tmp_path, "csv"), DEID, key=key, text=text)
    msg = str(err.value)
    assert "nope" not in msg and "bogus" not in msg and "summary" not in msg
    assert "Lungs" not in msg and str(tmp_path) not in msg


def test_unreadable_table_and_unknown_format(tmp_path):
    bad = tmp_path / "JOHN_DOE.parquet"
    bad.write_bytes(b"not parquet")
    for path in (bad, tmp_path / "JOHN_DOE.csv", tmp_path / "JOHN_DOE.xlsx"):
        with pytest.raises(ValueError) as err:
            load_reports(path, DEID, key="study:uid")
        assert "JOHN" not in str(err.value)


def test_read_report_file_mimic_layout(tmp_path):
    path = tmp_path / "s50414267.txt"
    path.write_bytes(b"                FINAL REPORT\n EXAMINATION: CHEST\n INDICATION: "
                     b"___F with cough, seen 3/14/2019\n\n FINDINGS:\n\n PA and lateral views. "
                     b"No pleural\n effusion. Tel 617 555 0000.\n\n IMPRESSION:\n\n No acute "
                     b"process.\xff\n")
    got = read_report_file(path)
    assert got.findings == "PA and lateral views. No pleural effusion. [PHONE]."
    assert got.impression == "No acute process.\ufffd"
    with pytest.raises(ValueError) as err:
        read_report_file(tmp_path / "DOE_JANE.txt")
    assert "DOE" not in str(err.value)


def test_iu_reports_load_through_the_table(tmp_path):
    rows = require_iu()
    assert len(rows) == 3955
    table = load_reports(write_iu_csv(tmp_path), DEID, key="accession:report_id",
                         text="findings=findings,impression=impression")
    assert table.n_rows == 3955 and table.n_duplicates == 0
    empty = sum(1 for _, f, i in rows if not (f.strip() or i.strip()))
    assert table.n_bad_rows == empty and len(table.by_key) == 3955 - empty
    # the IU "XXXX" placeholders are left alone, and most prose survives the scrub
    reports = list(table.by_key.values())
    assert sum("XXXX" in r.findings for r in reports) > 1000
    kept = sum(len(r.findings) + len(r.impression) for r in reports)
    raw = sum(len(" ".join(f.split())) + len(" ".join(i.split())) for _, f, i in rows)
    assert kept / raw > 0.97
