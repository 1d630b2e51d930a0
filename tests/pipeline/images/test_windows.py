"""Tests for pipeline.images.windows: window presets, the exact ramp, per-volume percentile ranges."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.images.windows import (
    CT_WINDOWS,
    WindowSpec,
    apply_range,
    apply_window,
    percentile_range,
    windows_for,
)
from pipeline.ingest.volume import Volume


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
@pytest.mark.parametrize(
    "bits,dtype,top,mid", [(8, np.uint8, 255, 128), (16, np.uint16, 65535, 32768)]
)
def test_window_edges_and_level_are_exact(name, bits, dtype, top, mid):
    width, level = CT_WINDOWS[name]
    hu = np.array(
        [[level - width / 2, level, level + width / 2], [level - width, -1e6, level + width]],
        dtype=np.float32,
    )
    out = apply_window(hu, width, level, bits=bits)
    assert out.dtype == dtype and out.shape == hu.shape
    assert out.tolist() == [[0, mid, top], [0, 0, top]]


def test_window_is_linear_and_monotonic():
    hu = np.linspace(-200, 300, 501, dtype=np.float32)[None, :]
    out = apply_window(hu, 400, 40).astype(int)[0]
    expected = np.clip(np.floor((hu[0].astype(np.float64) + 160) * 255 / 400 + 0.5), 0, 255)
    assert np.abs(out - expected).max() <= 1  # float32 arithmetic, at most one level off
    assert np.all(np.diff(out) >= 0)
    # a quarter of the way up the soft-tissue ramp: -160 + 100 = -60 HU → 255/4 = 63.75 → 64
    assert apply_window(np.array([[-60.0]]), 400, 40)[0, 0] == 64


def test_window_handles_nan_inf_and_integer_input():
    v = np.array([[np.nan, np.inf, -np.inf, 40.0]], dtype=np.float32)
    assert apply_window(v, 400, 40).tolist() == [[0, 255, 0, 128]]
    ints = np.array([[-160, 40, 240]], dtype=np.int16)
    assert apply_window(ints, 400, 40).tolist() == [[0, 128, 255]]
    assert ints.tolist() == [[-160, 40, 240]]  # input not modified


def test_lung_and_soft_tissue_map_minus_600_differently():
    v = np.full((2, 2), -600.0, dtype=np.float32)
    lung = apply_window(v, *CT_WINDOWS["lung"])
    soft = apply_window(v, *CT_WINDOWS["soft_tissue"])
    assert np.all(lung == 128)  # the lung window's level
    assert np.all(soft == 0)  # far below the soft-tissue window


def test_bad_window_arguments_raise():
    with pytest.raises(ValueError, match="bits"):
        apply_window(np.zeros((2, 2)), 400, 40, bits=12)
    with pytest.raises(ValueError, match="width"):
        apply_window(np.zeros((2, 2)), 0, 40)


def test_apply_range_degenerate_range_is_a_step():
    v = np.array([[1.0, 2.0, 3.0]])
    assert apply_range(v, 2.0, 2.0).tolist() == [[0, 0, 255]]
    assert apply_range(v, 2.0, 2.0, bits=16).dtype == np.uint16


def test_percentile_range_ignores_outliers():
    rng = np.random.default_rng(0)
    vol = rng.uniform(100.0, 200.0, size=(40, 50, 30)).astype(np.float32)
    vol[0, 0, 0] = 1e6
    vol[1, 2, 3] = -1e6
    vol[5, 5, 5] = np.nan
    vmin, vmax = percentile_range(vol, 0.5, 99.5)
    assert 100.0 <= vmin < 101.5 and 198.5 < vmax <= 200.0


def test_percentile_range_subsample_is_deterministic_and_close():
    rng = np.random.default_rng(1)
    vol = rng.normal(0.0, 1.0, size=(64, 64, 64)).astype(np.float32)
    full = percentile_range(vol, 1, 99, max_samples=vol.size)
    sub = percentile_range(vol, 1, 99, max_samples=10_000)
    assert sub == percentile_range(vol, 1, 99, max_samples=10_000)
    assert abs(sub[0] - full[0]) < 0.1 and abs(sub[1] - full[1]) < 0.1


def test_percentile_range_respects_mask():
    vol = np.zeros((20, 20, 20), dtype=np.float32)
    vol[5:15, 5:15, 5:15] = np.linspace(10, 20, 1000).reshape(10, 10, 10)
    mask = np.zeros(vol.shape, dtype=bool)
    mask[5:15, 5:15, 5:15] = True
    vmin, vmax = percentile_range(vol, 0, 100, mask=mask)
    assert vmin == pytest.approx(10.0) and vmax == pytest.approx(20.0)
    assert percentile_range(vol, 0, 100)[0] == 0.0
    # a mask too small for the strided subsample still counts
    tiny = np.zeros(vol.shape, dtype=bool)
    tiny[7, 7, 7] = True
    assert percentile_range(vol, 0, 100, mask=tiny, max_samples=100)[0] == vol[7, 7, 7]
    with pytest.raises(ValueError, match="mask shape"):
        percentile_range(vol, mask=mask[0])


def test_windows_for_ct_presets_and_unknown_name():
    ct = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), "CT")
    specs = windows_for(ct, ("soft_tissue", "lung"))
    assert specs == [WindowSpec("soft_tissue", -160.0, 240.0), WindowSpec("lung", -1350.0, 150.0)]
    with pytest.raises(ValueError, match="soft_tissue") as err:
        windows_for(ct, ("liver",))
    assert "liver" in str(err.value) and "lung" in str(err.value)


def test_windows_for_mr_uses_one_volume_percentile_window():
    arr = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    mr = Volume(arr, np.eye(4), "MR")
    (spec,) = windows_for(mr, ("lung",), percentiles=(0, 100))
    assert spec == WindowSpec("percentile", 0.0, 999.0)
    (pt,) = windows_for(Volume(arr, np.eye(4), "PT"))
    assert pt.name == "percentile" and 0 < pt.vmin < 10 and 989 < pt.vmax < 999
