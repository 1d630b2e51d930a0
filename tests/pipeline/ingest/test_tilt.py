"""Gantry-tilted CT: resampled onto an orthogonal grid by default, the object where it was.

A tilted acquisition is simulated exactly: each slice plane is tilted by θ while the table
steps along the patient axis, and every pixel samples a smooth bright blob at a known LPS
position. After reading, the intensity-weighted centroid must sit at the blob's RAS position
within one voxel; uncorrected (the stack taken as orthogonal) it would be off by the drift.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from factories import ct_slice
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import IngestError
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.read import ReadConfig, read_volume

DEID = Deidentifier(b"test-key-not-secret-0123456789")
ROWS, COLS, SLICES, SPACING, TABLE_STEP = 40, 44, 24, (1.5, 1.25), 2.5


def tilted_series(folder: Path, degrees: float, axis: str, centre_lps, sigma=5.0,
                  positions=None) -> Path:
    """CT slices tilted by ``degrees`` about the patient ``axis`` ("x": the column direction
    tilts, "y": the row direction tilts), table steps of TABLE_STEP mm along z, a Gaussian
    blob of +1000 HU over −1000 HU centred at ``centre_lps``. Returns the folder."""
    t = math.radians(degrees)
    if axis == "x":
        row, col = np.array([1.0, 0, 0]), np.array([0, math.cos(t), math.sin(t)])
    else:
        row, col = np.array([math.cos(t), 0, math.sin(t)]), np.array([0, 1.0, 0])
    origin = np.array([-30.0, -25.0, -20.0])
    folder.mkdir(parents=True)
    r, c = np.mgrid[0:ROWS, 0:COLS]
    for k in range(SLICES):
        ipp = origin + np.array([0, 0, k * TABLE_STEP]) if positions is None else positions[k]
        world = (ipp + c[..., None] * SPACING[1] * row + r[..., None] * SPACING[0] * col)
        d2 = ((world - np.asarray(centre_lps)) ** 2).sum(-1)
        pixels = np.round(-1000 + 1000 * np.exp(-d2 / (2 * sigma**2))).astype(np.int16)
        iop = [float(f"{v:.8f}") for v in (*row, *col)]
        ds = ct_slice(pixels, [float(f"{v:.6f}") for v in ipp], iop, SPACING, instance=k + 1)
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return folder


def centroid_ras(vol) -> np.ndarray:
    """Intensity-weighted centroid (above the background) of the volume, RAS mm."""
    w = np.clip(vol.array - (-1000.0), 0, None).astype(np.float64)
    ijk = np.array([(w.sum(axis=tuple(a for a in range(3) if a != ax))
                     * np.arange(w.shape[ax])).sum() for ax in range(3)]) / w.sum()
    return (vol.affine @ np.append(ijk, 1.0))[:3]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(degrees=st.one_of(st.floats(-30.0, -4.0), st.floats(4.0, 30.0)),
       axis=st.sampled_from(["x", "y"]))
def test_tilted_stack_is_resampled_and_the_object_stays_put(degrees, axis):
    centre_lps = np.array([-5.0, 2.0, 10.0])
    with tempfile.TemporaryDirectory() as tmp:
        folder = tilted_series(Path(tmp) / "s", degrees, axis, centre_lps)
        vol = read_volume(folder, DEID)
    assert vol.meta["resampled"] == "gantry_tilt_linear"
    m = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-6)  # an orthogonal grid
    want = centre_lps * np.array([-1.0, -1.0, 1.0])  # LPS → RAS
    assert np.linalg.norm(centroid_ras(vol) - want) < min(vol.spacing)
    assert vol.shape[2] == SLICES  # slices are never interpolated across


def test_untilted_stack_is_not_resampled(tmp_path, deid):
    vol = read_volume(tilted_series(tmp_path / "s", 0.0, "x", [-5.0, 2.0, 10.0]), deid)
    assert vol.meta["resampled"] is None and vol.shape == (COLS, ROWS, SLICES)


def test_refuse_gantry_tilt_keeps_the_old_refusal(tmp_path, deid):
    folder = tilted_series(tmp_path / "s", 15.0, "x", [-5.0, 2.0, 10.0])
    with pytest.raises(IngestError) as e:
        read_volume(folder, deid, ReadConfig(refuse_gantry_tilt=True))
    assert e.value.reason == "gantry_tilt"


def test_tilt_beyond_any_gantry_is_refused(tmp_path, deid):
    folder = tilted_series(tmp_path / "s", 60.0, "x", [-5.0, 2.0, 10.0])
    with pytest.raises(IngestError) as e:
        read_volume(folder, deid)
    assert e.value.reason == "gantry_tilt"


def test_positions_off_one_line_are_geometry(tmp_path, deid):
    """In-plane drift that is not linear in the slice index is no tilt: refused."""
    rng = np.random.default_rng(0)
    positions = [np.array([-30.0, -25.0 + rng.uniform(-3, 3), -20.0 + k * TABLE_STEP])
                 for k in range(SLICES)]
    folder = tilted_series(tmp_path / "s", 0.0, "x", [-5.0, 2.0, 10.0], positions=positions)
    with pytest.raises(IngestError) as e:
        read_volume(folder, deid)
    assert e.value.reason == "geometry"


@pytest.mark.parametrize("refuse", [False, True])
def test_build_records_the_resampling_or_refuses_on_the_flag(tmp_path, refuse):
    import pyarrow.parquet as pq

    from workflows.build_corpus import main

    tilted_series(tmp_path / "src" / "s", 15.0, "x", [-5.0, 2.0, 10.0])
    out = tmp_path / "out"
    flags = ["--refuse-gantry-tilt"] if refuse else []
    assert main([str(tmp_path / "src"), "--out", str(out), *flags]) == 0
    files = pq.read_table(out / "files").to_pylist()
    if refuse:
        assert {r["reason"] for r in files} == {"gantry_tilt"}
    else:
        (series,) = pq.read_table(out / "series").to_pylist()
        assert series["resampled"] == "gantry_tilt_linear"
