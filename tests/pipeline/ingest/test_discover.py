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
