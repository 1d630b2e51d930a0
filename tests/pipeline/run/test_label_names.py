"""Label names read from files pass the structure vocabulary in the unit worker: a known name
becomes its canonical label, an unknown one (where hospitals put names and dates) becomes
``structure_<value>`` unless --keep-unknown-label-names."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from factories import ramp_volume, write_series
from label_factories import Series, contour, make_rtstruct, square

from workflows.build_corpus import main

ROIS = [(7, "Lung_L"), (8, "DOE^JANE 19700101")]


@pytest.mark.parametrize("keep", [False, True])
def test_rtstruct_roi_names_through_the_vocabulary(tmp_path, capfd, keep):
    src = tmp_path / "src"
    write_series(src / "ct", ramp_volume((3, 24, 20)), origin=(-10.0, -20.0, 30.0), step=2.5,
                 spacing=(0.8, 0.7), series_uid="1.2.3.4.5")
    geo = Series((1, 0, 0, 0, 1, 0), (-10.0, -20.0, 30.0), (0.8, 0.7), (0, 0, 2.5), 20, 24, 3)
    rois = [(n, name, [contour(square(geo, 2 + 9 * i, 8 + 9 * i, 5, 12, 1))])
            for i, (n, name) in enumerate(ROIS)]
    make_rtstruct(src / "rt.dcm", geo, rois, "1.2.3.4.5")
    out = tmp_path / "out"
    flags = ["--keep-unknown-label-names"] if keep else []
    assert main([str(src), "--out", str(out), "--every-k", "0", *flags]) == 0
    names = pq.read_table(out / "series").to_pylist()[0]["label_names"]
    labels = set(pq.read_table(out / "regions", columns=["label"])["label"].to_pylist())
    (unknown,) = set(names) - {"lung_left"}  # "Lung_L" is TG-263's left lung
    assert unknown == "DOE^JANE 19700101" if keep else unknown.startswith("structure_")
    assert labels <= set(names) and "lung_left" in labels
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    blob += "".join(capfd.readouterr()).encode()
    assert (b"DOE^JANE" in blob) == keep and (b"19700101" in blob) == keep
