"""pipeline.ingest.discover / dicom_io headers: the values a series repeats are held once."""

from __future__ import annotations

import pickle

from factories import ramp_volume, write_series

from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.discover import scan_headers, walk


def _headers(root):
    entries = scan_headers(walk([root], Deidentifier(b"k" * 32)))
    return [e.header for e in entries if e.header is not None]


def test_slices_of_a_series_share_repeated_header_values(tmp_path):
    write_series(tmp_path / "a", ramp_volume((4, 12, 10)), series_uid="1.2.3.4.5")
    write_series(tmp_path / "b", ramp_volume((3, 12, 10)), series_uid="1.2.3.4.6",
                 iop=(1.0, -0.0, 0.0, 0.0, 1.0, 0.0))
    headers = _headers(tmp_path)
    a = [h for h in headers if h.series_uid == "1.2.3.4.5"]
    b = [h for h in headers if h.series_uid == "1.2.3.4.6"]
    assert len(a) == 4 and len(b) == 3
    for series in (a, b):
        first = series[0]
        assert all(h.series_uid is first.series_uid and h.iop is first.iop
                   and h.sop_class is first.sop_class for h in series)
        assert len({h.ipp for h in series}) == len(series)  # positions stay per slice
    # equal but differently signed zeros are not merged: the -0.0 orientation stays -0.0
    assert a[0].iop == b[0].iop and repr(a[0].iop) != repr(b[0].iop)
    assert a[0].iop is not b[0].iop
    # a header-scan batch crosses the process boundary pickled: the sharing survives it
    back = pickle.loads(pickle.dumps(a))
    assert all(h.series_uid is back[0].series_uid and h.iop is back[0].iop for h in back)


def test_roots_with_one_name_never_share_keys(tmp_path):
    """nibabel's tests/data and nilearn's datasets/data both hold test.mgz: two files, two
    keys, two rows, two volumes (one key used to swallow a row and could merge patients)."""
    import json

    import nibabel as nib
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.ingest.discover import root_labels
    from workflows.build_corpus import main

    a, b = tmp_path / "tests" / "data", tmp_path / "datasets" / "data"
    for k, root in enumerate((a, b)):
        root.mkdir(parents=True)
        img = np.arange(512, dtype=np.int16).reshape(8, 8, 8) * (k + 1)
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "test.nii.gz")
    assert root_labels([a, b]) == ["tests/data", "datasets/data"]
    assert root_labels([a]) == ["data"] and root_labels([a, a]) == ["data", "data"]
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    files = pq.read_table(out / "files").to_pylist()
    assert len(files) == 2 and len({f["file_key"] for f in files}) == 2
    series = pq.read_table(out / "series").to_pylist()
    assert len({s["series_key"] for s in series}) == len({s["patient_key"] for s in series}) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["found"] == manifest["rows"]["files"] == 2


def test_keyed_headers_share_their_keyed_values(tmp_path):
    """Keyed at scan time (the build's way): no raw series UID left, and a series' slices
    still hold one object per keyed value (the driver keeps a header per file)."""
    deid = Deidentifier(b"k" * 32)
    write_series(tmp_path / "a", ramp_volume((4, 12, 10)), series_uid="1.2.3.4.5")
    entries = scan_headers(walk([tmp_path], deid), deid)
    headers = [e.header for e in entries if e.header is not None]
    assert len(headers) == 4 and all(h.series_uid == deid.pseudonym("uid", "1.2.3.4.5")
                                     for h in headers)
    assert all(h.series_uid is headers[0].series_uid for h in headers)
    assert len({e.group_key for e in entries}) == 1
