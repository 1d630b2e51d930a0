"""The file index (pipeline.ingest.file_index, pipeline.write.FILE_INDEX_SCHEMA): a resume reads
again only the headers of new or changed files; the index holds no raw identifier; entries
taken from it group into the same units as a fresh scan; an index it cannot trust is ignored."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pydicom
import pytest
from factories import ramp_volume, write_series
from label_factories import Series, contour, make_rtstruct, square

import pipeline.ingest.discover as discover
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.discover import scan_headers, walk
from pipeline.ingest.file_index import index_rows, reuse
from pipeline.ingest.units import group_units
from pipeline.write import FILE_INDEX_SCHEMA, file_index_path, read_file_index, write_file_index
from workflows.build_corpus import main

DEID = Deidentifier(b"k" * 32)
TABLES = ("files", "series", "images", "regions")


def _collection(src):
    """Two CT series (one with two geometries), an RTSTRUCT on the first, a slice without a
    series UID, a file that is not DICOM and a truncated one."""
    write_series(src / "ct", ramp_volume((3, 24, 20)), series_uid="1.2.3.4.5")
    write_series(src / "mr", ramp_volume((2, 16, 16)), series_uid="1.2.3.4.6")
    write_series(src / "mr", ramp_volume((2, 12, 16)), series_uid="1.2.3.4.6",
                 names=["B0.dcm", "B1.dcm"])
    write_series(src / "lone", ramp_volume((1, 16, 16)), series_uid="")
    geo = Series((1, 0, 0, 0, 1, 0), (-10.0, -20.0, 30.0), (0.8, 0.7), (0, 0, 2.5), 20, 24, 3)
    make_rtstruct(src / "rt.dcm", geo, [(7, "tumour", [contour(square(geo, 4, 9, 5, 12, 1))])],
                  "1.2.3.4.5")
    (src / "notes.bin").write_bytes(b"not a dicom file at all" * 10)
    data = (src / "ct" / "IM0000.dcm").read_bytes()
    (src / "cut.dcm").write_bytes(data[:200])


@pytest.fixture
def reads(monkeypatch, tmp_path):
    """Header reads of discovery, counted across the forked scan workers (a line per read)."""
    log = tmp_path / "reads.log"
    real = discover.read_header

    def counted(path):
        with open(log, "a") as f:
            f.write("x\n")
        return real(path)

    monkeypatch.setattr(discover, "read_header", counted)

    def count() -> int:
        n = len(log.read_text().splitlines()) if log.exists() else 0
        log.unlink(missing_ok=True)
        return n

    return count


def _build(src, out) -> dict:
    assert main([str(src), "--out", str(out), "--every-k", "1"]) == 0
    return json.loads((out / "manifest.json").read_text())


def _rows(out) -> dict:
    from pipeline.write import read_table

    return {t: sorted(json.dumps(r, sort_keys=True, default=str) for r in read_table(out, t))
            for t in TABLES}


def _index_keys(out) -> set[str]:
    return set(pq.read_table(file_index_path(out)).column("file_key").to_pylist())


def test_resume_reads_only_what_changed(tmp_path, reads):
    src, out = tmp_path / "src", tmp_path / "out"
    _collection(src)
    n_dicom = sum(1 for p in src.rglob("*") if p.suffix in (".dcm", ".bin"))
    first = _build(src, out)
    assert reads() == n_dicom and first["header_scan"]["scanned"] == n_dicom
    rows = _rows(out)

    again = _build(src, out)  # nothing changed: no header is read
    assert reads() == 0
    assert again["header_scan"] == {"files": first["found"], "from_index": n_dicom, "scanned": 0}
    assert _rows(out) == rows

    touched = src / "mr" / "IM0001.dcm"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _build(src, out)["header_scan"]["scanned"] == 1 and reads() == 1
    assert _rows(out) == rows

    keys = _index_keys(out)
    (src / "ct" / "IM0002.dcm").unlink()
    gone = _build(src, out)
    assert reads() == 0 and gone["header_scan"]["from_index"] == n_dicom - 1
    assert len(_index_keys(out)) == len(keys) - 1 and _index_keys(out) < keys

    (src / "new").mkdir()
    shutil.copy(src / "mr" / "B0.dcm", src / "new" / "B0.dcm")
    assert _build(src, out)["header_scan"]["scanned"] == 1 and reads() == 1


def test_rows_from_the_index_equal_rows_from_a_scan(tmp_path, reads):
    """A build into a new folder that holds only the index of another build reads no header
    and writes the same rows as that build."""
    src = tmp_path / "src"
    _collection(src)
    _build(src, tmp_path / "a")
    reads()
    (tmp_path / "b" / "_index").mkdir(parents=True)
    shutil.copy(file_index_path(tmp_path / "a"), file_index_path(tmp_path / "b"))
    _build(src, tmp_path / "b")
    assert reads() == 0
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")


def test_an_untrusted_index_is_ignored(tmp_path, reads):
    src, out = tmp_path / "src", tmp_path / "out"
    _collection(src)
    _build(src, out)
    n = reads()
    key_id = Deidentifier.from_env().key_id  # the build's key (tests/conftest.py)
    data = read_file_index(out, key_id)
    assert data is not None and data.num_rows > 0

    write_file_index(out, data.to_pylist(), "another-key")  # another key: every header again
    assert read_file_index(out, key_id) is None
    assert _build(src, out)["header_scan"]["scanned"] == n and reads() == n

    meta = {b"file_index_version": b"0", b"deid_key_id": key_id.encode()}  # an older version
    pq.write_table(data.replace_schema_metadata(meta), file_index_path(out))
    assert read_file_index(out, key_id) is None
    assert _build(src, out)["header_scan"]["scanned"] == n and reads() == n

    file_index_path(out).write_bytes(b"PAR1 torn")  # unreadable
    assert read_file_index(out, key_id) is None
    assert _build(src, out)["header_scan"]["scanned"] == n and reads() == n
    assert read_file_index(out, key_id) is not None


def _uids(src) -> set[str]:
    """Every UI value in the collection's DICOM files (data set and file meta)."""
    found = set()
    for p in src.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(p)
        except Exception:
            continue
        for elem in [*ds.iterall(), *ds.file_meta]:
            if elem.VR == "UI" and elem.value:
                found.add(str(elem.value))
    return found


def test_the_index_holds_no_raw_identifier(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _collection(src)
    _build(src, out)
    data = pq.read_table(file_index_path(out))
    assert data.schema.remove_metadata().equals(FILE_INDEX_SCHEMA)
    cells = {str(v) for col in data.columns for v in col.to_pylist() if v is not None}
    public = {*data.column("sop_class").to_pylist(), *data.column("transfer_syntax").to_pylist()}
    secret = _uids(src) - public  # standard SOP classes and transfer syntaxes are not secret
    assert {"1.2.3.4.5", "1.2.3.4.6"} <= secret and len(secret) > 10
    assert not [c for c in cells if any(s in c for s in secret)]
    assert "src" not in " ".join(cells) and "IM0000" not in " ".join(cells)


def _units(entries):
    return [(u.unit_key, u.kind, u.image_files, u.label_file, u.label_kind, u.headers)
            for u in group_units(entries, DEID)]


def test_index_entries_group_like_a_fresh_scan(tmp_path):
    """Keyed at scan time, keyed at grouping time (library callers) or taken from the index:
    the same units, labels paired the same way, the same headers."""
    src = tmp_path / "src"
    _collection(src)
    scanned = scan_headers(walk([src], DEID), DEID)
    assert all(e.header.series_uid != "1.2.3.4.5" for e in scanned if e.header)
    fresh = _units(scanned)
    assert _units(scan_headers(walk([src], DEID))) == fresh
    again = walk([src], DEID)
    table = pq.read_table(_write(tmp_path, index_rows(scanned)))
    assert reuse(again, table) == len(index_rows(scanned))
    assert _units(again) == fresh
    assert any(u[4] == "rtstruct" for u in fresh) and len(fresh) == 4
    # unit keys as grouping has always made them: from the raw series UID and the geometry
    assert DEID.pseudonym("unit", "1.2.3.4.5|24x20|1.000,0.000,0.000,0.000,1.000,0.000") \
        in {u[0] for u in fresh}
    assert [(e.status, e.reason) for e in again] == [(e.status, e.reason) for e in scanned]


def _write(tmp_path, rows):
    out = tmp_path / "idx"
    write_file_index(out, rows, DEID.key_id)
    return file_index_path(out)


def test_ray_header_scan_equals_the_local_one(tmp_path):
    """``--executor ray``: header-scan batches run as Ray tasks (each in its own isolated
    child); the same rows and the same index as the local scan, and a resume reads nothing."""
    src = tmp_path / "src"
    _collection(src)
    local, ray = tmp_path / "local", tmp_path / "ray"
    _build(src, local)
    args = ["--every-k", "1", "--executor", "ray", "--workers", "2"]
    assert main([str(src), "--out", str(ray), *args]) == 0
    first = json.loads((ray / "manifest.json").read_text())["header_scan"]
    assert first["scanned"] > 4 and first["from_index"] == 0
    assert _rows(ray) == _rows(local)
    index = [pq.read_table(file_index_path(d)).sort_by("file_key") for d in (local, ray)]
    assert index[0].equals(index[1])
    assert main([str(src), "--out", str(ray), *args]) == 0
    assert json.loads((ray / "manifest.json").read_text())["header_scan"]["scanned"] == 0
